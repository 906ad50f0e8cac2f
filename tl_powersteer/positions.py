"""Which tokens get a steering vector, counted in the full sequence.

Positions are counted in the full sequence, prompt then generated tokens, also when
``generate`` feeds one token at a time through a KV cache: ``"all"``, ``"prompt"`` (the
prompt's tokens), ``"generated"`` (tokens produced after the prompt), an int (one prompt
position; negative counts from the prompt's end) or a slice (its start inside the prompt;
an open end reaches into the generated tokens). ``SequenceTracker`` follows a generation
through its forward passes, with or without a KV cache, so that each pass knows where its
tokens sit.

>>> from tl_powersteer.positions import position_mask
>>> position_mask("generated", offset=3, length=4, prompt_length=5).tolist()
[0.0, 0.0, 1.0, 1.0]
>>> position_mask(-1, offset=0, length=5, prompt_length=5).tolist()
[0.0, 0.0, 0.0, 0.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .adapters import TokenBatch
from .checks import is_int

__all__ = [
    "POSITION_CHOICES",
    "Positions",
    "SequenceTracker",
    "check_positions",
    "check_positions_fit",
    "position_mask",
    "position_weights",
]

POSITION_CHOICES = ("all", "prompt", "generated")
Positions = str | int | slice


def check_positions(positions: Any) -> None:
    if isinstance(positions, str):
        if positions not in POSITION_CHOICES:
            raise ValueError(
                f"positions must be one of {POSITION_CHOICES}, an int or a slice; got {positions!r}"
            )
        return
    if isinstance(positions, slice):
        for part in (positions.start, positions.stop, positions.step):
            if part is not None and (not is_int(part)):
                raise TypeError(f"positions slice bounds must be ints or None, got {positions}")
        if positions.step is not None and positions.step < 1:
            raise ValueError(f"positions slice step must be positive, got {positions.step}")
        return
    if not is_int(positions):
        raise TypeError(
            f"positions must be one of {POSITION_CHOICES}, an int or a slice; "
            f"got {type(positions).__name__}"
        )


def check_positions_fit(positions: Positions, prompt_length: int) -> None:
    """Refuse an int or slice start outside a prompt of ``prompt_length`` tokens."""
    check_positions(positions)
    index = positions.start if isinstance(positions, slice) else positions
    if isinstance(index, int) and not -prompt_length <= index < prompt_length:
        raise ValueError(
            f"positions={positions!r} does not fit a prompt of {prompt_length} tokens: "
            f"use an index in {-prompt_length}..{prompt_length - 1}, 'prompt', 'generated' or 'all'"
        )


def position_mask(
    positions: Positions, offset: int, length: int, prompt_length: int
) -> Float[Tensor, " length"]:
    """1.0 where absolute positions ``offset .. offset + length - 1`` are steered."""
    pos = torch.arange(offset, offset + length)
    if positions == "all":
        keep = torch.ones(length, dtype=torch.bool)
    elif positions == "prompt":
        keep = pos < prompt_length
    elif positions == "generated":
        keep = pos >= prompt_length
    elif isinstance(positions, slice):
        start = positions.start or 0
        start = start + prompt_length if start < 0 else start
        stop = positions.stop
        if stop is not None and stop < 0:
            stop += prompt_length
        keep = pos >= start
        if stop is not None:
            keep &= pos < stop
        keep &= (pos - start) % (positions.step or 1) == 0
    else:
        assert isinstance(positions, int)
        keep = pos == (positions + prompt_length if positions < 0 else positions)
    return keep.float()


class SequenceTracker:
    """Where each forward pass sits in its sequence, for position-dependent steering.

    A pass either starts a sequence (no KV cache: every token from position 0) or extends
    one through a cache (offset = tokens seen). A full pass whose first-block input begins
    with the current prompt's is a cache-less generation step: the prompt keeps its length.
    Any other full pass is a new prompt.
    """

    def __init__(self, positions: Positions):
        self.positions = positions
        self.prompt: Tensor | None = None
        self.prompt_length = 0
        self.seen = 0
        self.offset = 0
        self.length = 0
        self._before: tuple[Any, ...] = ()
        self._input: Tensor | None = None

    def _decide(self, cached: bool) -> None:
        x = self._input
        assert x is not None
        n = x.shape[1]
        if cached:
            self.offset, self.seen = self.seen, self.seen + n
            return
        self.offset, self.seen = 0, n
        p = self.prompt
        continues = (
            p is not None
            and p.shape[0] == x.shape[0]
            and n > p.shape[1]
            and torch.allclose(x[:, : p.shape[1]], p, rtol=1e-5, atol=1e-6)
        )
        if not continues:
            check_positions_fit(self.positions, n)
            self.prompt, self.prompt_length = x.detach().clone(), n

    def on_input(self, act: Tensor, hook: Any) -> None:
        self._before = (self.prompt, self.prompt_length, self.seen)
        self._input = act.detach()
        self.length = act.shape[1]
        # Provisional until the attention scores say whether a cache is in use.
        self._decide(cached=self.prompt is not None and act.shape[1] == 1)

    def on_scores(self, scores: Tensor, hook: Any) -> None:
        cached = scores.shape[-1] > scores.shape[-2]
        if cached != (self.offset > 0):
            self.prompt, self.prompt_length, self.seen = self._before
            self._decide(cached)

    def mask(self) -> Tensor:
        return position_mask(self.positions, self.offset, self.length, self.prompt_length)


def position_weights(batch: TokenBatch, positions: Positions) -> Tensor:
    """Steering weights of a batch of prompts: ``positions`` per prompt, real tokens only."""
    rows = []
    for length in batch.lengths.tolist():
        check_positions_fit(positions, length)
        row = position_mask(positions, 0, batch.tokens.shape[1], length)
        row[length:] = 0
        rows.append(row)
    return torch.stack(rows)
