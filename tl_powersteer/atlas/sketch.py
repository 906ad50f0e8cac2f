"""The atlas's sketch method: randomized sketches of the layer Jacobians, shared across pairs.

Per target layer t, one vmapped VJP of a Gaussian block Ψ (r columns) gives the co-range
sketch Ψᵀ J_{s,t} for every earlier source s. Per source, the top right singular vectors of
those sketches (each scaled to unit norm) form one orthonormal basis P of up to 4r columns
(``shared_basis``), and one vmapped JVP of P gives J_{s,t} P for every later target: each
pair's top-k are those of J_{s,t} restricted to P. A refining pass per target (a basis Q of
the pairs' top directions of J_{s,t} P, one VJP) and one block Krylov step per short pair
follow; each keeps a pair's new estimate where it holds more of its spectrum. The method
and its accuracy are described in ``docs/concepts/atlas.md``, its measurements in
``benchmarks/bench_atlas.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..jacobian import RecordedJacobian, RecordedPass
from ..linalg import shared_basis, top_directions, top_k_in_basis, top_k_of_rows
from .checkpoint import SketchState, save_checkpoint
from .result import SensitivityAtlas

__all__ = [
    "BASIS_FACTOR",
    "POLISH_HOPS",
    "REFINE_DIRECTIONS",
    "REFINE_FACTOR",
    "basis_widths",
    "co_range_phase",
    "polish_phase",
    "range_pass",
    "refine_phase",
    "sketch_widths",
    "gaussian_block",
]

# Columns of each source's shared basis P, as a multiple of r (4r against 3r: the worst of
# 153 Gemma 3 270M pairs erred by 1.6% against 2.2%; see docs/concepts/atlas.md).
BASIS_FACTOR = 4
# Columns of each target's refining basis, as a multiple of r, and the directions of each
# pair's J_{s,t} P (as a multiple of k) that build it (docs/concepts/atlas.md).
REFINE_FACTOR = 4
REFINE_DIRECTIONS = 2
# Pairs at most this many layers apart, whose spectra are the flattest, get one block
# Krylov step of their own from their top 2k left directions (docs/concepts/atlas.md).
POLISH_HOPS = 3


def gaussian_block(rows: int, cols: int, seed: int, layer: int, dtype: torch.dtype) -> Tensor:
    """The sketch's Gaussian test matrix for one layer, the same on every call."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)


def basis_widths(r: int, d: int) -> tuple[int, int]:
    """Columns of a source's shared basis and of a target's refining basis."""
    return min(BASIS_FACTOR * r, d), min(REFINE_FACTOR * r, d)


