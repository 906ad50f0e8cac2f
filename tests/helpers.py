"""Shared test helpers: faults injected the way they show in the wild."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tl_powersteer.adapters import ModelAdapter


def break_kv_cache(monkeypatch: pytest.MonkeyPatch, *, also_without: bool = False) -> None:
    """Generation with the cache (or, ``also_without``, any generation) repeats its first
    new token, as under transformers 5.24.0."""
    original = ModelAdapter.generate

    def generate(self: ModelAdapter, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = original(self, tokens, **kwargs)
        if also_without or kwargs.get("use_cache", True):
            out[:, tokens.shape[1] :] = out[:, tokens.shape[1], None]
        return out

    monkeypatch.setattr(ModelAdapter, "generate", generate)
