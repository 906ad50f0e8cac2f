"""Sensitivity atlas: the top Power Steering spectra of every (source, target) layer pair.

For each pair s -> t with t > s, J_{s,t} is the Jacobian of ``LayerJacobian``
(source ``blocks.{s}.{source_site}``, target ``blocks.{t}.{target_site}``). The atlas keeps
its top-k singular values σ (and σ_{k+1}, for the spectral gap σ_k / σ_{k+1}) and its top-k
right singular vectors, in tensors indexed by layer number: ``singular_values[s, t]``.

Methods:

* ``"exact"``: per source layer, one chunked, vmapped product with the identity captures
  J_{s,t} for every later target in the same forward pass; then the top of each pair's
  spectrum from its Gram matrix JᵀJ and a float64 Rayleigh-Ritz step.
  Cost: about d_model products per source layer, whatever the number of targets.
* ``"power"``: per pair, block power iteration (``power_steer``'s engine);
  about 2 · iterations · (k + 5) products per pair. Better for few pairs or a wide model.
* ``"sketch"``: randomized sketches shared across pairs. Per target layer, one vmapped VJP
  of a random block Ψ (r columns) gives Ψᵀ J_{s,t} for every earlier source in the same
  backward pass. Per source layer, the top right singular vectors of those co-range
  sketches (each scaled to unit norm, so every target counts) form one orthonormal basis P
  of up to 4r columns, and one vmapped JVP of P gives J_{s,t} P for every later target;
  each pair's top-k come from the SVD of J_{s,t} P, i.e. of J_{s,t} restricted to P (a
  randomized range finder on the row space, Halko, Martinsson & Tropp 2011, whose basis is
  shared by all targets of a source). A refining pass turns to the other side: per target
  layer, the pairs' top 2k directions of J_{s,t} P (scaled alike) give one basis Q of 4r
  columns, one vmapped VJP of Q gives Qᵀ J_{s,t} for every earlier source, and a pair
  keeps that estimate where it holds more of its spectrum. A layer with too few partners
  to fill its basis so (one pair alone, one target for many sources) has its partners'
  sketches widened until it is full, unless all its pairs are short. Last, each pair at
  most three layers apart (the flattest spectra, the cheapest products) takes one block Krylov
  step of its own from the top 2k left directions U of Qᵀ J_{s,t}, whose Uᵀ J_{s,t} the
  refining pass already holds. Cost: about 9r products per layer instead of d_model, plus
  4k products per short pair. In full precision the σ it returns are lower bounds of the
  exact ones (compare with ``"exact"``), and with r = d_model it is exact. For a float32
  model on a CPU that multiplies bfloat16 in hardware, its products run their matrix
  multiplications with bfloat16 factors by default (``sketch_matmul_dtype``): on Gemma 3
  270M, a quarter of the time saved, at a relative error of 0.5% to 1% per product that
  moves the worst pair's error by under 0.1% (but σ may then exceed the exact ones, by up
  to 0.5% there).
* ``"auto"``: ``"exact"`` up to d_model 1024; beyond that ``"power"`` unless the sketch
  needs under a quarter of its products; ``atlas.method`` says which ran.

Finished source layers are written to ``checkpoint`` (atomically) as they complete, so an
interrupted run resumes where it stopped; a checkpoint made with other arguments is refused.

>>> import torch
>>> from transformer_lens.config import TransformerBridgeConfig
>>> from transformer_lens.model_bridge import TransformerBridge
>>> import tl_powersteer as tps
>>> cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_heads=2, n_layers=3, n_ctx=16,
...                               d_vocab=20, d_mlp=16, act_fn="gelu", seed=0)
>>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64)
>>> atlas = tps.sensitivity_atlas(model, torch.tensor([[1, 2, 3, 4, 5]]), k=2, progress=False)
>>> atlas.singular_values.shape, atlas.method
(torch.Size([3, 3, 2]), 'exact')
>>> len(atlas.to_pandas())  # 3 pairs x 2 ranks
6
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .adapters import (
    ModelAdapter,
    Prompts,
    TokenBatch,
    decode_token,
    steered_logits,
)
from .checks import is_int, is_number
from .io import register
from .io import save as save_result
from .jacobian import (
    JacobianGraph,
    check_chunk_size,
    check_matmul_dtype,
    cpu_multiplies_bfloat16,
)
from .linalg import (
    block_power_iteration,
    check_iteration_args,
    shared_basis,
    top_directions,
    top_k_in_basis,
    top_k_of_rows,
    top_k_svd,
)
from .power_steering import power_steering_vector
from .scales import KL_PROBE_FRACTION, KL_SCALE_RANGE, kl_divergence, kl_search, typical_norms
from .vectors import SteeringVector

__all__ = [
    "ATLAS_METHODS",
    "SensitivityAtlas",
    "sensitivity_atlas",
    "token_effects",
    "validate_atlas_arguments",
]

ATLAS_METHODS = ("auto", "exact", "power", "sketch")
_EXACT_UP_TO = 1024
# Columns of each source's shared basis P, as a multiple of the co-range width r. With the
# refining pass and the polish, at r = 14, on three prompts of Gemma 3 270M (21, 13 and 21
# tokens, seeds 0 to 2, 153 pairs each) the worst σ1..σ4 error was 1.6% with 4r against 2.2%
# with 3r (1.9% for 3r with a 5r refining basis, 2.0% for 3r at r = 16, 2.7% for 4r at
# r = 12), for 6% to 10% more time. Alone, without the later passes, a basis is best at
# about 3r, and far better than the single-pass rebuild of Tropp et al. (2017),
# Q (ΨᵀQ)⁺ ΨᵀJ (8% where 3r erred by 2% to 5%, at 256 products per layer).
_BASIS_FACTOR = 4
# Columns of each target's refining basis, as a multiple of r, and the directions of each
# pair's J_{s,t} P (as a multiple of k) that build it. On the same 153 pairs, with 3r and
# 2k the worst error was 1.4% at r = 32 (224 products per layer) and 3.5% at r = 24 (168),
# where the first two passes alone need about 256 for 2.3%. With the short pairs polished, the
# refining basis is worth more than the others: at equal cost, 4r and r = 14 erred by 1.3% to
# 1.7% (three seeds) where 3r and r = 16 erred by 1.6% to 2.1%; its products are also the
# cheaper kind (VJPs, about a quarter cheaper than the JVPs of the shared basis).
_REFINE_FACTOR = 4
_REFINE_DIRECTIONS = 2
# Pairs at most this many layers apart get one block Krylov step of their own from their
# top 2k left directions (4k products each, over at most this many layers). Short hops have
# the flattest spectra (L2 -> L3 of Gemma 3 270M: σ5/σ1 = 0.75) and were the worst pairs of
# the shared passes; on the 153 Gemma pairs at r = 16 the step took the worst error from 5%
# to 1.5%-1.8% (three seeds), for the price of about 8 more products per layer. Taken on
# the left, from the refining pass's Uᵀ J, it needs 4k products where a step on the right
# needs 6k; at r = 14 the worst error was 1.4% to 1.9% (three seeds) for 4% fewer products.
_POLISH_HOPS = 3
# Typical iterations of the power method at the default tolerance (measured on Gemma 3 270M).
_POWER_ITERATIONS = 12


@register()
@dataclass
class SensitivityAtlas:
    """Top-k spectra of every computed (source, target) pair, indexed by layer numbers.

    Entries for pairs that were not computed (target <= source, or outside the requested
    sources/targets) are NaN; ``iterations`` is -1 there and for the exact method.
    ``source_norms[s]`` is the source activation's ``typical_norm`` (robust median L2 norm
    over the prompts' tokens), to compare σ across layers whose activations differ in scale.
    """

    singular_values: Float[Tensor, "n_layers n_layers k"]
    next_singular_value: Float[Tensor, "n_layers n_layers"]
    right_vectors: Float[Tensor, "n_layers n_layers k d_model"]
    iterations: Int[Tensor, "n_layers n_layers"]
    converged: Bool[Tensor, "n_layers n_layers"]
    source_norms: Float[Tensor, " n_layers"]
    method: str
    sources: list[int]
    targets: list[int]
    source_site: str
    target_site: str
    positions: int
    seed: int
    model_name: str
    prompts: list[str] | None
    tokens: Tensor | None = None
    completed_sources: list[int] = field(default_factory=list)
    # Sketch method only (0 or "" for other methods): r; the width of its widest co-range
    # sketch (r, more for a target whose sources have too few targets to fill their basis,
    # see ``_sketch_widths``); the most columns of each source's shared basis; the most
    # directions of J_{s,t} P a pair gives its target's refining basis; and the dtype its
    # products' matrix multiplications rounded their factors to.
    sketch_rank: int = 0
    co_range_width: int = 0
    basis_width: int = 0
    range_width: int = 0
    sketch_matmul_dtype: str = ""
    # Sketch method only, while running: Ψᵀ J_{s,t} per pair, and the targets done; then
    # each pair's top 2k directions of J_{s,t} P, and the targets whose pairs are refined.
    co_range_sketch: Tensor | None = None
    completed_targets: list[int] = field(default_factory=list)
    range_sketch: Tensor | None = None
    refined_targets: list[int] = field(default_factory=list)
    # Then, for each pair the Krylov step will polish, the orthonormal left directions U it
    # starts from (2k) and Uᵀ J_{s,t}; and the sources whose short pairs have taken it.
    polish_basis: Tensor | None = None
    polish_rows: Tensor | None = None
    polished_sources: list[int] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return int(self.singular_values.shape[0])

    @property
    def k(self) -> int:
        return int(self.singular_values.shape[2])

    def pairs(self) -> list[tuple[int, int]]:
        """The (source, target) pairs this atlas covers, source-major."""
        return [(s, t) for s in self.sources for t in self.targets if t > s]

    def is_complete(self) -> bool:
        return sorted(self.completed_sources) == sorted(self.sources)

    def vectors(self, source: int, target: int) -> Float[Tensor, "k d_model"]:
        """Top-k right singular vectors (steering directions) of the pair source -> target."""
        if (source, target) not in self.pairs():
            raise ValueError(
                f"the pair {source} -> {target} is not in this atlas; its sources are "
                f"{self.sources} and targets {self.targets} (target > source)"
            )
        if source not in self.completed_sources:
            raise ValueError(f"source layer {source} has not been computed yet")
        return self.right_vectors[source, target]

    def steering_vectors(
        self, pairs: Sequence[tuple[int, int]] | None = None, *, top: int | None = None
    ) -> list[SteeringVector]:
        """The top vectors of the given pairs (default every computed pair) as
        ``SteeringVector`` objects, e.g. to screen with ``rank_vectors``."""
        top = self.k if top is None else top
        if not is_int(top) or not 1 <= top <= self.k:
            raise ValueError(f"top must be an int between 1 and k = {self.k}, got {top!r}")
        chosen = (
            [(s, t) for s, t in self.pairs() if s in self.completed_sources]
            if pairs is None
            else list(pairs)
        )
        out = []
        for s, t in chosen:
            V = self.vectors(s, t)
            for rank in range(top):
                out.append(
                    power_steering_vector(
                        V[rank],
                        source=s,
                        target=t,
                        source_site=self.source_site,
                        target_site=self.target_site,
                        positions=self.positions,
                        rank=rank,
                        singular_value=float(self.singular_values[s, t, rank]),
                        model_name=self.model_name,
                        atlas_method=self.method,
                    )
                )
        return out

    def __repr__(self) -> str:
        """A one-line summary (the tensors would fill a notebook cell)."""

        def layers(values: list[int]) -> str:
            run = len(values) > 2 and values == list(range(values[0], values[-1] + 1))
            return f"{values[0]}..{values[-1]}" if run else str(values)

        pairs = self.pairs()
        done = sum(1 for s, _ in pairs if s in self.completed_sources)
        text = (
            f"SensitivityAtlas(model={self.model_name!r}, method={self.method!r}, "
            f"pairs done {done}/{len(pairs)}, k={self.k}, sources {layers(self.sources)}, "
            f"targets {layers(self.targets)}, {self.source_site} -> {self.target_site}, "
            f"positions={self.positions}"
        )
        if done:
            top = self.singular_values[..., 0].nan_to_num(-1.0)
            s, t = divmod(int(top.argmax()), self.n_layers)
            text += f", largest σ1 {float(top[s, t]):.4g} at L{s} -> L{t}"
        return text + ")"

    def spectral_gap(self) -> Float[Tensor, "n_layers n_layers"]:
        """σ_k / σ_{k+1} per pair: near 1, the k-th vector is not separated from the next."""
        return self.singular_values[..., -1] / self.next_singular_value

    def to_pandas(self) -> Any:
        """Long table: source, target, rank, singular_value, method, iterations, converged."""
        import pandas as pd

        rows = []
        for s, t in self.pairs():
            if s not in self.completed_sources:
                continue
            for rank in range(self.k):
                rows.append(
                    {
                        "source": s,
                        "target": t,
                        "rank": rank,
                        "singular_value": float(self.singular_values[s, t, rank]),
                        "method": self.method,
                        "iterations": int(self.iterations[s, t]),
                        "converged": bool(self.converged[s, t]),
                    }
                )
        columns = [
            "source",
            "target",
            "rank",
            "singular_value",
            "method",
            "iterations",
            "converged",
        ]
        return pd.DataFrame(rows, columns=columns)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.safetensors`` file (tensors, plus JSON metadata in its header)."""
        save_result(self, path)

    def to_html(
        self,
        path: str | os.PathLike[str],
        *,
        model: Any = None,
        kl: float = 1.0,
        top: int = 5,
        progress: bool = True,
    ) -> Path:
        """One self-contained HTML page: the heatmap and a panel per clicked pair.

        With ``model`` (the one the atlas was computed on), the panel also lists, for every
        vector and both signs, the ``top`` next tokens most promoted and most suppressed
        when the vector is added at the scale where the next-token KL is about ``kl`` nats
        (see ``token_effects``).
        """
        from .plotting import atlas_html

        effects = None
        if model is not None:
            effects = token_effects(model, self, kl=kl, top=top, progress=progress)
        return atlas_html(self, path, effects=effects)

    def _store(self, s: int, t: int, sig: Tensor, nxt: Tensor, vectors: Tensor) -> None:
        """Record one pair's top-k, σ_{k+1} and vectors in the atlas's dtype, on the CPU."""
        dtype = self.singular_values.dtype
        self.singular_values[s, t] = sig.to("cpu", dtype)
        self.next_singular_value[s, t] = nxt.to("cpu", dtype)
        self.right_vectors[s, t] = vectors.to("cpu", dtype)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "n_layers": self.n_layers,
            "d_model": int(self.right_vectors.shape[-1]),
            "k": self.k,
            "method": self.method,
            "sources": self.sources,
            "targets": self.targets,
            "source_site": self.source_site,
            "target_site": self.target_site,
            "positions": self.positions,
            "seed": self.seed,
            "sketch_rank": self.sketch_rank,
            "co_range_width": self.co_range_width,
            "basis_width": self.basis_width,
            "range_width": self.range_width,
            "sketch_matmul_dtype": self.sketch_matmul_dtype,
            "prompts": self.prompts,
            "tokens": None if self.tokens is None else self.tokens.tolist(),
        }


