"""Chat prompts: messages rendered through the tokenizer's own chat template.

Instruct models are steered behind their chat template; ``chat_prompt`` renders the
messages into the string every entry point takes, exactly as the template writes it, and
``assistant_prefix`` starts the answer, to put the prompt at a fork ("Sure" vs "I can't").

Special tokens are counted as the model's tokenizer counts them: a rendered prompt that
starts with the BOS token's text keeps that one BOS (``ModelAdapter.prompt_tokens``), and
target positions are counted from its last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .adapters import Model, ModelAdapter
from .models import EMBEDDED_MODELS

__all__ = ["ROLES", "chat_prompt"]

ROLES = ("system", "user", "assistant")
Messages = str | Sequence[dict[str, str]]


def _checked(messages: Messages) -> list[dict[str, str]]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise TypeError(
            "messages must be a string (one user message) or a non-empty list of "
            "{'role': ..., 'content': ...} dicts"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise TypeError(
                f"message {i} must be a dict with exactly the keys 'role' and 'content', "
                f"got {message!r}"
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; choose from {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TypeError(f"message {i}'s content must be a string, got {content!r}")
        out.append({"role": role, "content": content})
    return out


def chat_prompt(
    model: Model | ModelAdapter,
    messages: Messages,
    *,
    add_generation_prompt: bool = True,
    assistant_prefix: str = "",
) -> str:
    """``messages`` rendered through the model's chat template, as one prompt string.

    Args:
        model: a model whose tokenizer has a chat template (an instruct model).
        messages: one user message as a string, or a list of ``{"role", "content"}``
            dicts with roles among ``ROLES``.
        add_generation_prompt: end with the template's opening of the assistant's turn,
            so that the next token is the answer's first.
        assistant_prefix: text that starts the answer, after that opening.
    """
    adapter = ModelAdapter.of(model)
    checked = _checked(messages)
    if not isinstance(assistant_prefix, str):
        raise TypeError(f"assistant_prefix must be a string, got {assistant_prefix!r}")
    if assistant_prefix and not add_generation_prompt:
        raise ValueError(
            "assistant_prefix starts the assistant's answer, so it needs add_generation_prompt=True"
        )
    tokenizer: Any = getattr(adapter.model, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        with_template = [m.name for m in EMBEDDED_MODELS.values() if m.chat_template]
        raise ValueError(
            f"the model {adapter.name!r} has no chat template (a base model?), so chat "
            f"prompts cannot be rendered; use an instruct model, e.g. the embedded "
            f"{', '.join(repr(n) for n in with_template)}, or pass plain prompts"
        )
    rendered = tokenizer.apply_chat_template(
        checked, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return str(rendered) + assistant_prefix
