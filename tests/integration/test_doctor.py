"""``tl-powersteer doctor``: versions, and self-checks that fail when what they check breaks.

Each fault is injected the way it shows in the wild (a cache that repeats its first token,
a hook left behind, a VJP that is not the JVP's transpose, a cache file that changed) and
must turn its check, and only its check, to FAIL with exit code 1.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import break_kv_cache
from tl_powersteer import doctor as D
from tl_powersteer import models as M
from tl_powersteer.cli import main
from tl_powersteer.jacobian import LayerJacobian


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model cache with nothing converted: the default model is then the tiny one."""
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["doctor", *args])
    return code, capsys.readouterr().out


def statuses(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        status, _, rest = line.strip().partition("  ")
        if status in ("PASS", "FAIL", "SKIP"):
            found[rest.split(":")[0]] = status
    return found


def test_doctor_passes_and_reports_versions(
    empty_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(capsys)
    assert code == 0, out
    assert statuses(out) == {
        "generation": "PASS", "hooks": "PASS", "adjointness": "PASS", "model cache": "SKIP",
    }  # fmt: skip
    assert "(tiny gemma3, 12 tokens, unsteered and 3 steered position rules)" in out
    for name in ("python", "torch", "transformers", "transformer-lens", "tl_powersteer"):
        assert f"\n  {name} " in out
    assert f"model cache: {empty_cache} (gemma-3-270m: not converted)" in out
    assert "all checks passed" in out


def test_a_broken_kv_cache_fails_the_generation_check(
    empty_cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    break_kv_cache(monkeypatch)
    code, out = run(capsys, "--model", "tiny")
    assert code == 1
    assert statuses(out)["generation"] == "FAIL" and statuses(out)["hooks"] == "PASS"
    assert "unsteered, with the cache: token 1 is" in out
    assert "fix: install the verified versions" in out and "1 check(s) FAILED" in out


def test_a_hook_left_behind_fails_the_hooks_check(
    empty_cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_steer = D.steer

    @contextlib.contextmanager
    def leaky(model: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        with real_steer(model, *args, **kwargs) as steering:
            model.blocks[0].hook_resid_post.add_hook(lambda act, hook: act)
            yield steering

    monkeypatch.setattr(D, "steer", leaky)
    code, out = run(capsys, "--model", "tiny")
    assert code == 1 and statuses(out)["hooks"] == "FAIL"
    assert "1 hook(s) left after a block that ended" in out and "model.reset_hooks()" in out


def test_a_vjp_that_is_not_the_transpose_fails_adjointness(
    empty_cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = LayerJacobian.rmatvec
    monkeypatch.setattr(LayerJacobian, "rmatvec", lambda self, U: real(self, U) * (1 + 1e-6))
    code, out = run(capsys, "--model", "tiny")
    assert code == 1 and statuses(out)["adjointness"] == "FAIL"
    assert statuses(out)["generation"] == "PASS" and "reinstall torch" in out


def test_a_changed_cache_file_fails_the_cache_check(
    empty_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(folder: Path, step: Any) -> None:
        (folder / "model.safetensors").write_bytes(b"weights")

    folder = M.ensure_cached(M.embedded_cache_dir(), build, progress=False)
    assert D.check_model_cache().passed is True
    # Same size, same mtime as before: only a full re-hash sees it.
    stat = (folder / "model.safetensors").stat()
    (folder / "model.safetensors").write_bytes(b"WEIGHTS")
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert M.cache_problem(folder) is None
    code, out = run(capsys, "--model", "tiny")
    assert code == 1 and statuses(out)["model cache"] == "FAIL"
    assert "model.safetensors does not match its SHA-256 digest" in out
    assert f"fix: delete {folder}" in out


def test_doctor_refuses_bad_arguments(
    empty_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--kind", "hooked", "--model", "tiny"]) == 2
    assert "the 'tiny' model is a TransformerBridge" in capsys.readouterr().err
    assert main(["doctor", "--kind", "other"]) == 2
    with pytest.raises(TypeError, match="non-empty string"):
        D.doctor(model="")
    with pytest.raises(ValueError, match="architecture must be one of"):
        D.write_tiny_model(empty_cache, "bert")
