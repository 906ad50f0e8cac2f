"""Bad input is refused with a clear message before any forward pass runs."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import tl_powersteer as tps


@contextmanager
def no_forward_pass(model: Any) -> Iterator[None]:
    """Fail the test if the model runs while the block is active."""
    calls: list[str] = []

    def spy(act: torch.Tensor, hook: Any) -> None:
        calls.append(hook.name)

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", spy)]):
        yield
    assert calls == [], "a forward pass ran before the error"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"source": 2, "target": 2},
            ValueError,
            r"must come after the source layer, got source=2, target=2; choose target in 3\.\.3",
        ),
        ({"source": 3, "target": 1}, ValueError, "must come after the source layer"),
        ({"source": -1, "target": 2}, ValueError, "got source=3, target=2"),
        ({"source": 0, "target": 4}, ValueError, r"target=4 is out of range .* 0\.\.3"),
        ({"source": -5, "target": 2}, ValueError, r"source=-5 is out of range.*-4\.\.-1"),
        ({"source": 1.0, "target": 2}, TypeError, "source must be an int layer index"),
        ({"source": 0, "target": 2, "k": 17}, ValueError, "k must be between 1 and 16"),
        ({"source": 0, "target": 2, "k": 0}, ValueError, "k must be between 1 and 16"),
        (
            {"source": 0, "target": 2, "target_positions": 0},
            ValueError,
            "positions must be at least 1",
        ),
        (
            {"source": 0, "target": 2, "target_positions": 9},
            ValueError,
            r"positions=9 is longer than the shortest prompt \(8 tokens\)",
        ),
        (
            {"source": 0, "target": 2, "source_site": "hook_mlp"},
            ValueError,
            "unknown site 'hook_mlp'.*Did you mean 'hook_mlp_",
        ),
        (
            {"source": 0, "target": 2, "target_site": "resid_post"},
            ValueError,
            "Did you mean 'hook_resid_post'",
        ),
        ({"source": 0, "target": 2, "tol": -1.0}, ValueError, "tol must be a positive"),
        ({"source": 0, "target": 2, "max_iters": 0}, ValueError, "max_iters must be at least 1"),
        ({"source": 0, "target": 2, "block_size": 3}, ValueError, "block_size must be"),
        (
            {"source": 0, "target": 2, "jvp_method": "fwd"},
            ValueError,
            r"jvp_method must be one of \('reverse', 'forward'\)",
        ),
    ],
)
def test_bad_arguments(
    model: Any, tokens: torch.Tensor, kwargs: dict, error: type, message: str
) -> None:
    with no_forward_pass(model), pytest.raises(error, match=message):
        tps.power_steer(model, tokens, **kwargs)


@pytest.mark.parametrize(
    ("prompts", "error", "message"),
    [
        ([], ValueError, "empty list"),
        ("", ValueError, "prompt 0 is empty"),
        (["the cat", "  "], ValueError, "prompt 1 is empty"),
        (torch.zeros(0, dtype=torch.long), ValueError, "non-empty"),
        (torch.ones(2, 3), TypeError, "integer ids"),
        (42, TypeError, "a string, a list of strings, or an integer token tensor"),
        (["the cat", 3], TypeError, "a string, a list of strings"),
    ],
)
def test_bad_prompts(text_model: Any, prompts: Any, error: type, message: str) -> None:
    with no_forward_pass(text_model), pytest.raises(error, match=message):
        tps.LayerJacobian(text_model, prompts, source=0, target=1)


def test_string_prompt_without_tokenizer(models: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="no tokenizer.*token tensor"):
        tps.LayerJacobian(models["native_bridge"], "the cat", source=0, target=1)


def test_not_a_transformer_lens_model(tokens: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        tps.power_steer(torch.nn.Linear(3, 3), tokens, source=0, target=1)


def test_training_mode_with_dropout_is_refused(
    models: dict[str, Any], tokens: torch.Tensor
) -> None:
    model = copy.deepcopy(models["hf_bridge"]).train()
    with pytest.raises(ValueError, match=r"dropout.*model\.eval\(\)"):
        tps.LayerJacobian(model, tokens, source=0, target=1)
    model.eval()
    tps.LayerJacobian(model, tokens, source=0, target=1)  # fine once in eval mode


def test_non_finite_activations_name_the_hook(models: dict[str, Any], tokens: torch.Tensor) -> None:
    model = copy.deepcopy(models["native_bridge"])
    with torch.no_grad():
        next(p for p in model.blocks[1].mlp.parameters() if p.ndim == 2).fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite activations .* at blocks.1.hook_mlp_out"):
        tps.LayerJacobian(model, tokens, source=1, target=2)
    with pytest.raises(ValueError, match="non-finite activations .* at blocks.2.hook_mlp_out"):
        tps.LayerJacobian(model, tokens, source=0, target=2)


def test_unknown_site_lists_valid_choices(models: dict[str, Any], tokens: torch.Tensor) -> None:
    with pytest.raises(ValueError) as info:
        tps.LayerJacobian(models["native_bridge"], tokens, 0, 1, source_site="mlp_out")
    message = str(info.value)
    assert "'hook_mlp_out'" in message and "blocks.0.mlp_out" in message
    assert "model.hook_dict" in message
