"""MELBO: unsupervised steering vectors by maximising a later layer's change.

Mack & Turner (2024) learn vectors θ of norm R at a source hook that maximise how much a
target activation Z moves, over prompts b and the last positions t:

    Δ(θ) = Σ_b ( Σ_t ‖Z_{b,t}(θ) − Z_{b,t}(0)‖₂^p )^{1/q}

one vector at a time, each orthogonal to the ones before. Here θ = R·u with u on the
unit sphere; each step is a projected-gradient Adam step (the gradient's radial part and
its part along earlier vectors removed, then u projected back onto the sphere), with a
cosine-decayed learning rate so that the iterate settles. For a linear map Z(θ) = Aθ and
p = 2, q = 1, Δ(θ) = ‖Aθ‖², whose maximisers are the top right singular vectors of A: the
small-radius limit of MELBO is Power Steering.

>>> import torch
>>> from tl_powersteer.baselines import melbo_optimise
>>> A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
>>> U, objective, _, calls = melbo_optimise(lambda th: (A @ th)[None, None], 3,
...                                         n_vectors=2, radius=1.0, steps=200)
>>> U.abs().argmax(dim=1).tolist(), [round(float(x), 2) for x in objective]
([0, 1], [9.0, 4.0])
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..adapters import Model, ModelAdapter, Prompts
from ..checks import check_seed, is_int, is_number, plain_ints, renamed_attribute, renamed_options
from ..io import register
from ..io import save as save_result
from ..jacobian import LayerJacobian
from ..models import model_provenance
from ..vectors import SteeringVector

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["MelboResult", "check_melbo_options", "melbo", "melbo_optimise"]


# Former option names that still work for one release.
RENAMED = {"positions": "target_positions"}


def _objective(delta: Tensor, p: float, q: float) -> Tensor:
    """Σ_b (Σ_t ‖Δ_{b,t}‖₂^p)^{1/q} for Δ of shape [batch, positions, d]."""
    return (delta.norm(dim=-1).pow(p).sum(dim=-1)).pow(1.0 / q).sum()


def melbo_optimise(
    fn: Callable[[Tensor], Tensor],
    d: int,
    *,
    n_vectors: int,
    radius: float,
    steps: int,
    p: float = 2.0,
    q: float = 1.0,
    lr: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: Callable[[], None] | None = None,
) -> tuple[Float[Tensor, "n d"], Float[Tensor, " n"], Float[Tensor, "n steps"], int]:
    """MELBO on any differentiable ``fn(θ) -> Δ [batch, positions, d_out]`` (Δ(0) = 0).

    Returns (unit vectors, final objective of each, objective per step, calls of ``fn``);
    every call is one forward and one backward pass except the final evaluations.
    """
    gen = torch.Generator().manual_seed(seed)
    found: list[Tensor] = []
    finals, history = [], torch.zeros(n_vectors, steps, dtype=torch.float64)
    calls = 0

    def orthogonal(x: Tensor) -> Tensor:
        for w in found:
            x = x - (x @ w) * w
        return x

    for i in range(n_vectors):
        start = orthogonal(torch.randn(d, generator=gen, dtype=torch.float64).to(device, dtype))
        u = (start / start.norm()).requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.enable_grad():
                value = _objective(fn(radius * u), p, q)
                (grad,) = torch.autograd.grad(value, u)
            calls += 1
            history[i, step] = float(value.detach())
            with torch.no_grad():
                # Ascent on the sphere, inside the complement of earlier vectors.
                g = orthogonal(grad - (grad @ u) * u)
                u.grad = -g
                opt.step()
                u.copy_(orthogonal(u))
                u.div_(u.norm())
            if progress is not None:
                progress()
        with torch.no_grad():
            finals.append(float(_objective(fn(radius * u), p, q)))
        calls += 1
        found.append(u.detach().clone())
    return torch.stack(found), torch.tensor(finals, dtype=torch.float64), history, calls


@register(renamed={"positions": "target_positions"})
@dataclass
class MelboResult:
    """MELBO vectors of one (source, target) pair, each of norm ``radius``.

    ``vectors`` are unit directions (each orthogonal to the earlier ones), ``objective``
    their final Δ(θ), ``history`` Δ after every step. ``n_forward``/``n_backward`` count
    passes through the model segment, ``seconds`` the wall time.
    """

    vectors: Float[Tensor, "n_vectors d_model"]
    objective: Float[Tensor, " n_vectors"]
    history: Float[Tensor, "n_vectors steps"]
    radius: float
    p: float
    q: float
    steps: int
    source: int
    target: int
    source_site: str
    target_site: str
    target_positions: int
    n_forward: int
    n_backward: int
    seconds: float
    model_name: str
    prompts: list[str] | None
    tokens: Tensor | None = None
    seed: int = 0
    lr: float = 0.2
    metadata: dict[str, Any] = field(default_factory=dict)
    # ``model_provenance`` of the model ({} in files of earlier releases).
    provenance: dict[str, Any] = field(default_factory=dict)

    positions = renamed_attribute("positions", "target_positions")

    @plain_ints
    def steering_vector(self, i: int = 0) -> SteeringVector:
        """Vector ``i`` as a ``SteeringVector`` (``norm`` = the radius it was found at)."""
        n = int(self.vectors.shape[0])
        if not is_int(i) or not -n <= i < n:
            raise ValueError(f"vector index {i!r} is out of range: this result has {n} vectors")
        i %= n
        return SteeringVector(
            self.vectors[i].clone(),
            layer=self.source,
            site=self.source_site,
            method="melbo",
            norm=self.radius,
            metadata={
                "name": f"melbo L{self.source}->L{self.target} #{i}",
                "model_name": self.model_name,
                "target": self.target,
                "target_site": self.target_site,
                "index": i,
                "radius": self.radius,
                "objective": float(self.objective[i]),
                "provenance": self.provenance,
            },
        )

    def to_pandas(self) -> pd.DataFrame:
        """One row per vector: index, objective, radius, p, q, passes."""
        import pandas as pd

        return pd.DataFrame(
            {
                "index": range(int(self.vectors.shape[0])),
                "objective": self.objective.tolist(),
                "radius": self.radius,
                "p": self.p,
                "q": self.q,
                "n_forward": self.n_forward,
                "n_backward": self.n_backward,
            }
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.safetensors`` file (tensors, plus JSON metadata in its header)."""
        save_result(self, path)