def _method_label(atlas: SensitivityAtlas) -> str:
    """The method that ran, with the sketch's settings (how approximate the map is)."""
    if atlas.method != "sketch":
        return atlas.method
    products = f", {atlas.sketch_matmul_dtype} products" if atlas.sketch_matmul_dtype else ""
    return f"sketch (r = {atlas.sketch_rank}{products})"


def _layer_list(
    adapter: ModelAdapter, layers: Sequence[int] | None, what: str, default: range
) -> list[int]:
    if layers is None:
        return list(default)
    if isinstance(layers, int) or not isinstance(layers, Sequence):
        raise TypeError(f"{what} must be a list of layer indices, got {layers!r}")
    resolved = sorted({adapter.resolve_layer(layer, what) for layer in layers})
    if not resolved:
        raise ValueError(f"{what} is empty: give at least one layer or None for all")
    return resolved


def _choose_method(
    d_model: int, sources: list[int], targets: list[int], k: int, sketch_rank: int
) -> str:
    if d_model <= _EXACT_UP_TO:
        return "exact"
    # The sketch is approximate: only worth it when it saves a lot over the power method.
    # Both costs count products through the layers, per layer.
    n_pairs = sum(t > s for s in sources for t in targets)
    power_cost = n_pairs * 2 * _POWER_ITERATIONS * (k + 5)
    co_range, _ = _sketch_widths(sources, targets, sketch_rank, k, d_model)
    basis, refining = _basis_widths(sketch_rank, d_model)
    sketch_cost = sum(co_range.values()) + basis * len(sources) + refining * len(co_range)
    return "power" if power_cost <= 4 * sketch_cost else "sketch"


