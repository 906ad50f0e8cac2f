"""The one steering-vector type: a unit direction at a TransformerLens hook, with provenance.

Every method (Power Steering, CAA, probes, MELBO, random controls) returns
``SteeringVector`` objects, so that ``steer``, ``effect`` and ``rank_vectors`` treat them
alike.

>>> import torch
>>> from tl_powersteer import SteeringVector
>>> v = SteeringVector(torch.tensor([3.0, 4.0]), layer=2, site="hook_resid_post", method="custom")
>>> v.direction.tolist(), v.hook_name, v.name
([0.6000000238418579, 0.800000011920929], 'blocks.2.hook_resid_post', 'custom L2')
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .adapters import ModelAdapter
from .checks import check_seed, is_int, plain_ints
from .io import register
from .io import save as save_result
from .models import model_provenance

__all__ = ["SteeringVector", "check_vector", "random_vectors", "vector_list"]


@register()
@dataclass
class SteeringVector:
    """A unit direction at the hook ``blocks.{layer}.{site}``, with its provenance.

    ``norm`` is the method's own magnitude for the vector (the CAA mean difference's norm,
    MELBO's radius, 1 for Power Steering), so ``scale=vector.norm`` in absolute mode adds
    the vector the method found. ``metadata`` holds JSON-friendly provenance (layers,
    prompts, rank, singular value, ...); ``metadata["name"]`` labels the vector in tables,
    and ``metadata["provenance"]`` describes the model that made it (``model_provenance``),
    so that ``steer`` can refuse or warn about a vector used on another model.
    The direction is kept on the CPU, so vectors found on different devices mix freely;
    it moves to the model's device where it is added.
    """

    direction: Float[Tensor, " d_model"]
    layer: int
    site: str
    method: str
    norm: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.direction, Tensor) or not self.direction.is_floating_point():
            raise TypeError(
                f"direction must be a float tensor [d_model], got {type(self.direction).__name__}"
            )
        if self.direction.ndim != 1:
            raise ValueError(
                f"direction must be one vector [d_model], got shape {tuple(self.direction.shape)}"
            )
        self.direction = self.direction.detach().cpu()
        length = float(self.direction.double().norm())
        if not math.isfinite(length) or length == 0:
            raise ValueError("direction must be finite and non-zero")
        if abs(length - 1) > 1e-6:
            self.direction = self.direction / length
        if not is_int(self.layer):
            raise TypeError(f"layer must be an int, got {self.layer!r}")
        self.layer = operator.index(self.layer)
        if not isinstance(self.site, str) or not isinstance(self.method, str):
            raise TypeError("site and method must be strings")

    @property
    def d_model(self) -> int:
        return int(self.direction.shape[0])

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.{self.site}"

    @property
    def name(self) -> str:
        """A short label: ``metadata["name"]`` or method and layer."""
        return str(self.metadata.get("name") or f"{self.method} L{self.layer}")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.safetensors`` file (tensors, plus JSON metadata in its header)."""
        save_result(self, path)


@plain_ints
def random_vectors(
    d_model: int, layer: int, site: str, n: int, *, seed: int = 0
) -> list[SteeringVector]:
    """``n`` random unit directions (the control baseline), reproducible from ``seed``."""
    check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d_model, generator=gen, dtype=torch.float64)
    return [
        SteeringVector(
            (row / row.norm()).float(),
            layer=layer,
            site=site,
            method="random",
            metadata={"name": f"random#{i} L{layer}", "seed": seed, "index": i},
        )
        for i, row in enumerate(rows)
    ]


def vector_list(vectors: SteeringVector | Sequence[SteeringVector]) -> list[SteeringVector]:
    items = [vectors] if isinstance(vectors, SteeringVector) else vectors
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise TypeError(
            f"expected a SteeringVector or a list of them, got {type(vectors).__name__}"
        )
    items = list(items)
    if not items:
        raise ValueError("no steering vectors given: pass at least one SteeringVector")
    for v in items:
        if not isinstance(v, SteeringVector):
            raise TypeError(f"expected SteeringVector objects, got {type(v).__name__}")
    return items


def check_vector(adapter: ModelAdapter, vector: SteeringVector) -> str:
    """The vector's hook name, after checking it fits the model.

    A vector made for a model of another width or layer count is refused; one made on
    another model of the same shape (another architecture config, or other weights) is
    used, with a warning, once per adapter.
    """
    if vector.d_model != adapter.d_model:
        raise ValueError(
            f"{vector.name} has width {vector.d_model} but the model's d_model is "
            f"{adapter.d_model}: it was made for another model"
        )
    made = vector.metadata.get("provenance")
    if isinstance(made, dict):
        layers = made.get("n_layers")
        if is_int(layers) and layers != adapter.n_layers:
            raise ValueError(
                f"{vector.name} was made for a model with {layers} layers "
                f"({made.get('model_name')}), but this model ({adapter.name}) has "
                f"{adapter.n_layers}: it was made for another model"
            )
        reason = _other_model(adapter, made)
        key = f"{id(vector)} {reason}"
        if reason is not None and key not in adapter.warned:
            adapter.warned.add(key)
            warnings.warn(
                f"{vector.name} was made on {made.get('model_name')}, and this model "
                f"({adapter.name}) has the same shape but {reason}: the direction may not "
                "mean the same here",
                UserWarning,
                stacklevel=3,
            )
    return adapter.hook_name(vector.layer, vector.site)


def _other_model(adapter: ModelAdapter, made: dict[str, Any]) -> str | None:
    """How the model differs from the one a vector's provenance describes, if it does."""
    mine = model_provenance(adapter)
    if made.get("config_hash") and made["config_hash"] != mine["config_hash"]:
        return "another architecture configuration (config_hash)"
    if made.get("kind") == mine["kind"]:
        theirs = made.get("weights_fingerprint")
        if theirs and theirs != mine["weights_fingerprint"]:
            return "other weights (weights_fingerprint)"
    # The two model classes name their weights differently; an embedded file's digest
    # still tells them apart.
    elif made.get("gguf_sha256") and mine.get("gguf_sha256") not in (None, made["gguf_sha256"]):
        return "weights from another file (gguf_sha256)"
    return None
