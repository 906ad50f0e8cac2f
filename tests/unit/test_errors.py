"""Bad input is refused with a clear message before any forward pass runs."""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np
import pytest
import torch

import tl_powersteer as tps
from tests.helpers import no_forward_pass
from tl_powersteer.adapters import ModelAdapter
from tl_powersteer.compare import find_vectors


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
        ({"source": 1.0, "target": 2}, TypeError, "source must be one int layer index"),
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


NOT_RESIDUAL = ["attn.hook_pattern", "attn.hook_q", "ln2.hook_scale"]


def _site_entry_points(site: str) -> dict[str, Any]:
    vector = tps.SteeringVector(torch.ones(16), layer=1, site=site, method="test")
    return {
        "power_steer source": lambda m, t: tps.power_steer(m, t, 0, 2, k=2, source_site=site),
        "power_steer target": lambda m, t: tps.power_steer(m, t, 0, 2, k=2, target_site=site),
        "atlas": lambda m, t: tps.sensitivity_atlas(m, t, k=2, source_site=site, progress=False),
        "caa_vector": lambda m, t: tps.caa_vector(m, t[:1], t[1:], 1, site=site),
        "typical_norm": lambda m, t: tps.typical_norm(m, t, 1, site),
        "effect": lambda m, t: tps.effect(m, t, vector, [1.0], progress=False),
    }


@pytest.mark.parametrize("site", NOT_RESIDUAL)
@pytest.mark.parametrize("entry", list(_site_entry_points("x")))
def test_sites_that_are_not_residual_are_refused(
    model: Any, tokens: torch.Tensor, site: str, entry: str
) -> None:
    """A hook whose activations are not [batch, seq, d_model] fails in the first forward
    pass, naming its shape and the usable sites, and no hook is left behind."""
    adapter = ModelAdapter(model)
    with torch.no_grad():
        model(tokens)  # a bridge adds hooks of its own in its first forward pass
    hooks_before = adapter.hook_count()
    with pytest.raises(ValueError) as info:
        _site_entry_points(site)[entry](model, tokens)
    message = str(info.value)
    assert f"site {site!r} holds activations of shape" in message, message
    assert "not [batch, seq, d_model] with d_model = 16" in message
    usable = message.split("Choose a site whose activations have that shape: ")[1].split(", ")
    assert usable[:5] == ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                          "hook_resid_post"] or set(usable[:5]) == {
        "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"
    }  # fmt: skip
    assert site not in usable
    assert adapter.hook_count() == hooks_before


@pytest.mark.parametrize("site", NOT_RESIDUAL)
def test_steering_at_a_site_that_is_not_residual(
    model: Any, tokens: torch.Tensor, site: str
) -> None:
    vector = tps.SteeringVector(torch.ones(16), layer=1, site=site, method="test")
    adapter = ModelAdapter(model)
    with torch.no_grad():
        model(tokens)  # a bridge adds hooks of its own in its first forward pass
    hooks_before = adapter.hook_count()
    with pytest.raises(ValueError, match=rf"site '{re.escape(site)}' holds activations"):
        with tps.steer(model, vector, 1.0), torch.no_grad():
            model(tokens)
    assert adapter.hook_count() == hooks_before
    with torch.no_grad():  # and the model runs as before
        model(tokens)


def test_a_usable_site_outside_the_usual_names(model: Any, tokens: torch.Tensor) -> None:
    res = tps.power_steer(model, tokens, 0, 2, k=2, source_site="ln2.hook_normalized")
    assert res.k == 2 and bool(torch.isfinite(res.singular_values).all())


INTEGER_KINDS = {
    "numpy": np.int64,
    "numpy int32": np.int32,
    "torch": lambda x: torch.tensor(x),
}


@pytest.mark.parametrize("kind", list(INTEGER_KINDS))
def test_integer_scalars_are_ints(
    model: Any, tokens: torch.Tensor, kind: str, tmp_path: Any
) -> None:
    """NumPy and torch integer scalars work wherever an int does, and what is stored is an
    int, so results save and print as with ints."""
    as_kind = INTEGER_KINDS[kind]
    plain = tps.power_steer(model, tokens, 0, -1, k=2, target_positions=3, seed=1)
    other = tps.power_steer(
        model, tokens, as_kind(0), as_kind(-1), k=as_kind(2), target_positions=as_kind(3),
        seed=as_kind(1), block_size=as_kind(6), max_iters=as_kind(50),
    )  # fmt: skip
    torch.testing.assert_close(other.vectors, plain.vectors, rtol=0, atol=0)
    for value in (other.source, other.target, other.target_positions, other.seed):
        assert type(value) is int
    other.save(tmp_path / "v.safetensors")
    vector = other.steering_vector(as_kind(1))
    assert type(vector.layer) is int and vector.metadata["rank"] == 1
    assert (
        type(
            tps.SteeringVector(
                torch.ones(16), layer=as_kind(2), site="hook_mlp_out", method="m"
            ).layer
        )
        is int
    )
    atlas = tps.sensitivity_atlas(
        model, tokens, sources=[as_kind(0)], targets=slice(as_kind(1), None), k=as_kind(2),
        progress=False,
    )  # fmt: skip
    assert atlas.pairs() == [(0, 1), (0, 2), (0, 3)]
    melbo = tps.melbo(model, tokens, as_kind(0), as_kind(2), n_vectors=as_kind(1), radius=1.0,
                      steps=as_kind(3), progress=False)  # fmt: skip
    assert (melbo.source, melbo.target) == (0, 2) and type(melbo.source) is int


