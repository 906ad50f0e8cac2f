"""The atlas's arguments, checked and resolved before any forward pass.

``plan_atlas`` turns ``sensitivity_atlas``'s arguments into an ``AtlasPlan``: the adapter
and token batch every later step shares, the layers and pairs, the method (``"auto"``
resolved), and the sketch's rank and matrix-product precision.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import ModelAdapter, TokenBatch
from ..checks import is_int
from ..io import check_destination
from ..jacobian import check_chunk_size, check_matmul_dtype, cpu_multiplies_bfloat16
from ..linalg import check_iteration_args
from .sketch import basis_widths, sketch_widths

__all__ = ["ATLAS_METHODS", "AtlasPlan", "choose_method", "plan_atlas"]

ATLAS_METHODS = ("auto", "exact", "power", "sketch")
# "auto" runs the exact method up to this d_model.
EXACT_UP_TO = 1024
# Typical iterations of the power method at the default tolerance (Gemma 3 270M: a
# median of 5 and a mean of 5.1 over 18 pairs with k = 4).
POWER_ITERATIONS = 5

Layers = Sequence[int] | slice | None


@dataclass
class AtlasPlan:
    adapter: ModelAdapter
    batch: TokenBatch
    sources: list[int]
    targets: list[int]
    pairs: list[tuple[int, int]]
    source_hooks: list[str]
    checkpoint: Path | None
    method: str
    sketch_rank: int
    matmul_dtype: torch.dtype


def _layer_list(adapter: ModelAdapter, layers: Layers, what: str, default: range) -> list[int]:
    if layers is None:
        return list(default)
    if isinstance(layers, int) or not isinstance(layers, (Sequence, slice)):
        raise TypeError(f"{what} must be a list of layer indices, got {layers!r}")
    if isinstance(layers, Sequence) and not layers:
        raise ValueError(f"{what} is empty: give at least one layer or None for all")
    return adapter.resolve_layers(layers, what, merge_repeats=True)


def choose_method(
    d_model: int, sources: list[int], targets: list[int], k: int, sketch_rank: int
) -> str:
    """What ``method="auto"`` runs: ``"exact"`` up to d_model 1024; beyond that
    ``"power"`` unless the sketch needs under a quarter of its products."""
    if d_model <= EXACT_UP_TO:
        return "exact"
    # The sketch is approximate: only worth it when it saves a lot over the power method.
    # Both costs count products through the layers, per layer.
    n_pairs = sum(t > s for s in sources for t in targets)
    power_cost = n_pairs * 2 * POWER_ITERATIONS * (k + 5)
    co_range, _ = sketch_widths(sources, targets, sketch_rank, k, d_model)
    basis, refining = basis_widths(sketch_rank, d_model)
    sketch_cost = sum(co_range.values()) + basis * len(sources) + refining * len(co_range)
    return "power" if power_cost <= 4 * sketch_cost else "sketch"


def plan_atlas(
    adapter: ModelAdapter,
    batch: TokenBatch,
    *,
    sources: Layers,
    targets: Layers,
    k: int,
    method: str,
    source_site: str,
    target_site: str,
    target_positions: int,
    checkpoint: str | os.PathLike[str] | None,
    sketch_rank: int | None,
    sketch_matmul_dtype: torch.dtype | None,
    tol: float,
    max_iters: int,
    chunk_size: int | None,
) -> AtlasPlan:
    """Every check of ``sensitivity_atlas``'s arguments, before any forward pass."""
    n = adapter.n_layers
    if method not in ATLAS_METHODS:
        raise ValueError(f"method must be one of {ATLAS_METHODS}, got {method!r}")
    if not is_int(k) or not 1 <= k < adapter.d_model:
        raise ValueError(
            f"k must be an int between 1 and d_model - 1 = {adapter.d_model - 1}, got {k!r}"
        )
    # The power method iterates on k + 1 vectors (σ_{k+1} gives the spectral gap).
    check_iteration_args(k + 1, adapter.d_model, block_size=None, tol=tol, max_iters=max_iters)
    check_chunk_size(chunk_size)
    source_layers = _layer_list(adapter, sources, "sources", range(n - 1))
    target_layers = _layer_list(adapter, targets, "targets", range(1, n))
    pairs = [(s, t) for s in source_layers for t in target_layers if t > s]
    if not pairs:
        raise ValueError(
            f"no pair with target > source among sources {source_layers} and targets "
            f"{target_layers}"
        )
    source_layers = sorted({s for s, _ in pairs})
    source_hooks = [adapter.hook_name(s, source_site) for s in source_layers]
    for t in target_layers:
        adapter.hook_name(t, target_site)
    ckpt = (
        None if checkpoint is None else check_destination(checkpoint, ".safetensors", "checkpoint")
    )
    # Layer Jacobians have heavy spectral tails, so the sketch needs a wide basis; how
    # this default was chosen: docs/concepts/atlas.md.
    default_rank = min(max(3 * k + 2, adapter.d_model // 48), adapter.d_model)
    r = default_rank if sketch_rank is None else sketch_rank
    if not is_int(r) or not k < r <= adapter.d_model:
        raise ValueError(
            f"sketch_rank must be an int between k + 1 = {k + 1} and d_model = "
            f"{adapter.d_model}, got {r!r}"
        )
    if method == "auto":
        method = choose_method(adapter.d_model, source_layers, target_layers, k, r)
    check_matmul_dtype(sketch_matmul_dtype, adapter.dtype, "sketch_matmul_dtype")
    matmul_dtype = sketch_matmul_dtype
    if matmul_dtype is None:
        # Measured on Gemma 3 270M only (docs/concepts/atlas.md); on a GPU, not measured.
        cpu = adapter.device.type == "cpu" and cpu_multiplies_bfloat16()
        matmul_dtype = torch.bfloat16 if cpu and adapter.dtype == torch.float32 else adapter.dtype
    shortest = int(batch.lengths.min())
    if not is_int(target_positions) or not 1 <= target_positions <= shortest:
        raise ValueError(
            f"target_positions must be an int between 1 and {shortest} (the shortest "
            f"prompt), got {target_positions!r}"
        )
    return AtlasPlan(
        adapter, batch, source_layers, target_layers, pairs, source_hooks, ckpt, method, r,
        matmul_dtype,
    )  # fmt: skip