def _positive(value: Any, what: str) -> float:
    if not is_number(value):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be positive and finite, got {value!r}")
    return float(value)


def check_melbo_options(
    adapter: ModelAdapter,
    *,
    n_vectors: Any,
    radius: Any,
    steps: Any,
    p: Any = 2.0,
    q: Any = 1.0,
    lr: Any = 0.2,
    seed: Any = 0,
) -> tuple[float | None, float, float, float]:
    """``melbo``'s own options checked, with no forward pass; ``radius`` None (chosen
    later from the activations) is let through. Returns ``(radius, p, q, lr)``."""
    radius = radius if radius is None else _positive(radius, "radius")
    p, q, lr = _positive(p, "p"), _positive(q, "q"), _positive(lr, "lr")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    d = adapter.d_model
    if not is_int(n_vectors) or not 1 <= n_vectors <= d:
        raise ValueError(f"n_vectors must be an int between 1 and d_model = {d}, got {n_vectors!r}")
    check_seed(seed)
    return radius, p, q, lr


@plain_ints
def melbo(
    model: Model | ModelAdapter,
    prompts: Prompts,
    source: int,
    target: int,
    *,
    n_vectors: int = 4,
    radius: float,
    steps: int = 300,
    p: float = 2.0,
    q: float = 1.0,
    target_positions: int = 4,
    source_site: str = "hook_mlp_out",
    target_site: str = "hook_mlp_out",
    lr: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    **renamed: Any,
) -> MelboResult:
    """MELBO vectors of norm ``radius`` at ``blocks.{source}.{source_site}`` (added at every
    position), maximising the change of ``blocks.{target}.{target_site}`` at the last
    ``target_positions`` tokens (see the module docstring).

    ``radius`` is in activation units; ``typical_norm`` of the source
    activation is a good yardstick (the paper tunes R to the edge of coherent text).
    ``lr`` is Adam's step on the unit sphere, decayed to 0 over ``steps``. ``positions``
    is the former name of ``target_positions``.
    """
    target_positions = renamed_options("melbo", renamed, RENAMED).get(
        "target_positions", target_positions
    )
    adapter = ModelAdapter.of(model)
    radius = _positive(radius, "radius")
    _, p, q, lr = check_melbo_options(
        adapter, n_vectors=n_vectors, radius=radius, steps=steps, p=p, q=q, lr=lr, seed=seed
    )
    adapter.resolve_pair(source, target)
    op = LayerJacobian(
        adapter, prompts, source, target,
        source_site=source_site, target_site=target_site, target_positions=target_positions,
    )  # fmt: skip
    d = op.shape[1]
    batch_size = op.batch.tokens.shape[0]
    base = op.target_value

    def change(theta: Tensor) -> Tensor:
        return (op.readout(theta) - base).view(batch_size, target_positions, -1)

    from tqdm.auto import tqdm

    began = time.perf_counter()
    with tqdm(total=n_vectors * steps, desc="MELBO", unit="step", disable=not progress) as bar:
        U, objective, history, calls = melbo_optimise(
            change, d, n_vectors=n_vectors, radius=radius, steps=steps, p=p, q=q, lr=lr,
            seed=seed, dtype=op.dtype, device=op.device, progress=lambda: bar.update(1),
        )  # fmt: skip
    seconds = time.perf_counter() - began
    return MelboResult(
        vectors=U.detach().cpu(),
        objective=objective,
        history=history,
        radius=radius,
        p=p,
        q=q,
        steps=steps,
        source=op.source,
        target=op.target,
        source_site=source_site,
        target_site=target_site,
        target_positions=target_positions,
        n_forward=calls + 1,  # and the unsteered pass
        n_backward=n_vectors * steps,
        seconds=seconds,
        model_name=op.adapter.name,
        provenance=model_provenance(op.adapter),
        **op.batch.provenance(),
        seed=seed,
        lr=lr,
    )