@pytest.mark.parametrize(
    "value",
    [True, 1.0, np.float64(1.0), torch.tensor(1.0), torch.tensor([1]), torch.tensor(True), "1"],
)
def test_what_is_not_an_integer(model: Any, tokens: torch.Tensor, value: Any) -> None:
    with no_forward_pass(model), pytest.raises((TypeError, ValueError), match="k must be"):
        tps.power_steer(model, tokens, 0, 2, k=value)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m, t: tps.power_steer(m, t, [0], 2),
            r"source must be one int layer index, got list \[0\]",
        ),
        (lambda m, t: tps.power_steer(m, t, 0, [2, 3]), "target must be one int layer index"),
        (lambda m, t: tps.power_steer(m, t, slice(0, 2), 3), "this takes one layer"),
        (lambda m, t: tps.melbo(m, t, [0, 1], 2, radius=1.0), "source must be one int layer"),
        (
            lambda m, t: tps.typical_norm(m, t, [1], "hook_mlp_out"),
            "layer must be one int layer index",
        ),
        (lambda m, t: tps.caa_vector(m, t[:1], t[1:], [1]), "layer must be one int layer index"),
        (lambda m, t: find_vectors(m, t, (0,), 2), "source must be one int layer"),
        (
            lambda m, t: tps.SteeringVector(
                torch.ones(16), layer=[1], site="hook_mlp_out", method="m"
            ),
            "layer must be an int",
        ),
    ],
)
def test_a_list_where_one_layer_is_documented(
    model: Any, tokens: torch.Tensor, call: Any, message: str
) -> None:
    with no_forward_pass(model), pytest.raises(TypeError, match=message):
        call(model, tokens)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([[1, 4, 6, 8, 0, 0]], "token row 0 ends with the pad token id 0"),
        ([[1, 4, 6, 8], [1, 4, 0, 0]], "token row 1 ends with the pad token id 0"),
        ([[0, 0, 1, 4, 6, 8]], "token row 0 starts with the pad token id 0"),
        ([[1, 4, 6, 99]], r"token ids must be in 0\.\.\d+"),
        ([[1, -1, 6, 8]], r"token ids must be in 0\.\.\d+"),
    ],
)
def test_padded_or_foreign_token_tensors_are_refused(
    text_model: Any, tokens: list, message: str
) -> None:
    batch = torch.tensor(tokens)
    for call in (
        lambda: tps.power_steer(text_model, batch, 0, 2, k=2, target_positions=1),
        lambda: tps.caa_vector(text_model, batch, batch, 1),
        lambda: tps.effect(text_model, batch, tps.random_vectors(16, 1, "hook_mlp_out", 1), [1.0]),
    ):
        with no_forward_pass(text_model), pytest.raises(ValueError, match=message):
            call()


def test_a_pad_id_inside_a_row_is_a_token(text_model: Any) -> None:
    res = tps.power_steer(text_model, torch.tensor([[1, 4, 0, 8, 9]]), 0, 2, k=2)
    assert res.k == 2


def test_pads_are_fine_in_string_prompts(text_model: Any) -> None:
    """Strings are padded and masked by the library: the refusal is for tensors only."""
    res = tps.power_steer(text_model, ["the cat sat on the mat", "i liked it"], 0, 2, k=2)
    assert res.k == 2


@pytest.mark.parametrize("answers", [("cat", "cat"), (6, 6), ("cat", 6)])
def test_two_answers_that_are_the_same_token(text_model: Any, answers: tuple) -> None:
    vector = tps.random_vectors(16, 1, "hook_mlp_out", 1)
    prompts = ["the cat sat on the mat", "i liked it"]
    calls = [
        lambda: tps.effect(text_model, prompts, vector, [1.0], metric="logit_diff",
                           answers=answers),
        lambda: tps.rank_vectors(text_model, prompts, vector, answers=answers),
        lambda: tps.compare_methods(text_model, prompts, 0, 2, k=2, answers=answers),
    ]  # fmt: skip
    for call in calls:
        with no_forward_pass(text_model), pytest.raises(ValueError, match="the same token"):
            call()


