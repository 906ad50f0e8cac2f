"""Atlas shards: parts of one atlas computed as independent jobs, merged into one.

A shard is the atlas of some of the source layers (``sensitivity_atlas(..., sources=...)``,
``tl-powersteer atlas --sources a:b``), computed on any machine. Every other argument
must be the same in all shards: the model (its weights fingerprint), the prompts, the
sites, k, the method and its settings, the targets and the seed. Each source layer's
pairs depend only on that layer with the exact and power methods, so their shards merge
to exactly the atlas one run would have computed. The sketch shares its random bases
among the pairs of the run that computed them, so a merged sketch is a valid sketch atlas
(its σ, in full precision, are still lower bounds of the exact ones) but not the
unsharded one to the last digit; its shards should not overlap.

A source layer computed in two shards must agree in both (σ within ``rtol``, and the
vectors of well separated singular values up to sign), so that a merge never silently
picks one of two different answers.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..checks import is_number
from ..io import load
from .result import SensitivityAtlas

__all__ = ["merge_atlases"]

# Singular values this much apart (relative) are "well separated": their vectors are
# determined up to sign, and must agree between shards.
_SEPARATED = 1e-2
# |cos| between two shards' vectors of a well separated singular value.
_SAME_DIRECTION = 1 - 1e-3
# The atlas's tensors indexed by source layer first: what a shard contributes.
_PER_SOURCE = (
    "singular_values",
    "next_singular_value",
    "right_vectors",
    "iterations",
    "converged",
    "source_norms",
)


def merge_atlases(
    shards: Sequence[SensitivityAtlas | str | os.PathLike[str]], *, rtol: float = 1e-4
) -> SensitivityAtlas:
    """One atlas from shards that computed different source layers of it.

    Args:
        shards: ``SensitivityAtlas`` objects or paths of their ``.safetensors`` files, each
            complete (an interrupted shard resumes when its command is rerun).
        rtol: the relative difference of σ allowed where two shards computed the same
            source layer (different machines round differently).

    Returns the atlas of the union of the shards' sources. Shards that differ in anything
    but their sources are refused, naming the setting, as are unfinished shards and
    overlapping sources whose results disagree. The shards are not modified.
    """
    if not is_number(rtol) or not 0 <= rtol < 1:
        raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}")
    atlases = _load_shards(shards)
    first = atlases[0]
    reference = _matched_settings(first)
    for i, atlas in enumerate(atlases[1:], start=1):
        mine = _matched_settings(atlas)
        for key, value in reference.items():
            if mine[key] != value:
                raise ValueError(
                    f"shard {i} was computed with another {key} than shard 0 "
                    f"({_short(mine[key])} vs {_short(value)}): shards of one atlas differ "
                    "only in their sources; recompute it with shard 0's arguments"
                )
    merged = copy.deepcopy(first)
    owner = dict.fromkeys(first.sources, 0)
    for i, atlas in enumerate(atlases[1:], start=1):
        for s in atlas.sources:
            if s in owner:
                _check_agreement(merged, atlas, s, (owner[s], i), rtol)
                continue
            owner[s] = i
            _copy_source(atlas, merged, s)
    merged.sources = sorted(owner)
    merged.completed_sources = sorted(owner)
    return merged


def _load_shards(
    shards: Sequence[SensitivityAtlas | str | os.PathLike[str]],
) -> list[SensitivityAtlas]:
    if isinstance(shards, (str, os.PathLike, SensitivityAtlas)) or not isinstance(shards, Sequence):
        raise TypeError(
            f"shards must be a list of SensitivityAtlas objects or file paths, got "
            f"{type(shards).__name__}"
        )
    if not shards:
        raise ValueError("shards is empty: give the atlases to merge")
    atlases = []
    for i, shard in enumerate(shards):
        if isinstance(shard, (str, os.PathLike)):
            path = Path(shard)
            if not path.is_file():
                raise ValueError(f"shard {i}: {path} is not a file")
            shard = load(path)
            if not isinstance(shard, SensitivityAtlas):
                raise TypeError(f"shard {i}: {path} holds a {type(shard).__name__}, not an atlas")
        elif not isinstance(shard, SensitivityAtlas):
            raise TypeError(
                f"shard {i} is a {type(shard).__name__}; expected a SensitivityAtlas or the "
                "path of its .safetensors file"
            )
        if not shard.is_complete():
            left = sorted(set(shard.sources) - set(shard.completed_sources))
            raise ValueError(
                f"shard {i} has not finished source layers {left}: rerun its command (it "
                "resumes from its checkpoint), then merge"
            )
        atlases.append(shard)
    return atlases


def _matched_settings(atlas: SensitivityAtlas) -> dict[str, Any]:
    """Everything shards must share: the atlas's settings but its sources, its dtype, and
    the model's architecture."""
    settings = atlas.settings()
    del settings["sources"]
    settings["dtype"] = str(atlas.singular_values.dtype).removeprefix("torch.")
    settings["config_hash"] = atlas.provenance.get("config_hash")
    return settings


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _copy_source(shard: SensitivityAtlas, merged: SensitivityAtlas, s: int) -> None:
    """Source layer ``s``'s pairs (and its norm) from ``shard`` into ``merged``."""
    for name in _PER_SOURCE:
        getattr(merged, name)[s] = getattr(shard, name)[s]


def _check_agreement(
    merged: SensitivityAtlas, shard: SensitivityAtlas, s: int, which: tuple[int, int], rtol: float
) -> None:
    """Two shards' results for source layer ``s`` are the same up to rounding."""

    def disagree(what: str) -> ValueError:
        return ValueError(
            f"shards {which[0]} and {which[1]} both computed source layer {s} and disagree "
            f"on {what}: give each source layer to one shard"
            + (
                " (a sketch's results depend on the other layers of its run)"
                if merged.method == "sketch"
                else ", or recompute one of them"
            )
        )

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(torch.all((a - b).abs() <= rtol * torch.maximum(a.abs(), b.abs())))

    if not close(merged.source_norms[s, None], shard.source_norms[s, None]):
        raise disagree(f"the source norm ({float(merged.source_norms[s]):.6g} vs "
                       f"{float(shard.source_norms[s]):.6g})")  # fmt: skip
    for t in merged.targets:
        if t <= s:
            continue
        ours = torch.cat([merged.singular_values[s, t], merged.next_singular_value[s, t, None]])
        theirs = torch.cat([shard.singular_values[s, t], shard.next_singular_value[s, t, None]])
        if not close(ours, theirs):
            rank = int(((ours - theirs).abs() / torch.maximum(ours, theirs)).argmax())
            raise disagree(
                f"σ{rank + 1} of L{s} -> L{t} ({float(ours[rank]):.6g} vs "
                f"{float(theirs[rank]):.6g})"
            )
        gaps = (ours[:-1] - ours[1:]).tolist()  # σ_r - σ_{r+1}, for r = 1..k
        for rank in range(merged.k):
            above = gaps[rank - 1] if rank else float("inf")
            if min(above, gaps[rank]) <= _SEPARATED * float(ours[0]):
                continue  # in a near-flat band the vectors are not unique
            cos = torch.dot(merged.right_vectors[s, t, rank], shard.right_vectors[s, t, rank])
            if abs(float(cos)) < _SAME_DIRECTION:
                raise disagree(f"vector #{rank} of L{s} -> L{t} (|cos| {abs(float(cos)):.4f})")
