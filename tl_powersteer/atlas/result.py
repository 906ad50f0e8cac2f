"""The sensitivity atlas's result: the top spectra of every (source, target) pair.

``SensitivityAtlas`` holds, for each computed pair s -> t, the top-k singular values σ of
J_{s,t} (and σ_{k+1}, for the spectral gap σ_k / σ_{k+1}) and its top-k right singular
vectors, in tensors indexed by layer number: ``singular_values[s, t]``. It is made by
``sensitivity_atlas``; the sketch method's working state while it runs is kept beside it
(``tl_powersteer.atlas.checkpoint``), not in it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..checks import is_int, plain_ints, renamed_attribute
from ..io import register
from ..io import save as save_result
from ..linalg import spectrum_problem
from ..power_steering import power_steering_vector
from ..vectors import SteeringVector

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FORMER_FIELDS", "SensitivityAtlas"]

# Fields that files of earlier versions, or checkpoints of a sketch in progress, also hold:
# the sketch's widths and working state (see ``tl_powersteer.atlas.checkpoint``).
FORMER_FIELDS = (
    "co_range_width",
    "basis_width",
    "range_width",
    "co_range_sketch",
    "completed_targets",
    "range_sketch",
    "refined_targets",
    "polish_basis",
    "polish_rows",
    "polished_sources",
)


def _check_loaded(atlas: SensitivityAtlas) -> None:
    """A finished source's pairs hold finite, non-negative, descending spectra."""
    unknown = sorted(set(atlas.completed_sources) - set(atlas.sources))
    if unknown:
        raise ValueError(f"its finished sources {unknown} are not among its sources")
    for s, t in atlas.pairs():
        if s not in atlas.completed_sources:
            continue
        values = torch.cat([atlas.singular_values[s, t], atlas.next_singular_value[s, t, None]])
        problem = spectrum_problem(values, atlas.right_vectors[s, t])
        if problem is not None:
            raise ValueError(f"the finished pair L{s} -> L{t} has {problem}")


@register(renamed={"positions": "target_positions"}, dropped=FORMER_FIELDS, check=_check_loaded)
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
    target_positions: int
    seed: int
    model_name: str
    prompts: list[str] | None
    tokens: Tensor | None = None
    completed_sources: list[int] = field(default_factory=list)
    # Sketch method only (0 or "" for other methods): r, its width, and the dtype its
    # products' matrix multiplications rounded their factors to.
    sketch_rank: int = 0
    sketch_matmul_dtype: str = ""
    # ``ModelAdapter.weights_fingerprint`` of the model ("" in files of the first release).
    weights_fingerprint: str = ""
    # ``model_provenance`` of the model ({} in files of earlier releases).
    provenance: dict[str, Any] = field(default_factory=dict)

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

    @plain_ints
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
                        target_positions=self.target_positions,
                        rank=rank,
                        singular_value=float(self.singular_values[s, t, rank]),
                        model_name=self.model_name,
                        atlas_method=self.method,
                        provenance=self.provenance,
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
            f"target_positions={self.target_positions}"
        )
        if done:
            top = self.singular_values[..., 0].nan_to_num(-1.0)
            s, t = divmod(int(top.argmax()), self.n_layers)
            text += f", largest σ1 {float(top[s, t]):.4g} at L{s} -> L{t}"
        return text + ")"

    def spectral_gap(self) -> Float[Tensor, "n_layers n_layers"]:
        """σ_k / σ_{k+1} per pair: near 1, the k-th vector is not separated from the next."""
        return self.singular_values[..., -1] / self.next_singular_value

    def to_pandas(self) -> pd.DataFrame:
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

    def store_pair(self, s: int, t: int, sig: Tensor, nxt: Tensor, vectors: Tensor) -> None:
        """Record one pair's top-k, σ_{k+1} and vectors in the atlas's dtype, on the CPU
        (the atlas's methods call it as they go)."""
        dtype = self.singular_values.dtype
        self.singular_values[s, t] = sig.to("cpu", dtype)
        self.next_singular_value[s, t] = nxt.to("cpu", dtype)
        self.right_vectors[s, t] = vectors.to("cpu", dtype)

    def settings(self) -> dict[str, Any]:
        """What this atlas was computed from; a checkpoint resumes only with the same."""
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
            "target_positions": self.target_positions,
            "seed": self.seed,
            "sketch_rank": self.sketch_rank,
            "sketch_matmul_dtype": self.sketch_matmul_dtype,
            "prompts": self.prompts,
            "tokens": None if self.tokens is None else self.tokens.tolist(),
            "weights_fingerprint": self.weights_fingerprint,
        }

    @property
    def method_label(self) -> str:
        """The method that ran, with the sketch's settings (how approximate the map is)."""
        if self.method != "sketch":
            return self.method
        products = f", {self.sketch_matmul_dtype} products" if self.sketch_matmul_dtype else ""
        return f"sketch (r = {self.sketch_rank}{products})"

    positions = renamed_attribute("positions", "target_positions")