def _test_matrix(rows: int, cols: int, seed: int, layer: int, dtype: torch.dtype) -> Tensor:
    """The sketch's Gaussian test matrix for one layer, the same on every call."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)


def _basis_widths(r: int, d: int) -> tuple[int, int]:
    """Columns of a source's shared basis and of a target's refining basis."""
    return min(_BASIS_FACTOR * r, d), min(_REFINE_FACTOR * r, d)


def _sketch_widths(
    sources: list[int], targets: list[int], r: int, k: int, d: int
) -> tuple[dict[int, int], dict[int, int]]:
    """Per target layer with earlier sources: the width of its co-range sketch, and how many
    top directions of J_{s,t} P each of its pairs gives its refining basis.

    A source's shared basis (4r columns) is built from its targets' co-range sketches, r
    rows each, and a target's refining basis (4r) from its sources' pairs, 2k directions
    each. In a whole atlas most layers have partners enough to fill theirs; with few (one
    pair, or one target for many sources) a basis would be filled up with directions that
    know nothing of J, and on Gemma 3 270M the pair L2 -> L12 alone erred by 9% to 12%, the
    16 sources of L16 by 4%. So where a layer with a pair too long for the polish has too
    few partners, its partners' sketches are widened until its basis is full.
    """
    basis, refining = _basis_widths(r, d)
    later = {s: [t for t in targets if t > s] for s in sources}
    earlier = {t: [s for s in sources if s < t] for t in targets}
    co_range = {t: r for t, found in earlier.items() if found}
    directions = {t: min(_REFINE_DIRECTIONS * k, basis) for t in co_range}
    for s, found in later.items():
        if found and found[-1] - s > _POLISH_HOPS:
            for t in found:
                co_range[t] = max(co_range[t], -(-basis // len(found)))
    for t in co_range:
        if t - earlier[t][0] > _POLISH_HOPS:
            wanted = -(-refining // len(earlier[t]))
            directions[t] = max(directions[t], min(wanted, basis))
    return co_range, directions


@dataclass
class _Plan:
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


def _plan(
    model: Any,
    prompts: Prompts,
    *,
    sources: Sequence[int] | None,
    targets: Sequence[int] | None,
    k: int,
    method: str,
    source_site: str,
    target_site: str,
    positions: int,
    checkpoint: str | os.PathLike[str] | None,
    sketch_rank: int | None,
    sketch_matmul_dtype: torch.dtype | None,
    tol: float,
    max_iters: int,
    chunk_size: int | None,
) -> _Plan:
    """Every check of ``sensitivity_atlas``'s arguments, before any forward pass."""
    adapter = ModelAdapter(model)
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
    ckpt = None if checkpoint is None else Path(checkpoint)
    if ckpt is not None and ckpt.suffix != ".safetensors":
        raise ValueError(f"checkpoint must be a .safetensors path, got {str(ckpt)!r}")
    if ckpt is not None and not ckpt.parent.is_dir():
        raise ValueError(f"the folder of checkpoint does not exist: {str(ckpt.parent)!r}")
    # Layer Jacobians have heavy spectral tails (on the worst Gemma 3 270M pair, σ65/σ1 is
    # still 0.14), so the sketch needs a wide basis: see docs/concepts/atlas.md. With the
    # short pairs polished, r = 14 (d_model / 48 on Gemma, 3k + 2 for k = 4) erred by 1.2% to
    # 1.6% there (three prompts, three seeds).
    default_rank = min(max(3 * k + 2, adapter.d_model // 48), adapter.d_model)
    r = default_rank if sketch_rank is None else sketch_rank
    if not is_int(r) or not k < r <= adapter.d_model:
        raise ValueError(
            f"sketch_rank must be an int between k + 1 = {k + 1} and d_model = "
            f"{adapter.d_model}, got {r!r}"
        )
    if method == "auto":
        method = _choose_method(adapter.d_model, source_layers, target_layers, k, r)
    check_matmul_dtype(sketch_matmul_dtype, adapter.dtype, "sketch_matmul_dtype")
    matmul_dtype = sketch_matmul_dtype
    if matmul_dtype is None:
        # On Gemma 3 270M the rounding moved the worst pair's error by at most 0.06% (three
        # seeds) and saved a quarter of the time; on a GPU it is not measured.
        cpu = adapter.device.type == "cpu" and cpu_multiplies_bfloat16()
        matmul_dtype = torch.bfloat16 if cpu and adapter.dtype == torch.float32 else adapter.dtype

    batch = adapter.tokenize(prompts)
    shortest = int(batch.lengths.min())
    if not is_int(positions) or not 1 <= positions <= shortest:
        raise ValueError(
            f"positions must be an int between 1 and {shortest} (the shortest prompt), got {positions!r}"
        )
    return _Plan(
        adapter, batch, source_layers, target_layers, pairs, source_hooks, ckpt, method, r,
        matmul_dtype,
    )  # fmt: skip


def validate_atlas_arguments(model: Any, prompts: Prompts, **options: Any) -> None:
    """Raise the error ``sensitivity_atlas`` would raise for these arguments, without
    computing anything (for callers that must refuse bad input before writing files)."""
    defaults: dict[str, Any] = {
        "sources": None, "targets": None, "k": 4, "method": "auto",
        "source_site": "hook_mlp_out", "target_site": "hook_mlp_out", "positions": 4,
        "checkpoint": None, "sketch_rank": None, "sketch_matmul_dtype": None, "tol": 1e-4,
        "max_iters": 50, "chunk_size": None,
    }  # fmt: skip
    # Options that need no checking (seed, progress) are left out.
    _plan(model, prompts, **{**defaults, **{k: v for k, v in options.items() if k in defaults}})


def sensitivity_atlas(
    model: Any,
    prompts: Prompts,
    *,
    sources: Sequence[int] | None = None,
    targets: Sequence[int] | None = None,
    k: int = 4,
    method: str = "auto",
    source_site: str = "hook_mlp_out",
    target_site: str = "hook_mlp_out",
    positions: int = 4,
    checkpoint: str | os.PathLike[str] | None = None,
    seed: int = 0,
    tol: float = 1e-4,
    max_iters: int = 50,
    chunk_size: int | None = None,
    sketch_rank: int | None = None,
    sketch_matmul_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> SensitivityAtlas:
    """Top-``k`` Power Steering spectra for every pair ``s -> t`` (t > s) of the given layers.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        prompts: a string, a list of strings (stacked Jacobians), or a token tensor.
        sources: source layer indices (negatives count from the end); default all.
        targets: target layer indices; default all. Only pairs with target > source run.
        k: singular values and vectors kept per pair.
        method: ``"exact"``, ``"power"``, ``"sketch"`` or ``"auto"`` (see the module
            docstring).
        source_site: hook suffix inside the source block where vectors are added.
        target_site: hook suffix inside the target block that is read.
        positions: final tokens of each prompt read at the target.
        checkpoint: a ``.safetensors`` path; finished source layers are saved there as
            they complete and a rerun with the same arguments resumes from it.
        seed: random start of the power method.
        tol: relative change of the singular values that ends the power method.
        max_iters: iteration cap of the power method.
        chunk_size: most columns per vmapped product (identity columns in the exact
            method, test-matrix columns in the sketch); bounds memory. ``None``: about
            1024 token rows per product (``LayerJacobian``'s default), tuned for a CPU;
            on a GPU, larger chunks run faster (``docs/how-to/gpu.md``).
        sketch_rank: r, the co-range sketch width of the sketch method (default the larger
            of 3k + 2 and d_model / 48, at most d_model); each source's shared basis has up
            to 4r columns and each target's refining basis up to 4r, however few pairs share
            them. Larger is slower and more accurate; r = d_model is exact.
        sketch_matmul_dtype: ``torch.bfloat16`` runs the matrix multiplications of the
            sketch's products with bfloat16 factors (``JacobianGraph``'s ``matmul_dtype``);
            the model's dtype runs them in full precision. ``None``: bfloat16 for a float32
            model on a CPU that multiplies bfloat16 in hardware (AVX512-BF16 or AMX), else
            full precision. The atlas records the choice (``atlas.sketch_matmul_dtype``).
        progress: show a progress bar over pairs.
    """
    plan = _plan(
        model, prompts, sources=sources, targets=targets, k=k, method=method,
        source_site=source_site, target_site=target_site, positions=positions,
        checkpoint=checkpoint, sketch_rank=sketch_rank, sketch_matmul_dtype=sketch_matmul_dtype,
        tol=tol, max_iters=max_iters, chunk_size=chunk_size,
    )  # fmt: skip
    adapter, batch, method, r = plan.adapter, plan.batch, plan.method, plan.sketch_rank
    source_layers, target_layers, pairs = plan.sources, plan.targets, plan.pairs
    source_hooks, ckpt, n = plan.source_hooks, plan.checkpoint, plan.adapter.n_layers
    nan = float("nan")
    co_range, directions = (
        _sketch_widths(source_layers, target_layers, r, k, adapter.d_model)
        if method == "sketch"
        else ({}, {})
    )
    # Results keep the model's precision (at least float32).
    dtype = torch.promote_types(adapter.dtype, torch.float32)
    atlas = SensitivityAtlas(
        singular_values=torch.full((n, n, k), nan, dtype=dtype),
        next_singular_value=torch.full((n, n), nan, dtype=dtype),
        right_vectors=torch.full((n, n, k, adapter.d_model), nan, dtype=dtype),
        iterations=torch.full((n, n), -1, dtype=torch.long),
        converged=torch.zeros((n, n), dtype=torch.bool),
        source_norms=torch.full((n,), nan),
        method=method,
        sources=source_layers,
        targets=target_layers,
        source_site=source_site,
        target_site=target_site,
        positions=positions,
        seed=seed,
        model_name=adapter.name,
        prompts=batch.texts,
        tokens=None if batch.texts is not None else batch.tokens.cpu(),
        sketch_rank=r if method == "sketch" else 0,
        co_range_width=max(co_range.values(), default=0),
        basis_width=_BASIS_FACTOR * r if method == "sketch" else 0,
        range_width=max(directions.values(), default=0),
        sketch_matmul_dtype=str(plan.matmul_dtype).removeprefix("torch.")
        if method == "sketch"
        else "",
    )
    if ckpt is not None and ckpt.exists():
        atlas = _resume(atlas, ckpt)
    atlas.source_norms[source_layers] = typical_norms(adapter, batch, source_hooks).to(
        atlas.source_norms.dtype
    )

    from tqdm.auto import tqdm

    @functools.cache
    def graph() -> JacobianGraph:
        """The one forward pass every product of this atlas runs on, recorded on first use
        (a resumed run with nothing left to do needs none)."""
        return JacobianGraph(
            model, prompts, source_layers, target_layers, source_site=source_site,
            target_site=target_site, positions=positions, chunk_size=chunk_size,
            matmul_dtype=plan.matmul_dtype if method == "sketch" else None,
        )  # fmt: skip

    if method == "sketch":
        _co_range_phase(atlas, graph, co_range, progress, ckpt)
    done = sum(1 for s, _ in pairs if s in atlas.completed_sources)
    with tqdm(
        total=len(pairs), initial=done, desc=f"atlas ({method})", unit="pair", disable=not progress
    ) as bar:
        for s in source_layers:
            if s in atlas.completed_sources:
                continue
            later = [t for t in target_layers if t > s]
            if method == "sketch":
                op = graph().operator(s, later)
                assert atlas.co_range_sketch is not None
                # Built and used on the CPU, beside the co-range sketch that is kept there.
                basis = shared_basis(
                    [atlas.co_range_sketch[s, t, : co_range[t]] for t in later],
                    atlas.basis_width,
                )
                Z = op.matvec(basis.to(op.device, op.dtype)).to("cpu")
                if atlas.range_sketch is None:
                    rows, width = op.shape[0] // len(later), atlas.range_width
                    atlas.range_sketch = torch.full((n, n, rows, width), nan, dtype=dtype)
                for t in later:
                    sig, nxt, V = top_k_in_basis(Z[op.rows(t)], basis, k)
                    atlas._store(s, t, sig, nxt, V)
                    m = directions[t]
                    atlas.range_sketch[s, t, :, :m] = top_directions(Z[op.rows(t)], m)
                    bar.update(1)
            elif method == "exact":
                op = graph().operator(s, later)
                dense = op.dense()
                for t in later:
                    sig, nxt, V = top_k_svd(dense[op.rows(t)], k)
                    atlas._store(s, t, sig, nxt, V)
                    atlas.converged[s, t] = True
                    bar.update(1)
            else:
                for t in later:
                    op = graph().operator(s, t)
                    found = block_power_iteration(
                        op, k + 1, tol=tol, max_iters=max_iters, seed=seed
                    )
                    sig = found.singular_values
                    atlas._store(s, t, sig[:k], sig[k], found.vectors[:k])
                    atlas.iterations[s, t] = found.iterations
                    atlas.converged[s, t] = found.converged
                    bar.update(1)
            atlas.completed_sources.append(s)
            if atlas.is_complete():
                atlas.co_range_sketch = None  # only needed while running
            if ckpt is not None:
                atlas.save(ckpt)
    if method == "sketch":
        _refine_phase(atlas, graph, directions, progress, ckpt)
        _polish_phase(atlas, graph, progress, ckpt)
    return atlas


def _co_range_phase(
    atlas: SensitivityAtlas,
    graph: Callable[[], JacobianGraph],
    widths: dict[int, int],
    progress: bool,
    ckpt: Path | None,
) -> None:
    """Per target layer, one vmapped VJP sketches Ψᵀ J_{s,t} for every earlier source
    (``widths[t]`` rows; the rest of the widest sketch's rows stay NaN)."""
    n, d = atlas.n_layers, int(atlas.right_vectors.shape[-1])
    dtype = atlas.singular_values.dtype
    if atlas.co_range_sketch is None:
        shape = (n, n, atlas.co_range_width, d)
        atlas.co_range_sketch = torch.full(shape, float("nan"), dtype=dtype)
    passes = _target_passes(atlas, atlas.completed_targets, "targets", progress, ckpt)
    for t, earlier in passes:
        op = graph().operator(earlier, t)
        psi = _test_matrix(op.shape[0], widths[t], atlas.seed, -1 - t, dtype)
        W = op.rmatvec(psi.to(op.dtype)).to("cpu", dtype)
        for s in earlier:
            atlas.co_range_sketch[s, t, : widths[t]] = W[op.columns(s)].T


def _refine_phase(
    atlas: SensitivityAtlas,
    graph: Callable[[], JacobianGraph],
    directions: dict[int, int],
    progress: bool,
    ckpt: Path | None,
) -> None:
    """Per target layer, one vmapped VJP of a basis Q shared by its sources, built from
    their pairs' top directions of J_{s,t} P (``directions[t]`` each); a pair keeps
    Qᵀ J_{s,t}'s top-k where they hold more of its spectrum than the first estimate (both
    are lower bounds)."""
    # Left directions each polished pair starts from: its top 2k within Q.
    m = min(_REFINE_DIRECTIONS * atlas.k, atlas.basis_width, int(atlas.right_vectors.shape[-1]))
    for t, earlier in _target_passes(atlas, atlas.refined_targets, "refine", progress, ckpt):
        assert atlas.range_sketch is not None
        # No wider than the directions it is built from: completing a basis of the target's
        # rows (batch x positions x d_model) would cost a dense SVD of that size.
        mine = directions[t]
        width = min(_REFINE_FACTOR * atlas.sketch_rank, len(earlier) * mine)
        basis = shared_basis([atlas.range_sketch[s, t, :, :mine].T for s in earlier], width)
        op = graph().operator(earlier, t)
        B = op.rmatvec(basis.to(op.device, op.dtype)).to("cpu")
        for s in earlier:
            R = B[op.columns(s)].T.double()  # Qᵀ J_{s,t}
            sig, nxt, V, W = top_k_of_rows(R, atlas.k)
            if _holds_more(atlas, s, t, sig):
                atlas._store(s, t, sig, nxt, V)
            if t - s <= _POLISH_HOPS:
                # The Krylov step starts from this pass's top left directions U = Q W,
                # whose Uᵀ J (their singular values times the right vectors) is known.
                if atlas.polish_basis is None:
                    n, rows = atlas.n_layers, basis.shape[0]
                    d = int(atlas.right_vectors.shape[-1])
                    dtype = atlas.singular_values.dtype
                    atlas.polish_basis = torch.full((n, n, rows, m), float("nan"), dtype=dtype)
                    atlas.polish_rows = torch.full((n, n, m, d), float("nan"), dtype=dtype)
                assert atlas.polish_rows is not None
                atlas.polish_basis[s, t] = basis @ W[:, :m]
                atlas.polish_rows[s, t] = W[:, :m].T @ R
    if atlas.range_sketch is not None:
        atlas.range_sketch = None  # only needed while running
        if ckpt is not None:
            atlas.save(ckpt)


def _polish_phase(
    atlas: SensitivityAtlas,
    graph: Callable[[], JacobianGraph],
    progress: bool,
    ckpt: Path | None,
) -> None:
    """Per pair at most ``_POLISH_HOPS`` layers apart, one block Krylov step from the 2k
    left directions U of the refining pass, whose rows Uᵀ J it holds: the top-k of J on the
    left subspace span(U, J Jᵀ U), which holds at least as much of its spectrum as U alone
    (so σ only grow, and stay lower bounds). Two products: J (Jᵀ U), then Jᵀ on the new
    directions."""
    short = [(s, t) for s, t in atlas.pairs() if t - s <= _POLISH_HOPS]
    sources = sorted({s for s, _ in short})
    for s in _layer_passes(atlas, sources, atlas.polished_sources, "polish", progress, ckpt):
        assert atlas.polish_basis is not None and atlas.polish_rows is not None
        for t in [t for source, t in short if source == s]:
            op = graph().operator(s, t)
            U, R = atlas.polish_basis[s, t].double(), atlas.polish_rows[s, t].double()
            pulled = torch.linalg.qr(R.T).Q  # spans Jᵀ U
            outside = op.matvec(pulled.to(op.device, op.dtype)).to("cpu", torch.float64)
            # J Jᵀ U less its part in span(U), orthogonalized twice (float64); the SVD keeps
            # only directions it really has, so that U and the new ones stay orthonormal.
            for _ in range(2):
                outside = outside - U @ (U.T @ outside)
            H, S, _ = torch.linalg.svd(outside, full_matrices=False)
            new = H[:, S > S.max().clamp_min(torch.finfo(torch.float64).tiny) * 1e-10]
            rows = op.rmatvec(new.to(op.device, op.dtype)).to("cpu", torch.float64).T
            sig, nxt, vectors, _ = top_k_of_rows(torch.cat([R, rows]), atlas.k)
            if _holds_more(atlas, s, t, sig):
                atlas._store(s, t, sig, nxt, vectors)
    if atlas.polish_basis is not None:
        atlas.polish_basis = atlas.polish_rows = None  # only needed while running
        if ckpt is not None:
            atlas.save(ckpt)


def _holds_more(atlas: SensitivityAtlas, s: int, t: int, sig: Tensor) -> bool:
    """Whether σ_1..σ_k hold more of the pair's spectrum (Σσ²) than its estimate so far."""
    return float((sig.double() ** 2).sum()) > float(
        (atlas.singular_values[s, t].double() ** 2).sum()
    )


def _target_passes(
    atlas: SensitivityAtlas, done: list[int], what: str, progress: bool, ckpt: Path | None
) -> Iterator[tuple[int, list[int]]]:
    """Each target layer not yet in ``done``, with its earlier sources (see ``_layer_passes``)."""
    todo = [t for t in atlas.targets if any(s < t for s in atlas.sources)]
    for t in _layer_passes(atlas, todo, done, what, progress, ckpt):
        yield t, [s for s in atlas.sources if s < t]


def _layer_passes(
    atlas: SensitivityAtlas,
    todo: list[int],
    done: list[int],
    what: str,
    progress: bool,
    ckpt: Path | None,
) -> Iterator[int]:
    """Each layer of ``todo`` not yet in ``done``, under a progress bar; once the caller's
    pass for it is over, it joins ``done`` and is checkpointed."""
    from tqdm.auto import tqdm

    with tqdm(
        total=len(todo), initial=len(done), desc=f"atlas (sketch, {what})", unit="layer",
        disable=not progress,
    ) as bar:  # fmt: skip
        for layer in todo:
            if layer in done:
                continue
            yield layer
            done.append(layer)
            if ckpt is not None:
                atlas.save(ckpt)
            bar.update(1)


def _resume(fresh: SensitivityAtlas, path: Path) -> SensitivityAtlas:
    from .io import load

    saved = load(path)
    if not isinstance(saved, SensitivityAtlas):
        raise ValueError(
            f"the checkpoint {str(path)!r} holds a {type(saved).__name__}, not an atlas"
        )
    mine, theirs = fresh._fingerprint(), saved._fingerprint()
    differ = [key for key in mine if mine[key] != theirs.get(key)]
    if differ:
        shown = "; ".join(f"{key}: {theirs.get(key)!r} there, {mine[key]!r} now" for key in differ)
        raise ValueError(
            f"the checkpoint {str(path)!r} was made with other arguments ({shown}); "
            "rerun with the same arguments or use another checkpoint path"
        )
    return saved


def _kl_matched_effects(
    adapter: ModelAdapter,
    batch: TokenBatch,
    hook: str,
    directions: Float[Tensor, "rows d_model"],
    unit: float,
    kl: float,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Per unit direction, the scale at which steering along it reaches about ``kl`` nats
    (``_kl_matched_scales``, from 1/32 of ``unit``, the hook's typical norm), the KL there
    and the mean change of the last token's logits there."""
    # Some 32 sequences per forward pass: on a CPU, 1.5x faster per vector than 8 (Gemma 3
    # 270M), and only last-token logits are kept, so memory stays small.
    chunk = max(1, 32 // batch.tokens.shape[0])
    base = steered_logits(adapter, batch, hook, 0 * directions[:1], chunk=chunk)

    def kl_at(rows: Tensor, scales: Tensor) -> tuple[Tensor, list[Any]]:
        logits = steered_logits(
            adapter, batch, hook, scales[:, None] * directions[rows], chunk=chunk
        )
        changes = (logits - base).mean(dim=1).float().cpu()
        # One copy per row, so that a kept row does not hold its whole batch in memory.
        return kl_divergence(logits, base).mean(dim=1).cpu(), [c.clone() for c in changes]

    n = directions.shape[0]
    if unit == 0:  # an activation that is always zero: nothing to scale against
        scales = torch.zeros(n, dtype=torch.float64)
        kls, changes = kl_at(torch.arange(n), scales)
        return scales, kls, changes
    full = functools.partial(torch.full, (n,), dtype=torch.float64)
    # A vector that barely moves the output is shown at the largest scale, one that moves
    # it at once at the smallest.
    bounds = (full(unit * KL_SCALE_RANGE[0]), full(unit * KL_SCALE_RANGE[1]))
    return kl_search(kl_at, full(KL_PROBE_FRACTION * unit), kl, bounds, tol=0.1, rounds=6)


def token_effects(
    model: Any,
    atlas: SensitivityAtlas,
    *,
    kl: float = 1.0,
    top: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Next-token effects of every atlas vector, both signs, for the atlas browser.

    Each pair's vector v is added at the source hook on every real token, with both signs,
    at a scale (one per sign) where the next-token KL(steered ‖ base) at each prompt's last
    token (averaged over prompts) is about ``kl`` nats, so that vectors of layers with very
    different sensitivities are compared at the same strength. The scale is searched from
    1/32 of the source's typical norm, to within 10% of the KL (``_kl_matched_scales``:
    about 3.5 forward passes per vector and sign where ``kl_scales``, which settles to
    0.01%, spends a dozen); the KL reached is reported with it. The change in
    logits at the last token (averaged over prompts) gives the ``top`` most promoted and
    most suppressed tokens. Returns ``{"kl": kl, "pairs": {"s,t": [per vector: {"+":
    {"scale": absolute scale, "relative": scale / typical norm, "kl": reached,
    "promoted": [[text, Δlogit], ...], "suppressed": [...]}, "-": {...}}]}}``.
    """
    adapter = ModelAdapter(model)
    if (adapter.n_layers, adapter.d_model) != (atlas.n_layers, int(atlas.right_vectors.shape[-1])):
        raise ValueError(
            f"the model ({adapter.n_layers} layers, d_model {adapter.d_model}) is not the one "
            f"the atlas was computed on ({atlas.model_name})"
        )
    if not is_number(kl) or not 0 < kl < float("inf"):
        raise ValueError(f"kl must be a positive number of nats (e.g. 1.0), got {kl!r}")
    if not is_int(top) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    prompts = atlas.prompts if atlas.prompts is not None else atlas.tokens
    if prompts is None:
        raise ValueError("the atlas records no prompts or tokens to measure effects on")
    batch = adapter.tokenize(prompts)
    from tqdm.auto import tqdm

    def listed(row: Tensor, largest: bool) -> list[list[Any]]:
        values, ids = row.topk(top, largest=largest)
        return [
            [decode_token(model, int(i)), round(float(v), 4)]
            for v, i in zip(values, ids, strict=True)
        ]

    pairs: dict[str, Any] = {}
    for s in tqdm(
        atlas.completed_sources, desc="token effects", unit="layer", disable=not progress
    ):
        later = [t for t in atlas.targets if t > s]
        V = torch.cat([atlas.right_vectors[s, t] for t in later]).double()
        unit = float(atlas.source_norms[s])
        # Rows: +v for every vector, then -v; each sign gets its own scale, as in kl_scales.
        scales, kls, changes = _kl_matched_effects(
            adapter, batch, adapter.hook_name(s, atlas.source_site), torch.cat([V, -V]), unit, kl
        )
        n_vec = V.shape[0]
        for j, t in enumerate(later):
            effects = []
            for r in range(atlas.k):
                i = j * atlas.k + r
                entry: dict[str, Any] = {}
                for sign, row in (("+", i), ("-", n_vec + i)):
                    entry[sign] = {
                        "scale": float(scales[row]),
                        "relative": float(scales[row]) / unit if unit > 0 else 0.0,
                        "kl": float(kls[row]),
                        "promoted": listed(changes[row], True),
                        "suppressed": listed(changes[row], False),
                    }
                effects.append(entry)
            pairs[f"{s},{t}"] = effects
    return {"kl": kl, "pairs": pairs}
