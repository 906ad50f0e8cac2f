"""Power Steering: the top right-singular vectors of a layer-to-layer Jacobian.

With J = ∂ target / ∂ v (see :mod:`tl_powersteer.jacobian`) and its SVD
J ≈ U diag(σ) Vᵀ, the rows of ``vectors`` are the right singular vectors vᵢ: the
directions at the source hook that the target activation is most sensitive to, with
J vᵢ ≈ σᵢ uᵢ. They come from block power iteration with Rayleigh-Ritz
(:mod:`tl_powersteer.linalg`) using only JVPs and VJPs; J is never formed.

Signs are arbitrary in an SVD; each vector's largest-magnitude entry is made positive.
Anything that judges a vector's effect should try both +v and -v.

>>> import torch
>>> from transformer_lens.config import TransformerBridgeConfig
>>> from transformer_lens.model_bridge import TransformerBridge
>>> import tl_powersteer as tps
>>> cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_heads=2, n_layers=3, n_ctx=16,
...                               d_vocab=20, d_mlp=16, act_fn="gelu", seed=0)
>>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64)
>>> res = tps.power_steer(model, torch.tensor([[1, 2, 3, 4, 5]]), source=0, target=2, k=2)
>>> res.vectors.shape, res.singular_values.shape
(torch.Size([2, 8]), torch.Size([2]))
>>> bool(res.singular_values[0] >= res.singular_values[1])
True
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from .adapters import Model, ModelAdapter, Prompts
from .checks import check_seed, is_int, plain_ints, renamed_attribute, renamed_options
from .io import register
from .io import save as save_result
from .jacobian import LayerJacobian
from .linalg import block_power_iteration, check_iteration_args, spectrum_problem
from .models import model_provenance
from .vectors import SteeringVector

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PowerSteeringResult", "power_steer", "power_steering_name", "power_steering_vector"]

# Former option names that still work for one release.
RENAMED = {"positions": "target_positions"}


def power_steering_name(source: int, target: int, rank: int) -> str:
    """The name of a pair's vector of this rank, as tables list it."""
    return f"power_steering L{source}->L{target} #{rank}"


def power_steering_vector(
    direction: Tensor,
    *,
    source: int,
    target: int,
    source_site: str,
    target_site: str,
    target_positions: int,
    rank: int,
    singular_value: float,
    **provenance: Any,
) -> SteeringVector:
    """A right singular vector as a ``SteeringVector``, with where it came from."""
    return SteeringVector(
        direction.clone(),
        layer=source,
        site=source_site,
        method="power_steering",
        metadata={
            "name": power_steering_name(source, target, rank),
            "target": target,
            "target_site": target_site,
            "target_positions": target_positions,
            "rank": rank,
            "singular_value": singular_value,
            **provenance,
        },
    )


def _check_loaded(result: PowerSteeringResult) -> None:
    problem = spectrum_problem(result.singular_values, result.vectors)
    if problem is not None:
        raise ValueError(f"it has {problem}")


