"""The same results on a CUDA device as on the CPU, for every public entry point.

Skipped where no CUDA device is present. The models are float64 copies of the shared tiny
models, so results agree to near machine precision and any tensor left on the wrong device
fails loudly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.helpers import build_models
from tl_powersteer.atlas import token_effects
from tl_powersteer.cli import main

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("no_grad"),
]

PROMPTS = ["i watched the movie last night", "the cat sat on the mat", "the dog was good"]
POSITIVE = ["the movie was good", "i liked the film"]
NEGATIVE = ["the movie was bad", "i liked it not"]
TIGHT = {"atol": 1e-9, "rtol": 1e-9}


@pytest.fixture(scope="module")
def cuda_models(tokenizer_dir: str, gpt2_dir: str) -> dict[str, Any]:
    return build_models(tokenizer_dir, gpt2_dir, device="cuda")


@pytest.fixture
def pair(
    request: pytest.FixtureRequest, models: dict[str, Any], cuda_models: dict[str, Any]
) -> tuple[Any, Any]:
    """(the CPU model, the same weights on CUDA)."""
    name = request.param
    if name not in models:
        pytest.skip(f"{name} is not available in this TransformerLens version")
    cpu, gpu = models[name], cuda_models[name]
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        assert b.device.type == "cuda" and torch.equal(a, b.cpu())
    return cpu, gpu


ALL = pytest.mark.parametrize("pair", ["hooked", "native_bridge", "hf_bridge"], indirect=True)
TEXT = pytest.mark.parametrize("pair", ["hooked", "hf_bridge"], indirect=True)


def same_up_to_sign(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.detach().cpu(), b.detach().cpu()
    signs = torch.sign((a * b).sum(-1, keepdim=True))
    torch.testing.assert_close(a * signs, b, **TIGHT)


@ALL
def test_power_steer(pair: tuple[Any, Any], tokens: torch.Tensor) -> None:
    cpu, gpu = pair
    for jvp_method in ("reverse", "forward"):
        a = tps.power_steer(cpu, tokens, 0, 3, k=3, jvp_method=jvp_method)
        b = tps.power_steer(gpu, tokens, 0, 3, k=3, jvp_method=jvp_method)
        assert b.vectors.device.type == b.history.device.type == "cpu"
        torch.testing.assert_close(b.singular_values.cpu(), a.singular_values, **TIGHT)
        same_up_to_sign(b.vectors, a.vectors)
        for vector in b.steering_vectors():
            with tps.steer(gpu, vector, 2.0):
                gpu(tokens.cuda())


@ALL
@pytest.mark.parametrize("method", ["exact", "power", "sketch"])
def test_atlas(pair: tuple[Any, Any], tokens: torch.Tensor, method: str, tmp_path: Path) -> None:
    cpu, gpu = pair
    a = tps.sensitivity_atlas(cpu, tokens, k=2, method=method, progress=False)
    b = tps.sensitivity_atlas(
        gpu, tokens, k=2, method=method, progress=False, checkpoint=tmp_path / "a.safetensors"
    )
    torch.testing.assert_close(b.singular_values.cpu(), a.singular_values, equal_nan=True, **TIGHT)
    for s, t in a.pairs():
        same_up_to_sign(b.vectors(s, t), a.vectors(s, t))
    resumed = tps.sensitivity_atlas(
        gpu, tokens, k=2, method=method, progress=False, checkpoint=tmp_path / "a.safetensors"
    )
    torch.testing.assert_close(resumed.singular_values, b.singular_values, equal_nan=True)


@TEXT
def test_atlas_page(pair: tuple[Any, Any], tmp_path: Path) -> None:
    cpu, gpu = pair
    atlas = tps.sensitivity_atlas(gpu, PROMPTS, k=2, method="exact", progress=False)
    effects = tps.token_effects(gpu, atlas, progress=False)
    page = tps.atlas_html(atlas, tmp_path / "atlas.html", effects=effects)
    assert "promoted" in page.read_text()
    effects = [token_effects(m, atlas, progress=False)["pairs"] for m in (cpu, gpu)]
    assert effects[1].keys() == effects[0].keys()
    for key in effects[0]:
        for on_cpu, on_gpu in zip(effects[0][key], effects[1][key], strict=True):
            for sign in "+-":
                for side in ("promoted", "suppressed"):
                    a, b = on_cpu[sign][side], on_gpu[sign][side]
                    assert [x[1] for x in b] == pytest.approx([x[1] for x in a], abs=2e-4)


@TEXT
def test_baselines_and_effects(pair: tuple[Any, Any]) -> None:
    cpu, gpu = pair
    caa = [tps.caa_vector(m, POSITIVE, NEGATIVE, 1, site="hook_mlp_out") for m in (cpu, gpu)]
    assert caa[1].direction.device.type == "cpu"
    same_up_to_sign(caa[1].direction[None], caa[0].direction[None])
    cos = [tps.probe(m, PROMPTS, v) for m, v in zip((cpu, gpu), caa, strict=True)]
    torch.testing.assert_close(cos[1].cpu(), cos[0], **TIGHT)
    found = [
        tps.melbo(m, PROMPTS, 1, 3, n_vectors=2, radius=1.0, steps=5, progress=False)
        for m in (cpu, gpu)
    ]
    torch.testing.assert_close(found[1].vectors.cpu(), found[0].vectors, atol=1e-6, rtol=1e-6)
    tables = [
        tps.effect(m, PROMPTS, v, [1.0, 2.0], metric="logit_diff", answers=("good", "bad"),
                   controls=1, progress=False)
        for m, v in zip((cpu, gpu), caa, strict=True)
    ]  # fmt: skip
    for column in ("value", "kl", "delta"):
        torch.testing.assert_close(
            torch.tensor(tables[1][column].to_numpy()), torch.tensor(tables[0][column].to_numpy())
        )
    texts = [
        tps.generate_steered(m, PROMPTS[0], v, [4.0], max_new_tokens=4, progress=False)
        for m, v in zip((cpu, gpu), caa, strict=True)
    ]
    assert texts[1].equals(texts[0])
    table = tps.compare_methods(
        gpu, PROMPTS, 1, 3, k=2, positive=POSITIVE, negative=NEGATIVE, melbo_steps=5,
        kl=1e-3, answers=("good", "bad"), controls=1, progress=False,
    )  # fmt: skip
    assert table["effect"].notna().all()


def test_cli_on_cuda(gpt2_dir: str, tmp_path: Path) -> None:
    common = ["--prompt", "the cat sat on the mat", "--model", gpt2_dir, "--dtype", "float64"]
    assert main(["atlas", *common, "--device", "cuda", "--out", str(tmp_path / "gpu")]) == 0
    assert main(["atlas", *common, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    a = tps.load(tmp_path / "cpu" / "atlas.safetensors")
    b = tps.load(tmp_path / "gpu" / "atlas.safetensors")
    torch.testing.assert_close(b.singular_values, a.singular_values, equal_nan=True, **TIGHT)
