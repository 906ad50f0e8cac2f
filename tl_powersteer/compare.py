"""Power Steering, MELBO and CAA on the same pair and prompts, compared like for like.

``find_vectors`` runs the methods side by side; ``compare_methods`` then measures them,
and ``steerability`` measures them (and Power Steering's refinement) on held-out prompts
against random directions at several KL budgets (``transfer``).

Each method's vectors live at the same source hook. They are compared by what they cost
(passes through the model and seconds), by their effect at the same KL budget
(``rank_vectors``, best of both signs, random directions as control),
and by how they align: the largest |cosine| between a vector and the other methods'
vectors (do Power Steering's directions match CAA's contrast direction? MELBO's?).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .adapters import Model, ModelAdapter, Prompts, decode_token
from .baselines.caa import caa_vector, check_caa_options
from .baselines.melbo import MelboResult, check_melbo_options, melbo
from .checks import check_seed, is_int, is_number, plain_ints, renamed_options
from .effects import Metric, check_rank_options, rank_vectors
from .jacobian import check_pair
from .linalg import check_iteration_args
from .power_steering import PowerSteeringResult, power_steer
from .refine import STARTS, refine_in_subspace
from .scales import check_scale, typical_norm
from .transfer import KL_BUDGETS, KL_OVER, TransferResult, transfer
from .vectors import SteeringVector

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "STEER_METHODS",
    "MethodRun",
    "check_method_options",
    "compare_methods",
    "cosine_table",
    "find_vectors",
    "steerability",
]

STEER_METHODS = ("power_steering", "melbo", "caa")
REFINED = "refined_power_steering"
# Former option names that still work for one release.
RENAMED = {"positions": "target_positions"}


@dataclass
class MethodRun:
    """What one method found for a layer pair, what it spent, and a line that says so.

    ``passes`` counts what the method ran: JVPs + VJPs for Power Steering, forward +
    backward passes for MELBO, prompts for CAA. ``result`` is the method's own result
    (``PowerSteeringResult``, ``MelboResult``; None for CAA).
    """

    method: str
    vectors: list[SteeringVector]
    passes: int
    seconds: float
    summary: str
    result: PowerSteeringResult | MelboResult | None = None


def check_method_options(
    methods: Sequence[str] | None,
    positive: Sequence[str] | None,
    negative: Sequence[str] | None,
    *,
    melbo_radius: float | None = None,
    melbo_steps: int = 200,
    spell: Callable[[str], str] = str,
) -> list[str]:
    """The methods ``find_vectors`` will run (default Power Steering and MELBO, and CAA
    when contrast pairs are given), after checking its options without a model.

    ``spell`` turns an option's name into the caller's spelling of it in error messages
    (the command line's ``--melbo-radius`` for ``melbo_radius``).
    """
    pairs = positive is not None or negative is not None
    if pairs and (positive is None or negative is None):
        raise ValueError(
            f"CAA needs both {spell('positive')} and {spell('negative')} prompts (or neither)"
        )
    if positive is not None and negative is not None and len(positive) != len(negative):
        raise ValueError(
            f"got {len(positive)} {spell('positive')} and {len(negative)} {spell('negative')} "
            "prompts; CAA pairs them, give the same number"
        )
    chosen = list(methods) if methods is not None else list(STEER_METHODS[: 2 + pairs])
    unknown = [m for m in chosen if m not in STEER_METHODS]
    if unknown or not chosen:
        raise ValueError(
            f"unknown method(s) {unknown or chosen!r}; choose from {', '.join(STEER_METHODS)}"
        )
    if "caa" in chosen and not pairs:
        raise ValueError(f"caa needs {spell('positive')} and {spell('negative')} prompt pairs")
    if melbo_radius is not None:
        check_scale(melbo_radius, spell("melbo_radius"))
        if not melbo_radius > 0:
            raise ValueError(f"{spell('melbo_radius')} must be positive, got {melbo_radius}")
    if not is_int(melbo_steps) or melbo_steps < 1:
        raise ValueError(f"{spell('melbo_steps')} must be at least 1, got {melbo_steps}")
    return chosen


@plain_ints
def find_vectors(
    model: Model | ModelAdapter,
    prompts: Prompts,
    source: int,
    target: int,
    *,
    methods: Sequence[str] | None = None,
    k: int = 4,
    positive: Sequence[str] | None = None,
    negative: Sequence[str] | None = None,
    caa_position: int = -1,
    melbo_radius: float | None = None,
    melbo_steps: int = 200,
    source_site: str = "hook_mlp_out",
    target_site: str = "hook_mlp_out",
    target_positions: int = 4,
    jvp_method: str = "reverse",
    tol: float = 1e-4,
    max_iters: int = 50,
    block_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[MethodRun]:
    """Steering vectors for the pair ``source -> target`` from each of ``methods`` (see
    ``check_method_options``), all at the same source hook: ``k`` Power Steering vectors
    (``tol``, ``max_iters``, ``block_size`` as ``power_steer`` takes them),
    ``k`` MELBO vectors of norm ``melbo_radius`` (default the source activation's
    ``typical_norm``), and one CAA vector from the ``positive``/``negative`` pairs."""
    chosen = check_method_options(
        methods, positive, negative, melbo_radius=melbo_radius, melbo_steps=melbo_steps
    )
    adapter = ModelAdapter.of(model)
    site = dict(source_site=source_site, target_site=target_site, target_positions=target_positions)
    # Every method's options are checked before the first of them runs.
    adapter.resolve_pair(source, target)
    check_seed(seed)
    check_pair(adapter, prompts, source, target, jvp_method=jvp_method, **site)  # type: ignore[arg-type]
    if "power_steering" in chosen:
        check_iteration_args(
            k, adapter.d_model, block_size=block_size, tol=tol, max_iters=max_iters
        )
    if "melbo" in chosen:
        check_melbo_options(adapter, n_vectors=k, radius=melbo_radius, steps=melbo_steps)
    if "caa" in chosen:
        assert positive is not None and negative is not None
        check_caa_options(adapter, positive, negative, [source], source_site, caa_position)
    runs = []
    if "power_steering" in chosen:
        began = time.perf_counter()
        ps = power_steer(
            adapter, prompts, source, target, k=k, jvp_method=jvp_method, tol=tol,
            max_iters=max_iters, block_size=block_size, seed=seed, **site,  # type: ignore[arg-type]
        )  # fmt: skip
        seconds = time.perf_counter() - began
        sigma = ", ".join(f"{x:.3g}" for x in ps.singular_values.tolist())
        runs.append(
            MethodRun(
                "power_steering",
                ps.steering_vectors(),
                ps.n_jvp + ps.n_vjp,
                seconds,
                f"power_steering: {ps.k} vectors, {ps.n_jvp + ps.n_vjp} JVP/VJP products, "
                f"{seconds:.1f} s, sigma {sigma}",
                ps,
            )
        )
    if "melbo" in chosen:
        radius = (
            typical_norm(adapter, prompts, source, source_site)
            if melbo_radius is None
            else melbo_radius
        )
        mel = melbo(
            adapter, prompts, source, target, n_vectors=k, radius=radius, steps=melbo_steps,
            seed=seed, progress=progress, **site,  # type: ignore[arg-type]
        )  # fmt: skip
        runs.append(
            MethodRun(
                "melbo",
                [mel.steering_vector(i) for i in range(k)],
                mel.n_forward + mel.n_backward,
                mel.seconds,
                f"melbo: {k} vectors at radius {radius:.4g}, {mel.n_forward} forward + "
                f"{mel.n_backward} backward passes, {mel.seconds:.1f} s",
                mel,
            )
        )
    if "caa" in chosen:
        assert positive is not None and negative is not None
        began = time.perf_counter()
        caa = caa_vector(
            adapter, positive, negative, source, site=source_site, position=caa_position
        )
        runs.append(
            MethodRun(
                "caa",
                [caa],
                2 * len(positive),
                time.perf_counter() - began,
                f"caa: 1 vector from {len(positive)} prompt pairs",
            )
        )
    return runs


@plain_ints
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
    **renamed: Any,
) -> pd.DataFrame:
    """One row per vector (k Power Steering, k MELBO, one CAA if ``positive``/``negative``
    pairs are given, ``controls`` random directions) as a pandas DataFrame.

    Columns: ``method, vector, method_passes, method_seconds`` (what the whole method
    spent: JVPs + VJPs, forward + backward passes, or prompts run), the
    ``rank_vectors`` columns at KL budget ``kl`` (``sign,
    absolute_scale, kl, effect, abs_effect, held_out``), and ``cos_<method>``: the largest
    |cosine| with that other method's vectors (NaN for the vector's own method).
    ``melbo_radius`` defaults to the source activation's ``typical_norm``. ``positions``
    is the former name of ``target_positions``.
    """
    import pandas as pd

    target_positions = renamed_options("compare_methods", renamed, RENAMED).get(
        "target_positions", target_positions
    )
    adapter = ModelAdapter.of(model)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if metric == "kl":
        raise ValueError("compare_methods measures effects at a fixed KL: choose another metric")
    # Ranking's options are checked before the methods run, not after.
    check_rank_options(
        adapter, prompts, kl=kl, metric=metric, answers=answers, continuation=continuation,
        max_new_tokens=20, signs=(1, -1), positions="all", holdout=holdout,
        controls=controls, seed=seed,
    )  # fmt: skip
    runs = find_vectors(
        adapter, prompts, source, target, k=k, positive=positive, negative=negative,
        caa_position=caa_position, melbo_radius=melbo_radius, melbo_steps=melbo_steps,
        source_site=source_site, target_site=target_site, target_positions=target_positions,
        seed=seed, progress=progress,
    )  # fmt: skip
    found = {run.method: run for run in runs}
    vectors = [v for run in runs for v in run.vectors]
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
        row["method_passes"] = found[method].passes if method in found else 0
        row["method_seconds"] = found[method].seconds if method in found else 0.0
        row.update({key: record[key] for key in ranked.columns if key not in row})
        for other in STEER_METHODS:
            if other == method or other not in found or name not in by_name:
                row[f"cos_{other}"] = float("nan")
                continue
            u = by_name[name].direction.double()
            row[f"cos_{other}"] = max(
                abs(float(u @ w.direction.double().to(u.device))) for w in found[other].vectors
            )
        rows.append(row)
    table = pd.DataFrame(rows)
    for other in STEER_METHODS:
        if other not in found:
            table = table.drop(columns=f"cos_{other}")
    return table


def cosine_table(vectors: Sequence[SteeringVector]) -> pd.DataFrame:
    """|cosine| between every pair of vectors, as a labelled square DataFrame."""
    import pandas as pd

    U = torch.stack([v.direction.double() for v in vectors])
    names = [v.name for v in vectors]
    return pd.DataFrame((U @ U.T).abs().numpy(), index=names, columns=names)


@plain_ints
def steerability(
    model: Model | ModelAdapter,
    fit_prompts: Sequence[str],
    eval_prompts: Sequence[str],
    source: int,
    target: int,
    *,
    answers: Any,
    eval_answers: Any = None,
    methods: Sequence[str] | None = None,
    positive: Sequence[str] | None = None,
    negative: Sequence[str] | None = None,
    k: int = 8,
    tol: float = 1e-4,
    max_iters: int = 50,
    block_size: int | None = None,
    refine_kl: float = 0.25,
    refine_starts: str = "all",
    refine_rounds: int = 6,
    melbo_vectors: int = 4,
    melbo_radius: float | None = None,
    melbo_steps: int = 300,
    kl_budgets: Sequence[float] = KL_BUDGETS,
    controls: int = 16,
    goal: int | None = None,
    kl_over: str = "next_token",
    source_site: str = "hook_mlp_out",
    target_site: str = "hook_mlp_out",
    target_positions: int = 4,
    seed: int = 0,
    checkpoint: str | None = None,
    progress: bool = True,
) -> TransferResult:
    """From fork prompts to a held-out steerability report in one call: each method finds
    its vectors for ``source -> target`` on ``fit_prompts``, and ``transfer`` measures
    them on ``eval_prompts`` against ``controls`` random directions at every KL budget.

    ``methods`` defaults to all four: Power Steering (``k`` vectors; ``tol``,
    ``max_iters`` and ``block_size`` as ``power_steer`` takes them), its refinement
    inside their span (``refine_in_subspace`` at ``refine_kl`` with the fit prompts'
    ``answers``, ``refine_starts`` and ``refine_rounds``, labelled
    ``refined_power_steering``; its passes include Power Steering's), MELBO (``melbo_vectors`` vectors, ``melbo_steps`` steps) and CAA, from
    the ``positive``/``negative`` pairs or, without them, from each fit prompt followed by
    its answer A against the same prompt followed by B (read at that answer token, as in
    Rimsky et al., 2024). Plot the result with ``plot_steerability``;
    ``result.summary()`` is the table.
    """
    chosen = list(methods) if methods is not None else ["power_steering", REFINED, "melbo", "caa"]
    unknown = [m for m in chosen if m not in (*STEER_METHODS, REFINED)]
    if unknown or not chosen:
        raise ValueError(
            f"unknown method(s) {unknown or chosen!r}; choose from "
            f"{', '.join((*STEER_METHODS, REFINED))}"
        )
    if kl_over not in KL_OVER:
        raise ValueError(f"kl_over must be one of {KL_OVER}, got {kl_over!r}")
    if REFINED in chosen:
        if not is_number(refine_kl) or not 0 < refine_kl < math.inf:
            raise ValueError(f"refine_kl must be a positive number of nats, got {refine_kl!r}")
        if refine_starts not in STARTS:
            raise ValueError(f"refine_starts must be one of {STARTS}, got {refine_starts!r}")
        if not is_int(refine_rounds) or refine_rounds < 0:
            raise ValueError(f"refine_rounds must be a non-negative int, got {refine_rounds!r}")
    adapter = ModelAdapter.of(model)
    # The answers are checked before any method runs.
    pairs = adapter.answer_pairs(answers, len(fit_prompts), "answers")
    if "caa" in chosen and positive is None and negative is None:
        words = [[decode_token(adapter.model, i) for i in pair] for pair in pairs]
        positive = [p + a for p, (a, _) in zip(fit_prompts, words, strict=True)]
        negative = [p + b for p, (_, b) in zip(fit_prompts, words, strict=True)]
    found = [m for m in chosen if m not in (REFINED, "melbo")]
    if REFINED in chosen and "power_steering" not in found:
        found.insert(0, "power_steering")
    common = dict(
        source_site=source_site, target_site=target_site, target_positions=target_positions,
        seed=seed, progress=progress,
    )  # fmt: skip
    runs = []
    if found:
        runs += find_vectors(
            adapter, list(fit_prompts), source, target, methods=found, k=k, positive=positive,
            negative=negative, tol=tol, max_iters=max_iters, block_size=block_size,
            **common,  # type: ignore[arg-type]
        )  # fmt: skip
    if "melbo" in chosen:
        runs += find_vectors(
            adapter, list(fit_prompts), source, target, methods=["melbo"], k=melbo_vectors,
            melbo_radius=melbo_radius, melbo_steps=melbo_steps, **common,  # type: ignore[arg-type]
        )  # fmt: skip
    if REFINED in chosen:
        (ps,) = [run for run in runs if run.method == "power_steering"]
        refined = refine_in_subspace(
            adapter, list(fit_prompts), ps.vectors, answers=answers, kl=refine_kl, goal=goal,
            starts=refine_starts, rounds=refine_rounds,
        )  # fmt: skip
        meta = refined.metadata
        runs.append(
            MethodRun(
                REFINED,
                [refined],
                ps.passes + int(meta["passes"]),
                ps.seconds + float(meta["seconds"]),
                f"{REFINED}: 1 vector in the span of {len(ps.vectors)}, "
                f"{meta['passes']} passes beyond Power Steering's",
            )
        )
        if "power_steering" not in chosen:
            runs = [run for run in runs if run.method != "power_steering"]
    return transfer(
        adapter, fit_prompts, eval_prompts, runs, answers=answers, eval_answers=eval_answers,
        kl_budgets=kl_budgets, controls=controls, goal=goal, kl_over=kl_over, seed=seed,
        checkpoint=checkpoint, progress=progress,
    )  # fmt: skip