@register(renamed={"positions": "target_positions"}, check=_check_loaded)
@dataclass
class PowerSteeringResult:
    """Top-k Power Steering vectors of one (source, target) pair: J ≈ U diag(σ) Vᵀ.

    ``residuals[i]`` is the relative residual of the singular triplet,
    ``max(‖J vᵢ − σᵢ uᵢ‖, ‖Jᵀ uᵢ − σᵢ vᵢ‖) / σᵢ``; ``history`` holds the top-k Ritz
    values after every iteration. ``n_jvp`` / ``n_vjp`` count single-vector products.
    ``error_bounds[i]`` bounds the relative error of ``singular_values[i]``, ``angle_bound``
    the largest principal angle (radians) between span(``vectors``) and the exact top-k
    subspace, and ``stop_rule`` names what ended the run (``"tol"``, ``"angle_tol"``,
    ``"tol and angle_tol"`` or ``"max_iters"``); see ``block_power_iteration``. Files of
    earlier releases load with no bounds, ``angle_bound`` π/2 and ``stop_rule`` "".
    Its tensors are on the CPU whatever the model's device, like every result here.
    """

    vectors: Float[Tensor, "k d_model"]
    singular_values: Float[Tensor, " k"]
    left_vectors: Float[Tensor, "k n_out"]
    residuals: Float[Tensor, " k"]
    iterations: int
    converged: bool
    n_jvp: int
    n_vjp: int
    source: int
    target: int
    source_site: str
    target_site: str
    target_positions: int
    model_name: str
    prompts: list[str] | None
    tokens: Tensor | None = None
    seed: int = 0
    history: Float[Tensor, "iterations k"] = field(default_factory=lambda: torch.empty(0, 0))
    # ``model_provenance`` of the model ({} in files of earlier releases).
    provenance: dict[str, Any] = field(default_factory=dict)
    error_bounds: Float[Tensor, " k"] = field(default_factory=lambda: torch.empty(0))
    angle_bound: float = math.pi / 2
    stop_rule: str = ""

    @property
    def k(self) -> int:
        return int(self.singular_values.shape[0])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.safetensors`` file (tensors, plus JSON metadata in its header)."""
        save_result(self, path)

    @plain_ints
    def steering_vector(self, i: int = 0) -> SteeringVector:
        """Right singular vector ``i`` as a ``SteeringVector`` at the source hook."""
        if not is_int(i) or not -self.k <= i < self.k:
            raise ValueError(f"vector index {i!r} is out of range: this result has k={self.k}")
        i %= self.k
        return power_steering_vector(
            self.vectors[i],
            source=self.source,
            target=self.target,
            source_site=self.source_site,
            target_site=self.target_site,
            target_positions=self.target_positions,
            rank=i,
            singular_value=float(self.singular_values[i]),
            model_name=self.model_name,
            prompts=self.prompts,
            provenance=self.provenance,
        )

    positions = renamed_attribute("positions", "target_positions")

    def steering_vectors(self) -> list[SteeringVector]:
        """All k vectors, in rank order."""
        return [self.steering_vector(i) for i in range(self.k)]

    def to_pandas(self) -> pd.DataFrame:
        """One row per vector: rank, singular value, its relative error bound, residual."""
        import pandas as pd

        known = self.error_bounds.numel() == self.k
        return pd.DataFrame(
            {
                "source": self.source,
                "target": self.target,
                "rank": range(self.k),
                "singular_value": self.singular_values.double().cpu().numpy(),
                "error_bound": (
                    self.error_bounds.double().cpu().numpy() if known else [math.nan] * self.k
                ),
                "residual": self.residuals.double().cpu().numpy(),
            }
        )


@plain_ints
def power_steer(
    model: Model | ModelAdapter,
    prompts: Prompts,
    source: int,
    target: int,
    *,
    k: int = 8,
    source_site: str = "hook_mlp_out",
    target_site: str = "hook_mlp_out",
    target_positions: int = 4,
    jvp_method: str = "reverse",
    block_size: int | None = None,
    tol: float = 1e-4,
    angle_tol: float | None = None,
    max_iters: int = 50,
    seed: int = 0,
    **renamed: Any,
) -> PowerSteeringResult:
    """Top-``k`` Power Steering vectors for the pair ``source -> target``.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        prompts: a string, a list of strings (stacked Jacobian), or a token tensor.
        source: source block index; negatives count from the end.
        target: target block index, after ``source``; negatives count from the end.
        k: number of vectors.
        source_site: hook suffix inside the source block where vectors are added.
        target_site: hook suffix inside the target block that is read.
        target_positions: final tokens of each prompt read at the target.
        jvp_method: how J V is computed, ``"reverse"`` or ``"forward"`` (see
            ``LayerJacobian``); both are exact.
        block_size: power-iteration block, default ``k + 4``.
        tol: relative accuracy of every returned singular value: the run stops once an
            error bound computed from the residuals says it is met.
        angle_tol: if given, the run also goes on until the top-k subspace is within this
            many radians of the exact one.
        max_iters: iteration cap.
        seed: seeds the random start; equal seeds give equal vectors.
        **renamed: ``positions``, the former name of ``target_positions``.
    """
    target_positions = renamed_options("power_steer", renamed, RENAMED).get(
        "target_positions", target_positions
    )
    # Every option is checked before the first forward pass.
    adapter = ModelAdapter.of(model)
    adapter.resolve_pair(source, target)
    check_seed(seed)
    check_iteration_args(
        k, adapter.d_model, block_size=block_size, tol=tol, max_iters=max_iters, angle_tol=angle_tol
    )
    op = LayerJacobian(
        adapter,
        prompts,
        source,
        target,
        source_site=source_site,
        target_site=target_site,
        target_positions=target_positions,
        jvp_method=jvp_method,
    )
    found = block_power_iteration(
        op, k, block_size=block_size, tol=tol, angle_tol=angle_tol, max_iters=max_iters, seed=seed
    )
    batch = op.batch
    return PowerSteeringResult(
        vectors=found.vectors.cpu(),
        singular_values=found.singular_values.cpu(),
        left_vectors=found.left_vectors.cpu(),
        residuals=found.residuals.cpu(),
        iterations=found.iterations,
        converged=found.converged,
        n_jvp=op.n_jvp,
        n_vjp=op.n_vjp,
        source=op.source,
        target=op.target,
        source_site=source_site,
        target_site=target_site,
        target_positions=target_positions,
        model_name=op.adapter.name,
        **batch.provenance(),
        seed=seed,
        history=found.history.cpu(),
        provenance=model_provenance(op.adapter),
        error_bounds=found.error_bounds.cpu(),
        angle_bound=found.angle_bound,
        stop_rule=found.stop_rule,
    )
