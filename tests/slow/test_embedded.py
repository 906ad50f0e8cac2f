"""The real embedded model, Gemma 3 270M from PyPI (run with --run-slow)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.reference import principal_angles
from tl_powersteer import models as M
from tl_powersteer.cli import DEMO_PROMPT, main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma() -> Any:
    return tps.load_model(device="cpu")


def test_loads_offline(gemma: Any) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    assert isinstance(gemma, TransformerBridge) and not gemma.training
    assert (gemma.cfg.n_layers, gemma.cfg.d_model) == (18, 640)
    assert gemma.cfg.model_name == "gemma-3-270m"
    tokens = gemma.to_tokens(DEMO_PROMPT)
    with torch.no_grad():
        logits = gemma(tokens)
    # The prototype's continuation of the demo prompt is " a bit of a letdown".
    assert gemma.tokenizer.decode(logits[0, -1].argmax()) == " a"


@pytest.mark.parametrize(("source", "target"), [(8, 16), (3, 10)])
def test_power_steer_matches_dense_svd(gemma: Any, source: int, target: int) -> None:
    res = tps.power_steer(gemma, DEMO_PROMPT, source=source, target=target, k=8)
    J = tps.LayerJacobian(gemma, DEMO_PROMPT, source=source, target=target).dense()
    S, Vh = torch.linalg.svd(J.double(), full_matrices=False)[1:]
    assert res.converged
    assert ((res.singular_values.double() - S[:8]).abs() / S[:8]).max() < 1e-3
    assert principal_angles(res.vectors[:4], Vh[:4]).max() < 1e-2


def test_cli_vectors_and_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v.safetensors"
    args = ["vectors", "--prompt", DEMO_PROMPT, "--source", "6", "--target", "12", "--k", "4",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert tps.load(out).model_name == "gemma-3-270m"
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    demo = tps.load(tmp_path / "demo" / "vectors.safetensors")
    assert (demo.source, demo.target, demo.k, demo.prompts) == (8, 16, 8, [DEMO_PROMPT])
    assert "demo outputs written to" in capsys.readouterr().out


def test_corrupted_cache_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = M.embedded_model_dir(progress=False)
    copy = tmp_path / good.name
    shutil.copytree(good, copy)
    with (copy / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    model = tps.load_model(device="cpu", progress=False)
    assert "model.safetensors has 1000 bytes" in capsys.readouterr().err
    assert M._cache_problem(copy) is None
    assert (copy / "model.safetensors").stat().st_size == (
        good / "model.safetensors"
    ).stat().st_size
    assert model.cfg.n_layers == 18


def test_hooked_transformer_matches_bridge(gemma: Any) -> None:
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        pytest.skip("HookedTransformer is gone in this TransformerLens version")
    hooked = tps.load_model(kind="hooked", device="cpu")
    assert isinstance(hooked, HookedTransformer) and not hooked.training
    a = tps.power_steer(hooked, DEMO_PROMPT, source=8, target=16, k=4, tol=1e-6)
    b = tps.power_steer(gemma, DEMO_PROMPT, source=8, target=16, k=4, tol=1e-6)
    torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-4, atol=0)
    assert principal_angles(a.vectors, b.vectors).max() < 1e-2


def test_atlas_methods_on_real_pairs(gemma: Any) -> None:
    pairs = {"sources": [3, 8], "targets": [10, 16], "k": 4, "progress": False}
    exact = tps.sensitivity_atlas(gemma, DEMO_PROMPT, method="exact", **pairs)
    power = tps.sensitivity_atlas(gemma, DEMO_PROMPT, method="power", **pairs)
    sketch = tps.sensitivity_atlas(gemma, DEMO_PROMPT, method="sketch", **pairs)
    assert sketch.sketch_rank == 80  # d_model / 8
    for s, t in exact.pairs():
        J = tps.LayerJacobian(gemma, DEMO_PROMPT, source=s, target=t).dense()
        S, Vh = torch.linalg.svd(J.double(), full_matrices=False)[1:]
        torch.testing.assert_close(exact.singular_values[s, t].double(), S[:4], rtol=1e-5, atol=0)
        assert principal_angles(exact.vectors(s, t), Vh[:4]).max() < 1e-3
        rel = (power.singular_values[s, t] - exact.singular_values[s, t]).abs()
        assert (rel / exact.singular_values[s, t]).max() < 1e-3
        rel = (sketch.singular_values[s, t] - exact.singular_values[s, t]).abs()
        assert (rel / exact.singular_values[s, t]).max() < 0.1
