"""Chat prompts: rendered by the tokenizer's own template, BOS not doubled, positions from
the last real token."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tl_powersteer.adapters import ModelAdapter

# A template in the style of Gemma's: it writes the BOS token itself.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> "
    "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "i liked it"},
    {"role": "user", "content": "the movie was good"},
]


@pytest.fixture
def chat_model(text_model: Any) -> Any:
    model = copy.deepcopy(text_model)
    model.tokenizer.chat_template = TEMPLATE
    return model


def test_chat_prompt_is_the_templates_rendering(chat_model: Any) -> None:
    text = tps.chat_prompt(chat_model, MESSAGES, assistant_prefix="so")
    expected = chat_model.tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert text == expected + "so"
    assert tps.chat_prompt(chat_model, "the cat", add_generation_prompt=False) == (
        "<bos>user the cat <eos> "
    )


def test_a_rendered_prompt_keeps_one_bos(chat_model: Any) -> None:
    """The template writes BOS; the model would prepend another to a plain prompt."""
    text = tps.chat_prompt(chat_model, MESSAGES)
    ids = chat_model.tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    batch = ModelAdapter(chat_model).tokenize([text, "the cat"])
    assert batch.tokens[0, : batch.lengths[0]].tolist() == list(ids)
    assert batch.tokens[0].tolist().count(chat_model.tokenizer.bos_token_id) == 1
    bos = chat_model.tokenizer.bos_token_id
    plain = chat_model.tokenizer("the cat", add_special_tokens=False).input_ids
    assert batch.tokens[1, :3].tolist() == [bos, *plain]


def test_chat_prompts_work_where_prompts_do(chat_model: Any) -> None:
    """Target positions count from the rendered prompt's last token: the Jacobian of a
    chat prompt equals that of its token tensor."""
    text = tps.chat_prompt(chat_model, MESSAGES, assistant_prefix="so")
    tokens = ModelAdapter(chat_model).tokenize(text).tokens
    a = tps.power_steer(chat_model, [text], 0, 2, k=2, target_positions=2)
    b = tps.power_steer(chat_model, tokens, 0, 2, k=2, target_positions=2)
    torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-10, atol=0)
    table = tps.effect(chat_model, [text], tps.random_vectors(16, 1, "hook_mlp_out", 1), [1.0],
                       progress=False)  # fmt: skip
    assert len(table) == 2


@pytest.mark.parametrize(
    ("messages", "kwargs", "error", "message"),
    [
        ([], {}, TypeError, "non-empty list"),
        ([{"role": "robot", "content": "x"}], {}, ValueError, "role 'robot'; choose from system"),
        ([{"role": "user"}], {}, TypeError, "exactly the keys 'role' and 'content'"),
        ([{"role": "user", "content": 3}], {}, TypeError, "content must be a string"),
        ("x", {"assistant_prefix": "Sure", "add_generation_prompt": False}, ValueError,
         "needs add_generation_prompt=True"),
    ],
)  # fmt: skip
def test_bad_messages(
    chat_model: Any, messages: Any, kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        tps.chat_prompt(chat_model, messages, **kwargs)


def test_a_model_without_a_chat_template(text_model: Any) -> None:
    with pytest.raises(ValueError, match="has no chat template.*'smollm2-135m-instruct'"):
        tps.chat_prompt(text_model, "hi")
