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
interrupted run resumes where it stopped; a checkpoint made with other arguments is refused
(``tl_powersteer.atlas.checkpoint``).

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
import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..adapters import Model, ModelAdapter, Prompts, TokenBatch
from ..checks import check_seed, plain_ints, renamed_options
from ..jacobian import RecordedPass
from ..models import model_provenance
from ..scales import typical_norms
from . import sketch
from .checkpoint import SketchState, resume, save_checkpoint
from .methods import exact_source, power_source
from .plan import plan_atlas
from .result import SensitivityAtlas

__all__ = ["sensitivity_atlas", "validate_atlas_arguments"]

# Former option names that still work for one release.
RENAMED = {"positions": "target_positions"}


@plain_ints
def sensitivity_atlas(
    model: Model | ModelAdapter,
    prompts: Prompts | TokenBatch,
    *,
    sources: Sequence[int] | slice | None = None,
    targets: Sequence[int] | slice | None = None,
    k: int = 4,
    method: str = "auto",
    source_site: str = "hook_mlp_out",
    target_site: str = "hook_mlp_out",
    target_positions: int = 4,
    checkpoint: str | os.PathLike[str] | None = None,
    seed: int = 0,
    tol: float = 1e-4,
    max_iters: int = 50,
    chunk_size: int | None = None,
    sketch_rank: int | None = None,
    sketch_matmul_dtype: torch.dtype | None = None,
    progress: bool = True,
    **renamed: Any,
) -> SensitivityAtlas:
    """Top-``k`` Power Steering spectra for every pair ``s -> t`` (t > s) of the given layers.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        prompts: a string, a list of strings (stacked Jacobians), or a token tensor.
        sources: source layer indices (negatives count from the end) or a slice of them;
            default all.
        targets: target layer indices or a slice; default all. Only pairs with target > source run.
        k: singular values and vectors kept per pair.
        method: ``"exact"``, ``"power"``, ``"sketch"`` or ``"auto"`` (see the module
            docstring).
        source_site: hook suffix inside the source block where vectors are added.
        target_site: hook suffix inside the target block that is read.
        target_positions: final tokens of each prompt read at the target.
        checkpoint: a ``.safetensors`` path; finished source layers are saved there as
            they complete and a rerun with the same arguments resumes from it.
        seed: random start of the power method.
        tol: relative accuracy of the singular values at which the power method stops
            (its a-posteriori error bound, see ``block_power_iteration``).
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
            sketch's products with bfloat16 factors (``RecordedPass``'s ``matmul_dtype``);
            the model's dtype runs them in full precision. ``None``: bfloat16 for a float32
            model on a CPU that multiplies bfloat16 in hardware (AVX512-BF16 or AMX), else
            full precision. The atlas records the choice (``atlas.sketch_matmul_dtype``).
        progress: show a progress bar over pairs.
        **renamed: ``positions``, the former name of ``target_positions``.
    """
    target_positions = renamed_options("sensitivity_atlas", renamed, RENAMED).get(
        "target_positions", target_positions
    )
    adapter = ModelAdapter.of(model)
    check_seed(seed)
    batch = adapter.tokenize(prompts)
    plan = plan_atlas(
        adapter, batch, sources=sources, targets=targets, k=k, method=method,
        source_site=source_site, target_site=target_site, target_positions=target_positions,
        checkpoint=checkpoint, sketch_rank=sketch_rank, sketch_matmul_dtype=sketch_matmul_dtype,
        tol=tol, max_iters=max_iters, chunk_size=chunk_size,
    )  # fmt: skip
    method, r, ckpt, n = plan.method, plan.sketch_rank, plan.checkpoint, adapter.n_layers
    co_range, directions = (
        sketch.sketch_widths(plan.sources, plan.targets, r, k, adapter.d_model)
        if method == "sketch"
        else ({}, {})
    )
    # Results keep the model's precision (at least float32).
    dtype = torch.promote_types(adapter.dtype, torch.float32)
    nan = float("nan")
    atlas = SensitivityAtlas(
        singular_values=torch.full((n, n, k), nan, dtype=dtype),
        next_singular_value=torch.full((n, n), nan, dtype=dtype),
        right_vectors=torch.full((n, n, k, adapter.d_model), nan, dtype=dtype),
        iterations=torch.full((n, n), -1, dtype=torch.long),
        converged=torch.zeros((n, n), dtype=torch.bool),
        source_norms=torch.full((n,), nan),
        method=method,
        sources=plan.sources,
        targets=plan.targets,
        source_site=source_site,
        target_site=target_site,
        target_positions=target_positions,
        seed=seed,
        model_name=adapter.name,
        **batch.provenance(),
        weights_fingerprint=adapter.weights_fingerprint(),
        provenance=model_provenance(adapter),
        sketch_rank=r if method == "sketch" else 0,
        sketch_matmul_dtype=str(plan.matmul_dtype).removeprefix("torch.")
        if method == "sketch"
        else "",
    )
    state = SketchState(
        co_range_width=max(co_range.values(), default=0),
        basis_width=sketch.BASIS_FACTOR * r if method == "sketch" else 0,
        range_width=max(directions.values(), default=0),
    )
    if ckpt is not None and ckpt.exists():
        atlas, state = resume(atlas, state, ckpt)
    atlas.source_norms[plan.sources] = typical_norms(adapter, batch, plan.source_hooks).to(
        atlas.source_norms.dtype
    )

    @functools.cache
    def graph() -> RecordedPass:
        """The one forward pass every product of this atlas runs on, recorded on first use
        (a resumed run with nothing left to do needs none)."""
        return RecordedPass(
            adapter, batch, plan.sources, plan.targets, source_site=source_site,
            target_site=target_site, target_positions=target_positions, chunk_size=chunk_size,
            matmul_dtype=plan.matmul_dtype if method == "sketch" else None,
        )  # fmt: skip

    if method == "sketch":
        sketch.co_range_phase(atlas, state, graph, co_range, progress, ckpt)
    done = sum(1 for s, _ in plan.pairs if s in atlas.completed_sources)
    from tqdm.auto import tqdm

    with tqdm(
        total=len(plan.pairs), initial=done, desc=f"atlas ({method})", unit="pair",
        disable=not progress,
    ) as bar:  # fmt: skip
        for s in plan.sources:
            if s in atlas.completed_sources:
                continue
            later = [t for t in plan.targets if t > s]
            step = functools.partial(bar.update, 1)
            if method == "sketch":
                op = graph().operator(s, later)
                sketch.range_pass(atlas, state, op, s, later, co_range, directions, step)
            elif method == "exact":
                exact_source(atlas, graph(), s, later, step)
            else:
                power_source(atlas, graph(), s, later, step, tol=tol, max_iters=max_iters)
            atlas.completed_sources.append(s)
            if atlas.is_complete():
                state.co_range_sketch = None  # only needed while running
            if ckpt is not None:
                save_checkpoint(ckpt, atlas, state)
    if method == "sketch":
        sketch.refine_phase(atlas, state, graph, directions, progress, ckpt)
        sketch.polish_phase(atlas, state, graph, progress, ckpt)
    return atlas


@plain_ints
def validate_atlas_arguments(
    model: Model | ModelAdapter, prompts: Prompts | TokenBatch, **options: Any
) -> None:
    """Raise the error ``sensitivity_atlas`` would raise for these arguments, without
    computing anything (for callers that must refuse bad input before writing files)."""
    former = {name: options.pop(name) for name in RENAMED if name in options}
    options.update(renamed_options("validate_atlas_arguments", former, RENAMED))
    parameters = inspect.signature(sensitivity_atlas).parameters
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise TypeError(f"sensitivity_atlas has no option {unknown[0]!r}")
    checked = {
        name: options.get(name, parameter.default)
        for name, parameter in parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        and name not in ("seed", "progress")  # not plan_atlas's
    }
    check_seed(options.get("seed", 0))
    adapter = ModelAdapter.of(model)
    plan_atlas(adapter, adapter.tokenize(prompts), **checked)