COMPOSITE_PROMPTS = ["the cat sat on the mat", "the movie was not very good", "i liked it"]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"caa_position": 40}, ValueError, "position=40 does not fit"),
        ({"holdout": 1.5}, ValueError, "holdout must be a fraction"),
        ({"controls": -1}, ValueError, "controls must be a non-negative int"),
        ({"controls": 1.5}, ValueError, "controls must be a non-negative int"),
        ({"seed": 0.5}, TypeError, "seed must be an int"),
        ({"melbo_steps": 0}, ValueError, "melbo_steps must be at least 1"),
        ({"melbo_radius": -2.0}, ValueError, "melbo_radius must be positive"),
        ({"k": 17}, ValueError, "k must be between 1 and 16"),
        ({"target_positions": 40}, ValueError, "target_positions=40 is longer"),
        ({"target_site": "ln2.hook_nope"}, ValueError, "unknown site 'ln2.hook_nope'"),
        ({"kl": -1.0}, ValueError, "KL budget must be positive"),
        ({"metric": "kl"}, ValueError, "measures effects at a fixed KL"),
        ({"metric": "logprob"}, ValueError, "needs continuation"),
        ({"answers": ("cat",)}, ValueError, "needs answers=\\(A, B\\)"),
    ],
)
def test_composite_options_are_checked_before_any_work(
    text_model: Any, options: dict, error: type, message: str
) -> None:
    """compare_methods runs three methods and then ranks them: an option of the last step
    fails before the first one runs."""
    kwargs: dict[str, Any] = {
        "k": 2, "positive": ["the movie was good"], "negative": ["the movie was bad"],
        "answers": ("good", "bad"), "melbo_steps": 5, "progress": False,
    }  # fmt: skip
    kwargs.update(options)
    with no_forward_pass(text_model), pytest.raises(error, match=message):
        tps.compare_methods(text_model, COMPOSITE_PROMPTS, 0, 2, **kwargs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"methods": ["melbo"], "k": 17}, "n_vectors must be an int between 1 and d_model = 16"),
        ({"methods": ["power_steering"], "tol": 0.0}, "tol must be a positive"),
        ({"methods": ["power_steering"], "jvp_method": "x"}, "jvp_method must be one of"),
        ({"caa_position": -40}, "position=-40 does not fit"),
        ({"seed": "0"}, "seed must be an int"),
    ],
)
def test_find_vectors_checks_every_method_first(
    text_model: Any, options: dict, message: str
) -> None:
    kwargs: dict[str, Any] = {
        "k": 2, "positive": ["the movie was good"], "negative": ["the movie was bad"],
        "melbo_steps": 5, "progress": False,
    }  # fmt: skip
    kwargs.update(options)
    with no_forward_pass(text_model), pytest.raises((TypeError, ValueError), match=message):
        find_vectors(text_model, COMPOSITE_PROMPTS, 0, 2, **kwargs)


def test_melbo_checks_its_options_before_the_first_pass(model: Any, tokens: torch.Tensor) -> None:
    with no_forward_pass(model), pytest.raises(ValueError, match="n_vectors must be an int"):
        tps.melbo(model, tokens, 0, 2, n_vectors=17, radius=1.0)


SEEDED = {
    "power_steer": lambda m, t, seed: tps.power_steer(m, t, 0, 2, k=2, seed=seed),
    "sensitivity_atlas": lambda m, t, seed: tps.sensitivity_atlas(m, t, k=1, seed=seed),
    "melbo": lambda m, t, seed: tps.melbo(m, t, 0, 2, radius=1.0, seed=seed),
    "effect": lambda m, t, seed: tps.effect(
        m, t, tps.random_vectors(16, 1, "hook_mlp_out", 1), [1.0], controls=1, seed=seed
    ),
    "generate_steered": lambda m, t, seed: tps.generate_steered(
        m, t[:1], tps.random_vectors(16, 1, "hook_mlp_out", 1), [1.0], seed=seed
    ),
    "random_vectors": lambda m, t, seed: tps.random_vectors(16, 1, "hook_mlp_out", 1, seed=seed),
}


@pytest.mark.parametrize("entry", list(SEEDED))
@pytest.mark.parametrize("seed", [0.5, "1", None])
def test_a_seed_must_be_an_int(model: Any, tokens: torch.Tensor, entry: str, seed: Any) -> None:
    with no_forward_pass(model), pytest.raises(TypeError, match="seed must be an int"):
        SEEDED[entry](model, tokens, seed)


def test_an_answer_outside_the_vocabulary(text_model: Any) -> None:
    vector = tps.random_vectors(16, 1, "hook_mlp_out", 1)
    with no_forward_pass(text_model), pytest.raises(ValueError, match="not in the model's vocab"):
        tps.effect(
            text_model, "the cat", vector, [1.0], metric="logit_diff", answers=("zzz", "cat")
        )
    # The unknown token itself, asked for by name, is a token like any other.
    tps.effect(text_model, "the cat", vector, [1.0], metric="logit_diff", answers=("<unk>", "cat"))
