"""What the user reads: generated text is the model's own greedy continuation.

Every model class and HuggingFace architecture here generates with its KV cache, without
it, and by a plain argmax loop over full forward passes with the vector added by hand at
the positions the rule names; the three must agree token for token, unsteered and
steered. A faulty cache (transformers 5.24.0 under TransformerLens 4.3) fails these.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.helpers import break_kv_cache
from tests.reference import RELATIVE_SCALE, assert_generation_is_greedy, greedy_loop
from tl_powersteer.adapters import ModelAdapter
from tl_powersteer.steering import batch_generations

pytestmark = pytest.mark.usefixtures("no_grad")

PROMPT = torch.tensor([[1, 9, 13, 11, 34, 26, 45]])
N_NEW = 10


def random_vector(model: Any, layer: int = 1) -> tps.SteeringVector:
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(model.cfg.d_model, generator=gen, dtype=torch.float64)
    return tps.SteeringVector(direction, layer, "hook_resid_post", "random")


@pytest.mark.parametrize("rule", list(RELATIVE_SCALE))
def test_cached_generation_equals_cache_free_and_the_argmax_loop(
    generation_model: Any, rule: Any
) -> None:
    assert_generation_is_greedy(generation_model, PROMPT, rule, N_NEW, layer=1)


def test_hooked_transformer_without_tokenizer_generates_its_own_continuation(
    generation_models: dict[str, Any],
) -> None:
    """TransformerLens 3.9 misplaces position embeddings in its cached steps when the model
    has no tokenizer (as a course's toy model often has not); the adapter avoids the cache."""
    if "hooked, no tokenizer" not in generation_models:
        pytest.skip("HookedTransformer is not available in this TransformerLens version")
    model = generation_models["hooked, no tokenizer"]
    expected = greedy_loop(model, PROMPT, N_NEW, "blocks.0.hook_resid_post", 0, torch.ones)
    out = ModelAdapter(model).generate(
        PROMPT, max_new_tokens=N_NEW, greedy=True, use_cache=True, stop_at_eos=False
    )
    assert out.tolist() == expected.tolist()


def test_greedy_mismatch_finds_the_first_wrong_token(generation_model: Any) -> None:
    adapter = ModelAdapter(generation_model)
    out = adapter.generate(PROMPT, max_new_tokens=N_NEW, greedy=True, stop_at_eos=False)
    n = PROMPT.shape[1]
    assert adapter.greedy_mismatch(out, n) is None
    assert adapter.greedy_mismatch(PROMPT, n) is None  # nothing generated
    wrong = out.clone()
    wrong[0, n + 4] = (out[0, n + 4] + 1) % 64
    assert adapter.greedy_mismatch(wrong, n) == (4, int(wrong[0, n + 4]), int(out[0, n + 4]))


def test_generate_steered_refuses_text_the_model_did_not_compute(
    generation_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = generation_models["gemma3"]
    v, prompt = random_vector(model), "w5 w9 w12 w7 w30 w22 w41"
    table = tps.generate_steered(model, prompt, v, 3.0, max_new_tokens=N_NEW, progress=False)
    tokens = ModelAdapter(model).tokenize(prompt).tokens
    baseline = greedy_loop(model, tokens, N_NEW, v.hook_name, 0 * v.direction, torch.ones)
    assert table.text[0] == ModelAdapter(model).decode(baseline[0, tokens.shape[1] :])
    break_kv_cache(monkeypatch)
    with pytest.raises(RuntimeError, match=r"KV cache .* broken .*transformers<5\.24"):
        tps.generate_steered(model, prompt, v, 3.0, max_new_tokens=N_NEW, progress=False)
    # Without the cache there is nothing to refuse.
    again = tps.generate_steered(
        model, prompt, v, 3.0, max_new_tokens=N_NEW, use_cache=False, progress=False
    )
    assert again.text.tolist() == table.text.tolist()
    break_kv_cache(monkeypatch, also_without=True)
    with pytest.raises(RuntimeError, match="without the cache disagrees .* please report it"):
        tps.generate_steered(
            model, prompt, v, 3.0, max_new_tokens=N_NEW, use_cache=False, progress=False
        )


def test_generate_hides_the_cache_deprecation_but_not_other_warnings(
    generation_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = generation_models["gpt2"]
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        warnings.warn("`past_key_values` is deprecated; use `cache`", FutureWarning, stacklevel=1)
        warnings.warn("the pad token is not set", UserWarning, stacklevel=1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ModelAdapter(model).generate(PROMPT, max_new_tokens=2, greedy=True)
    messages = [str(w.message) for w in seen]
    assert "the pad token is not set" in messages
    assert not any("past_key_values" in m for m in messages)


def test_batch_generations_are_each_rows_own_greedy_continuation(
    generation_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows generated together, each with its own delta, equal the argmax loop of full
    passes with that delta alone, and ``generate_steered`` at the same scale."""
    adapter = ModelAdapter(generation_model)
    v = random_vector(generation_model)
    gen = torch.Generator().manual_seed(5)
    deltas = torch.cat(
        [
            torch.zeros(1, adapter.d_model, dtype=torch.float64),
            torch.tensor([[3.0], [-3.0], [8.0]], dtype=torch.float64) * v.direction,
            4.0 * torch.randn(6, adapter.d_model, generator=gen, dtype=torch.float64),
        ]
    )
    texts = batch_generations(
        generation_model, PROMPT, v.hook_name, deltas, max_new_tokens=N_NEW, chunk=4
    )
    n, eos = PROMPT.shape[1], adapter.eos_token_id
    for text, delta in zip(texts, deltas, strict=True):
        row = greedy_loop(generation_model, PROMPT, N_NEW, v.hook_name, delta, torch.ones)[0, n:]
        if eos is not None and bool((row == eos).any()):
            row = row[: int((row == eos).nonzero()[0, 0]) + 1]
        assert text == adapter.decode(row)
    assert len(set(texts)) > 3  # the deltas change the text, so rows are not mixed up
    table = tps.generate_steered(
        generation_model, PROMPT[0], v, [3.0], max_new_tokens=N_NEW, progress=False
    )
    assert table.text.tolist() == texts[:3]
    break_kv_cache(monkeypatch)
    with pytest.raises(RuntimeError, match=r"token 1 of the continuation of row 0: .*KV cache"):
        batch_generations(generation_model, PROMPT, v.hook_name, deltas, max_new_tokens=N_NEW)
