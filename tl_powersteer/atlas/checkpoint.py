"""The atlas's checkpoint: a ``SensitivityAtlas`` file that also holds the sketch's
working state, so that an interrupted run resumes where it stopped.

The file is an ordinary atlas file (``tl_powersteer.load`` reads the atlas from it, the
working state left out). ``load_checkpoint`` reads both; ``resume`` refuses a checkpoint
made with other arguments.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..io import build_result, read_fields, split_fields, write_fields
from .result import SensitivityAtlas

__all__ = ["SketchState", "load_checkpoint", "resume", "save_checkpoint"]


@dataclass
class SketchState:
    """The sketch method's settings and working state (zeros and empty for other methods).

    Settings: the width of the widest co-range sketch (r, more for a target whose sources
    have too few targets to fill their basis, see ``sketch_widths``), the most columns of
    each source's shared basis, and the most directions of J_{s,t} P a pair gives its
    target's refining basis. While running: Ψᵀ J_{s,t} per pair and the targets done; then
    each pair's top directions of J_{s,t} P and the targets whose pairs are refined; then,
    for each pair the Krylov step will polish, the orthonormal left directions U it starts
    from (2k) and Uᵀ J_{s,t}, and the sources whose short pairs have taken it. Each tensor
    is dropped once its pass is over.
    """

    co_range_width: int = 0
    basis_width: int = 0
    range_width: int = 0
    co_range_sketch: Tensor | None = None
    completed_targets: list[int] = field(default_factory=list)
    range_sketch: Tensor | None = None
    refined_targets: list[int] = field(default_factory=list)
    polish_basis: Tensor | None = None
    polish_rows: Tensor | None = None
    polished_sources: list[int] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        return {
            "co_range_width": self.co_range_width,
            "basis_width": self.basis_width,
            "range_width": self.range_width,
        }


_STATE_FIELDS = tuple(f.name for f in dataclasses.fields(SketchState))


def save_checkpoint(
    path: str | os.PathLike[str], atlas: SensitivityAtlas, state: SketchState
) -> None:
    """Write the atlas and the sketch's state to one file, atomically."""
    tensors, fields = split_fields(atlas)
    state_tensors, state_fields = split_fields(state)
    write_fields(
        path, type(atlas).__name__, {**tensors, **state_tensors}, {**fields, **state_fields}
    )


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[SensitivityAtlas, SketchState]:
    """The atlas and the sketch's state a checkpoint holds."""
    header, stored = read_fields(path)
    if header.get("kind") != SensitivityAtlas.__name__:
        raise ValueError(f"the checkpoint {str(path)!r} holds a {header.get('kind')}, not an atlas")
    state = SketchState(**{name: stored[name] for name in _STATE_FIELDS if name in stored})
    return build_result(header, stored, path), state


def resume(
    fresh: SensitivityAtlas, fresh_state: SketchState, path: str | os.PathLike[str]
) -> tuple[SensitivityAtlas, SketchState]:
    """The checkpoint at ``path``, if it was made with the arguments of ``fresh``."""
    saved, state = load_checkpoint(path)
    mine = {**fresh.settings(), **fresh_state.settings()}
    theirs = {**saved.settings(), **state.settings()}
    if not saved.weights_fingerprint:  # written before atlases recorded their weights
        theirs["weights_fingerprint"] = fresh.weights_fingerprint
    if not saved.provenance:  # nor their model's provenance
        saved.provenance = fresh.provenance
    differ = [key for key in mine if mine[key] != theirs.get(key)]
    if "weights_fingerprint" in differ:
        raise ValueError(
            f"the checkpoint {str(path)!r} was computed on other weights than this model's "
            f"(same name {fresh.model_name!r} and shapes, different weights_fingerprint): "
            "resuming would mix two models; use another checkpoint path or delete this one"
        )
    if differ:
        shown = "; ".join(f"{key}: {theirs.get(key)!r} there, {mine[key]!r} now" for key in differ)
        raise ValueError(
            f"the checkpoint {str(path)!r} was made with other arguments ({shown}); "
            "rerun with the same arguments or use another checkpoint path"
        )
    return saved, state
