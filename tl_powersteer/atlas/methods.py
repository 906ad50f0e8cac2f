"""The atlas's exact and power methods, one source layer at a time.

* exact: one chunked, vmapped product with the identity captures J_{s,t} for every later
  target of the source in the same pass; each pair's top-k then come from its Gram matrix
  and a float64 Rayleigh-Ritz step (``top_k_svd``).
* power: per pair, block power iteration on k + 1 vectors (``power_steer``'s engine).
"""

from __future__ import annotations

from collections.abc import Callable

from ..jacobian import RecordedPass
from ..linalg import block_power_iteration, top_k_svd
from .result import SensitivityAtlas

__all__ = ["exact_source", "power_source"]


def exact_source(
    atlas: SensitivityAtlas,
    graph: RecordedPass,
    source: int,
    later: list[int],
    done: Callable[[], None],
) -> None:
    """Every pair ``source -> t`` for t in ``later``, from one dense product."""
    op = graph.operator(source, later)
    dense = op.dense()
    for t in later:
        sig, nxt, V = top_k_svd(dense[op.rows(t)], atlas.k)
        atlas.store_pair(source, t, sig, nxt, V)
        atlas.converged[source, t] = True
        done()


def power_source(
    atlas: SensitivityAtlas,
    graph: RecordedPass,
    source: int,
    later: list[int],
    done: Callable[[], None],
    *,
    tol: float,
    max_iters: int,
) -> None:
    """Every pair ``source -> t`` for t in ``later``, by block power iteration each."""
    k = atlas.k
    for t in later:
        op = graph.operator(source, t)
        found = block_power_iteration(op, k + 1, tol=tol, max_iters=max_iters, seed=atlas.seed)
        sig = found.singular_values
        atlas.store_pair(source, t, sig[:k], sig[k], found.vectors[:k])
        atlas.iterations[source, t] = found.iterations
        atlas.converged[source, t] = found.converged
        done()