def sketch_widths(
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
    basis, refining = basis_widths(r, d)
    later = {s: [t for t in targets if t > s] for s in sources}
    earlier = {t: [s for s in sources if s < t] for t in targets}
    co_range = {t: r for t, found in earlier.items() if found}
    directions = {t: min(REFINE_DIRECTIONS * k, basis) for t in co_range}
    for s, found in later.items():
        if found and found[-1] - s > POLISH_HOPS:
            for t in found:
                co_range[t] = max(co_range[t], -(-basis // len(found)))
    for t in co_range:
        if t - earlier[t][0] > POLISH_HOPS:
            wanted = -(-refining // len(earlier[t]))
            directions[t] = max(directions[t], min(wanted, basis))
    return co_range, directions


def range_pass(
    atlas: SensitivityAtlas,
    state: SketchState,
    op: RecordedJacobian,
    source: int,
    later: list[int],
    co_range: dict[int, int],
    directions: dict[int, int],
    done: Callable[[], None],
) -> None:
    """One source's shared basis P from its targets' co-range sketches, one vmapped JVP
    of it for J_{s,t} P, each pair's top-k within P, and each pair's top directions of
    J_{s,t} P for its target's refining basis; ``done()`` after each pair."""
    assert state.co_range_sketch is not None
    # Built and used on the CPU, beside the co-range sketch that is kept there.
    basis = shared_basis(
        [state.co_range_sketch[source, t, : co_range[t]] for t in later], state.basis_width
    )
    Z = op.matvec(basis.to(op.device, op.dtype)).to("cpu")
    if state.range_sketch is None:
        n, rows = atlas.n_layers, op.shape[0] // len(later)
        shape = (n, n, rows, state.range_width)
        state.range_sketch = torch.full(shape, float("nan"), dtype=atlas.singular_values.dtype)
    for t in later:
        sig, nxt, V = top_k_in_basis(Z[op.rows(t)], basis, atlas.k)
        atlas.store_pair(source, t, sig, nxt, V)
        m = directions[t]
        state.range_sketch[source, t, :, :m] = top_directions(Z[op.rows(t)], m)
        done()


def co_range_phase(
    atlas: SensitivityAtlas,
    state: SketchState,
    graph: Callable[[], RecordedPass],
    widths: dict[int, int],
    progress: bool,
    ckpt: Path | None,
) -> None:
    """Per target layer, one vmapped VJP sketches Ψᵀ J_{s,t} for every earlier source
    (``widths[t]`` rows; the rest of the widest sketch's rows stay NaN)."""
    n, d = atlas.n_layers, int(atlas.right_vectors.shape[-1])
    dtype = atlas.singular_values.dtype
    if state.co_range_sketch is None:
        shape = (n, n, state.co_range_width, d)
        state.co_range_sketch = torch.full(shape, float("nan"), dtype=dtype)
    passes = target_passes(atlas, state, state.completed_targets, "targets", progress, ckpt)
    for t, earlier in passes:
        op = graph().operator(earlier, t)
        psi = gaussian_block(op.shape[0], widths[t], atlas.seed, -1 - t, dtype)
        W = op.rmatvec(psi.to(op.dtype)).to("cpu", dtype)
        for s in earlier:
            state.co_range_sketch[s, t, : widths[t]] = W[op.columns(s)].T


def refine_phase(
    atlas: SensitivityAtlas,
    state: SketchState,
    graph: Callable[[], RecordedPass],
    directions: dict[int, int],
    progress: bool,
    ckpt: Path | None,
) -> None:
    """Per target layer, one vmapped VJP of a basis Q shared by its sources, built from
    their pairs' top directions of J_{s,t} P (``directions[t]`` each); a pair keeps
    Qᵀ J_{s,t}'s top-k where they hold more of its spectrum than the first estimate (both
    are lower bounds)."""
    # Left directions each polished pair starts from: its top 2k within Q.
    m = min(REFINE_DIRECTIONS * atlas.k, state.basis_width, int(atlas.right_vectors.shape[-1]))
    for t, earlier in target_passes(atlas, state, state.refined_targets, "refine", progress, ckpt):
        assert state.range_sketch is not None
        # No wider than the directions it is built from: completing a basis of the target's
        # rows (batch x positions x d_model) would cost a dense SVD of that size.
        mine = directions[t]
        width = min(REFINE_FACTOR * atlas.sketch_rank, len(earlier) * mine)
        basis = shared_basis([state.range_sketch[s, t, :, :mine].T for s in earlier], width)
        op = graph().operator(earlier, t)
        B = op.rmatvec(basis.to(op.device, op.dtype)).to("cpu")
        for s in earlier:
            R = B[op.columns(s)].T.double()  # Qᵀ J_{s,t}
            sig, nxt, V, W = top_k_of_rows(R, atlas.k)
            if holds_more(atlas, s, t, sig):
                atlas.store_pair(s, t, sig, nxt, V)
            if t - s <= POLISH_HOPS:
                # The Krylov step starts from this pass's top left directions U = Q W,
                # whose Uᵀ J (their singular values times the right vectors) is known.
                if state.polish_basis is None:
                    n, rows = atlas.n_layers, basis.shape[0]
                    d = int(atlas.right_vectors.shape[-1])
                    dtype = atlas.singular_values.dtype
                    state.polish_basis = torch.full((n, n, rows, m), float("nan"), dtype=dtype)
                    state.polish_rows = torch.full((n, n, m, d), float("nan"), dtype=dtype)
                assert state.polish_rows is not None
                state.polish_basis[s, t] = basis @ W[:, :m]
                state.polish_rows[s, t] = W[:, :m].T @ R
    if state.range_sketch is not None:
        state.range_sketch = None  # only needed while running
        if ckpt is not None:
            save_checkpoint(ckpt, atlas, state)


def polish_phase(
    atlas: SensitivityAtlas,
    state: SketchState,
    graph: Callable[[], RecordedPass],
    progress: bool,
    ckpt: Path | None,
) -> None:
    """Per pair at most ``POLISH_HOPS`` layers apart, one block Krylov step from the 2k
    left directions U of the refining pass, whose rows Uᵀ J it holds: the top-k of J on the
    left subspace span(U, J Jᵀ U), which holds at least as much of its spectrum as U alone
    (so σ only grow, and stay lower bounds). Two products: J (Jᵀ U), then Jᵀ on the new
    directions."""
    short = [(s, t) for s, t in atlas.pairs() if t - s <= POLISH_HOPS]
    sources = sorted({s for s, _ in short})
    for s in layer_passes(atlas, state, sources, state.polished_sources, "polish", progress, ckpt):
        assert state.polish_basis is not None and state.polish_rows is not None
        for t in [t for source, t in short if source == s]:
            op = graph().operator(s, t)
            U, R = state.polish_basis[s, t].double(), state.polish_rows[s, t].double()
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
            if holds_more(atlas, s, t, sig):
                atlas.store_pair(s, t, sig, nxt, vectors)
    if state.polish_basis is not None:
        state.polish_basis = state.polish_rows = None  # only needed while running
        if ckpt is not None:
            save_checkpoint(ckpt, atlas, state)


def holds_more(atlas: SensitivityAtlas, s: int, t: int, sig: Tensor) -> bool:
    """Whether σ_1..σ_k hold more of the pair's spectrum (Σσ²) than its estimate so far."""
    return float((sig.double() ** 2).sum()) > float(
        (atlas.singular_values[s, t].double() ** 2).sum()
    )


def target_passes(
    atlas: SensitivityAtlas,
    state: SketchState,
    done: list[int],
    what: str,
    progress: bool,
    ckpt: Path | None,
) -> Iterator[tuple[int, list[int]]]:
    """Each target layer not yet in ``done``, with its earlier sources (see ``layer_passes``)."""
    todo = [t for t in atlas.targets if any(s < t for s in atlas.sources)]
    for t in layer_passes(atlas, state, todo, done, what, progress, ckpt):
        yield t, [s for s in atlas.sources if s < t]


def layer_passes(
    atlas: SensitivityAtlas,
    state: SketchState,
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
                save_checkpoint(ckpt, atlas, state)
            bar.update(1)
