"""The public API exactly as documented, on 10-layer tiny models of each class."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.helpers import WORDS


@pytest.fixture(scope="module", params=["hooked", "hf_bridge"])
def deep_model(request: pytest.FixtureRequest, tokenizer_dir: str, tmp_path_factory: Any) -> Any:
    from transformers import AutoTokenizer

    if request.param == "hooked":
        try:
            from transformer_lens import HookedTransformer, HookedTransformerConfig
        except ImportError:
            pytest.skip("HookedTransformer is gone in this TransformerLens version")
        cfg = HookedTransformerConfig(
            d_model=32,
            d_head=8,
            n_heads=4,
            n_layers=10,
            n_ctx=64,
            d_vocab=len(WORDS),
            d_mlp=64,
            act_fn="gelu",
            seed=0,
            normalization_type="LN",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2_deep")
    torch.manual_seed(2)
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=10, n_head=4, vocab_size=len(WORDS), n_positions=64)
    ).save_pretrained(root)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root)
    return TransformerBridge.boot_transformers(str(root), device="cpu").eval()


def test_documented_api(deep_model: Any, tmp_path: Path) -> None:
    model = deep_model
    prompt = "i watched the film last night honestly the movie was"
    res = tps.power_steer(model, prompt, source=3, target=8, k=8)
    assert res.vectors.shape == (8, 32) and res.vectors.dtype == torch.float32
    assert res.singular_values.shape == (8,)
    assert res.left_vectors.shape == (8, 4 * 32)
    assert res.converged and res.iterations >= 2 and res.n_jvp > 0 and res.n_vjp > 0
    assert res.residuals.shape == (8,)

    op = tps.LayerJacobian(model, prompt, source=3, target=8)
    J = op.dense()
    assert J.shape == (4 * 32, 32)
    exact = torch.linalg.svdvals(J.double())[:8]
    rel = (res.singular_values.double() - exact).abs() / exact
    assert rel.max() < 1e-3
    Jv = res.vectors @ J.T
    torch.testing.assert_close(
        Jv, res.singular_values[:, None] * res.left_vectors, atol=1e-4, rtol=1e-4
    )

    res.save(tmp_path / "v.safetensors")
    again = tps.load(tmp_path / "v.safetensors")
    assert torch.equal(again.vectors, res.vectors) and again.prompts == [prompt]
