"""Power Steering, MELBO and CAA on the same pair and prompts, compared like for like.

Each method's vectors live at the same source hook. They are compared by what they cost
(passes through the model and seconds), by their effect at the same KL budget
(``rank_vectors``, best of both signs, random directions as control),
and by how they align: the largest |cosine| between a vector and the other methods'
vectors (do Power Steering's directions match CAA's contrast direction? MELBO's?).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from .adapters import Model, ModelAdapter
from .baselines.caa import caa_vector
from .baselines.melbo import melbo
from .effects import Metric, check_metric, rank_vectors
from .power_steering import power_steer
from .scales import check_scale, typical_norm
from .vectors import SteeringVector

__all__ = ["compare_methods", "cosine_table"]

_METHODS = ("power_steering", "melbo", "caa")


def compare_methods(
    model: Model | ModelAdapter,
    prompts: Sequence[str],
    source: int,
    target: int,
    *,
    k: int = 4,
    positive: Sequence[str] | None = None,
    negative: Sequence[str] | None = None,
    caa_position: int = -1,
    melbo_radius: float | None = None,
    melbo_steps: int = 200,
    kl: float = 0.25,
    metric: Metric = "logit_diff",
    answers: Sequence[str | int] | None = None,
    continuation: str | None = None,
    source_site: str = "hook_mlp_out",
    target_site: str = "hook_mlp_out",
    target_positions: int = 4,
    holdout: float | None = None,
    controls: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """One row per vector (k Power Steering, k MELBO, one CAA if ``positive``/``negative``
    pairs are given, ``controls`` random directions) as a pandas DataFrame.

    Columns: ``method, vector, method_passes, method_seconds`` (what the whole method
    spent: JVPs + VJPs, forward + backward passes, or prompts run), the
    ``rank_vectors`` columns at KL budget ``kl`` (``sign,
    absolute_scale, kl, effect, abs_effect, held_out``), and ``cos_<method>``: the largest
    |cosine| with that other method's vectors (NaN for the vector's own method).
    ``melbo_radius`` defaults to the source activation's ``typical_norm``.
    """
    import pandas as pd

    adapter = ModelAdapter.of(model)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if metric == "kl":
        raise ValueError("compare_methods measures effects at a fixed KL: choose another metric")
    check_metric(adapter, metric, answers, continuation, 20)
    check_scale(kl, "kl")
    if (positive is None) != (negative is None):
        raise ValueError("CAA needs both positive and negative prompts (or neither)")
    if positive is not None and negative is not None and len(positive) != len(negative):
        raise ValueError(
            f"got {len(positive)} positive and {len(negative)} negative prompts; CAA pairs them"
        )
    if melbo_radius is not None:
        check_scale(melbo_radius, "melbo_radius")
    site = dict(source_site=source_site, target_site=target_site, target_positions=target_positions)

    found: dict[str, tuple[list[SteeringVector], int, float]] = {}
    began = time.perf_counter()
    ps = power_steer(adapter, prompts, source, target, k=k, seed=seed, **site)  # type: ignore[arg-type]
    found["power_steering"] = (
        ps.steering_vectors(),
        ps.n_jvp + ps.n_vjp,
        time.perf_counter() - began,
    )
    radius = (
        typical_norm(adapter, prompts, source, source_site)
        if melbo_radius is None
        else melbo_radius
    )
    mel = melbo(
        adapter, prompts, source, target, n_vectors=k, radius=radius, steps=melbo_steps,
        seed=seed, progress=progress, **site,  # type: ignore[arg-type]
    )  # fmt: skip
    found["melbo"] = (
        [mel.steering_vector(i) for i in range(k)],
        mel.n_forward + mel.n_backward,
        mel.seconds,
    )
    if positive is not None and negative is not None:
        began = time.perf_counter()
        caa = caa_vector(
            adapter, positive, negative, source, site=source_site, position=caa_position
        )
        found["caa"] = ([caa], 2 * len(positive), time.perf_counter() - began)

    vectors = [v for vs, _, _ in found.values() for v in vs]
    ranked = rank_vectors(
        adapter, prompts, vectors, kl=kl, metric=metric, answers=answers,
        continuation=continuation, holdout=holdout, controls=controls, seed=seed,
        progress=progress,
    )  # fmt: skip
    by_name = {v.name: v for v in vectors}
    rows = []
    for record in ranked.to_dict("records"):
        name, method = record["vector"], record["method"]
        row: dict[str, Any] = {"method": method, "vector": name}
        row["method_passes"] = found[method][1] if method in found else 0
        row["method_seconds"] = found[method][2] if method in found else 0.0
        row.update({key: record[key] for key in ranked.columns if key not in row})
        for other in _METHODS:
            if other == method or other not in found or name not in by_name:
                row[f"cos_{other}"] = float("nan")
                continue
            u = by_name[name].direction.double()
            row[f"cos_{other}"] = max(
                abs(float(u @ w.direction.double().to(u.device))) for w in found[other][0]
            )
        rows.append(row)
    table = pd.DataFrame(rows)
    for other in _METHODS:
        if other not in found:
            table = table.drop(columns=f"cos_{other}")
    return table


def cosine_table(vectors: Sequence[SteeringVector]) -> Any:
    """|cosine| between every pair of vectors, as a labelled square DataFrame."""
    import pandas as pd

    U = torch.stack([v.direction.double() for v in vectors])
    names = [v.name for v in vectors]
    return pd.DataFrame((U @ U.T).abs().numpy(), index=names, columns=names)
