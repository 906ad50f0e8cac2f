"""Scales of steering vectors: typical activation norms and the KL scale search.

A scale given to ``steer`` means one of three things (``scale_mode``):

* ``"absolute"``: a = scale;
* ``"relative"``: a = scale × the *robust typical norm* of the activation at the hook on the
  reference prompts (``typical_norm``);
* ``"kl"``: a = the scale at which the next-token KL(steered ‖ base) at the last position,
  averaged over the reference prompts, reaches ``scale`` nats (``kl_scales``).

A negative scale steers along −direction. Every KL search in the package, ``kl_scales``
and the atlas page's effects alike, runs ``kl_search``; they differ only in tolerance.

>>> import torch
>>> from tl_powersteer.scales import kl_search
>>> def kl_at(rows, scales):  # two rows whose KL grows like 0.01 a² and 0.5 a
...     curve = torch.tensor([0.01, 0.5], dtype=torch.float64)[rows]
...     power = torch.tensor([2.0, 1.0], dtype=torch.float64)[rows]
...     return curve * scales**power, [None] * len(rows)
>>> one = torch.ones(2, dtype=torch.float64)
>>> scales, kls, _ = kl_search(kl_at, one, 1.0, (one / 100, one * 100), tol=1e-6, rounds=20)
>>> [round(s, 4) for s in scales.tolist()]
[10.0, 2.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .adapters import (
    Model,
    ModelAdapter,
    Prompts,
    SteeredRun,
    TokenBatch,
    activations,
    steered_logits,
)
from .checks import is_number, plain_ints
from .positions import Positions, position_weights
from .vectors import SteeringVector, check_vector

__all__ = [
    "KL_SCALE_RANGE",
    "SCALE_MODES",
    "check_mode",
    "check_scale",
    "check_signs",
    "kl_divergence",
    "kl_scale",
    "kl_scales",
    "kl_search",
    "matched_kl_search",
    "KL_PROBE_FRACTION",
    "resolve_scales",
    "robust_norm",
    "check_scales",
    "scale_plan",
    "typical_norm",
    "typical_norms",
]

SCALE_MODES = ("absolute", "relative", "kl")


def robust_norm(acts: Float[Tensor, "tokens d_model"], *, cutoff: float = 5.0) -> float:
    """Median over tokens of the L2 norm, leaving out *massive* dimensions.

    Some models keep a few residual dimensions hundreds of times larger than the rest
    (Gemma 3 270M at layer 8: the median residual norm is ~6,100 but ~990 without its two
    largest dimensions). A plain norm then measures those dimensions only, and a scale
    relative to it over-perturbs everything else. Massive dimensions are found as
    outliers of the per-dimension RMS on a log scale: more than ``cutoff`` robust standard
    deviations (1.4826 × the median absolute deviation) above the median.
    """
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise ValueError(f"acts must be [tokens, d_model] with tokens, got {tuple(acts.shape)}")
    a = acts.double()
    log_rms = a.pow(2).mean(0).sqrt().clamp_min(1e-30).log()
    centre = log_rms.median()
    spread = 1.4826 * (log_rms - centre).abs().median()
    massive = log_rms > centre + cutoff * spread.clamp_min(1e-12)
    return float(a[:, ~massive].norm(dim=-1).median())


@plain_ints
def typical_norm(
    model: Model | ModelAdapter, prompts: Prompts | TokenBatch, layer: int, site: str
) -> float:
    """``robust_norm`` of the activation at ``blocks.{layer}.{site}`` over the prompts'
    real tokens, without each prompt's first token (often an attention sink with a norm
    many times the others')."""
    adapter = ModelAdapter.of(model)
    batch = adapter.tokenize(prompts)
    return float(typical_norms(adapter, batch, [adapter.hook_name(layer, site)])[0])


def typical_norms(adapter: ModelAdapter, batch: TokenBatch, hooks: Sequence[str]) -> Tensor:
    """``typical_norm`` of each hook's activation, from one forward pass."""
    acts = activations(adapter, batch, list(hooks))
    mask = batch.mask.clone()
    mask[:, 0] &= batch.lengths == 1
    return torch.tensor([robust_norm(act[mask]) for act in acts], dtype=torch.float64)


def check_scale(scale: Any, what: str = "scale") -> float:
    if not is_number(scale):
        raise TypeError(f"{what} must be a number, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{what} must be finite, got {scale!r}")
    return float(scale)


def check_mode(scale_mode: Any, reference: Any) -> None:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if scale_mode != "absolute" and reference is None:
        raise ValueError(
            f"scale_mode={scale_mode!r} measures the model on reference prompts: pass "
            "reference=<the prompt(s) you will steer>"
        )


def kl_divergence(
    steered: Float[Tensor, "*batch vocab"], base: Float[Tensor, "*batch vocab"]
) -> Float[Tensor, "*batch"]:
    """KL(steered ‖ base) in nats between the next-token distributions of two logit sets.

    Computed in the logits' precision (float64 if either is, else float32), to within
    about 3e-7 nats in float32, the size of the logits' own rounding: log p − log q is
    taken as (z − b) − c, with the difference of the logits formed first (it is small
    where the mass is) and the per-row constant c = lse(z) − lse(b) formed in float64.
    Over a vocabulary of 262k tokens float32 passes take a third of the time of the
    float64 softmaxes, and the KL is what every scale search evaluates.
    """
    dtype = torch.float64 if torch.float64 in (steered.dtype, base.dtype) else torch.float32
    z, b = steered.to(dtype), base.to(dtype)
    z_max, b_max = z.amax(dim=-1, keepdim=True), b.amax(dim=-1, keepdim=True)
    weights = (z - z_max).exp_()  # p times the row's sum of exponentials
    z_sum = weights.sum(dim=-1, keepdim=True).double()
    b_sum = (b - b_max).exp().sum(dim=-1, keepdim=True).double()
    shift = (z_max.double() - b_max.double()) + z_sum.log() - b_sum.log()
    low = shift.to(dtype)
    # In place: over a large vocabulary each temporary costs as much as a softmax.
    moved = (z - b).sub_(low).mul_(weights).sum(dim=-1, keepdim=True).double()
    return (moved / z_sum + (low.double() - shift)).squeeze(-1)


# The scales a KL search tries, in typical norms of the hook's activation.
KL_SCALE_RANGE = (1 / 256, 64.0)
# The search's first scale, as a fraction of the source's typical norm: where KL still
# grows like the square of the scale (docs/concepts/scales.md).
KL_PROBE_FRACTION = 1 / 32


def kl_search(
    kl_at: Callable[[Tensor, Tensor], tuple[Tensor, list[Any]]],
    probe: Tensor,
    kl: float | Tensor,
    bounds: tuple[Tensor, Tensor],
    *,
    tol: float,
    rounds: int,
    settled: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor, list[Any]]:
    """Per row, the evaluated scale whose KL came closest to ``kl`` (in log KL; one target
    for all rows or one per row), that KL, and what ``kl_at`` returned with it.

    ``kl_at(rows, scales)`` returns the KL of those rows at those scales and one payload
    per row (what the caller wants kept from the evaluation the search settles on);
    ``probe`` is each row's first scale and ``bounds`` (low, high) the scales it may try,
    all positive. The first step assumes KL grows like the square of the scale, which
    holds near zero; later steps follow the slope measured between the last two points
    (kept within [1, 4]) until the target is bracketed, then inside the bracket the
    secant step of the last two points, or false position where that step would leave
    it, kept off its ends so that it always shrinks. From the third point on, the zero
    of the parabola x(y) through the last three points replaces either step where it
    falls inside the bracket, or ahead of the last point and within four slope steps of
    it before there is one. A row stops within ``tol`` of
    log ``kl``, at a bound it cannot get past, or after ``rounds`` steps; ``settled`` is
    told after every step how many rows have stopped. Evaluations per row at each
    tolerance: ``docs/concepts/scales.md``.
    """
    x_min, x_max = bounds[0].log(), bounds[1].log()
    x = probe.log().clone()
    n = x.shape[0]
    goal = torch.as_tensor(kl, dtype=torch.float64).log().to(x.dtype).expand(n)
    y = torch.full((n,), math.nan, dtype=x.dtype)
    best_x, best_y = x.clone(), torch.full((n,), math.inf, dtype=x.dtype)
    best_kl, payloads = torch.zeros(n, dtype=x.dtype), [None] * n
    below = torch.full((n,), -math.inf, dtype=x.dtype)  # largest x with y < 0, and its y
    below_y = torch.full((n,), -math.inf, dtype=x.dtype)
    above = torch.full((n,), math.inf, dtype=x.dtype)  # smallest x with y > 0, and its y
    above_y = torch.full((n,), math.inf, dtype=x.dtype)
    last_x, last_y = torch.full((n,), math.nan, dtype=x.dtype), y.clone()
    older_x, older_y = last_x.clone(), y.clone()  # the point before the last
    active = torch.arange(n)
    for step in range(rounds + 1):
        values, extra = kl_at(active, x[active].exp())
        values = values.to(x.dtype)
        y[active] = values.clamp_min(1e-30).log() - goal[active]
        xa, ya = x[active], y[active]
        closer = ya.abs() < best_y[active].abs()
        best_kl[active] = torch.where(closer, values, best_kl[active])
        for row, better, payload in zip(active.tolist(), closer.tolist(), extra, strict=True):
            if better:
                payloads[row] = payload
        best_x[active] = torch.where(closer, xa, best_x[active])
        best_y[active] = torch.where(closer, ya, best_y[active])
        low = (ya < 0) & (xa > below[active])
        below[active] = torch.where(low, xa, below[active])
        below_y[active] = torch.where(low, ya, below_y[active])
        high = (ya > 0) & (xa < above[active])
        above[active] = torch.where(high, xa, above[active])
        above_y[active] = torch.where(high, ya, above_y[active])
        stuck = ((ya < 0) & (xa >= x_max[active])) | ((ya > 0) & (xa <= x_min[active]))
        keep = (ya.abs() > tol) & ~stuck
        if settled is not None:
            settled(n - int(keep.sum()))
        if step == rounds or not keep.any():
            break
        # Outside a bracket: extrapolate along the measured slope (2 at first).
        run = xa - last_x[active]
        measured = torch.where(
            run.abs() > 1e-12, (ya - last_y[active]) / torch.where(run == 0, 1.0, run), 2.0
        )
        measured = torch.where(measured.isfinite(), measured, 2.0)
        guess = xa - ya / measured.clamp(1.0, 4.0)
        # From the third point on: inverse quadratic interpolation, x as a parabola in y
        # through the last three points. Near a jump or saturation log KL bends within a
        # few steps, and the secant of two points then undershoots the same side again
        # and again; the parabola follows the bend.
        parabola = _inverse_quadratic(
            (older_x[active], last_x[active], xa), (older_y[active], last_y[active], ya)
        )
        ahead = torch.where(ya < 0, parabola > xa, parabola < xa)
        reach = (parabola - xa).abs() <= 4 * (guess - xa).abs()
        guess = torch.where(parabola.isfinite() & ahead & reach, parabola, guess)
        # Inside one: the secant step of the last two points, unclamped (KL can be steeper
        # than scale^4 near a jump, and flatter than linear near saturation, where a clamped
        # slope only creeps towards the root), where it falls inside the bracket and off its
        # ends; else false position, a tenth of the width from either end.
        lo_x, hi_x = below[active], above[active]
        bracketed = lo_x.isfinite() & hi_x.isfinite()
        width = torch.where(bracketed, hi_x - lo_x, 0.0)
        lo_y, hi_y = below_y[active], above_y[active]
        falsi = torch.where(
            bracketed, lo_x - lo_y * width / torch.where(bracketed, hi_y - lo_y, 1.0), 0.0
        )
        falsi = torch.minimum(torch.maximum(falsi, lo_x + 0.1 * width), hi_x - 0.1 * width)
        secant = xa - ya / torch.where(measured > 0, measured, 1.0)
        margin = torch.minimum(0.1 * width, tol / (2 * measured.abs().clamp_min(1e-3)))
        inside = (measured > 0) & (secant > lo_x + margin) & (secant < hi_x - margin)
        inner = torch.where(inside, secant, falsi)
        fits = parabola.isfinite() & (parabola > lo_x + margin) & (parabola < hi_x - margin)
        inner = torch.where(fits, parabola, inner)
        guess = torch.where(bracketed, inner, guess)
        older_x[active], older_y[active] = last_x[active], last_y[active]
        last_x[active], last_y[active] = xa, ya
        x[active] = torch.minimum(torch.maximum(guess, x_min[active]), x_max[active])
        active = active[keep]
    return best_x.exp(), best_kl, payloads


def matched_kl_search(
    run: SteeredRun,
    base: Tensor,
    directions: Float[Tensor, "rows d_model"],
    goals: Float[Tensor, " rows"],
    unit: float,
    columns: Sequence[int],
    *,
    tol: float,
    probe: Float[Tensor, " rows"] | None = None,
    rounds: int = 30,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per row, the scale along ``directions[row]`` at which ``run``'s KL against ``base``
    (mean over its prompts and read positions) is ``goals[row]``, by ``kl_search`` from
    ``probe`` (default ``unit`` × ``KL_PROBE_FRACTION``) between ``KL_SCALE_RANGE``
    times ``unit``: (scales, KLs reached, and the steered logits of ``columns`` at the
    first prompt's first read position there, ``[rows, columns]``, or None without
    columns)."""

    def kl_at(which: Tensor, scales: Tensor) -> tuple[Tensor, list[Any]]:
        kls, cols = run.kl(scales[:, None] * directions[which], base, columns)
        kls = kls.reshape(len(which), -1).mean(dim=1)
        if not columns:
            return kls, [None] * len(which)
        return kls, list(cols.reshape(len(which), -1, len(columns))[:, 0].double())

    full = torch.full((directions.shape[0],), float(unit), dtype=torch.float64)
    low, high = KL_SCALE_RANGE
    start = full * KL_PROBE_FRACTION if probe is None else probe
    scales, kls, payloads = kl_search(
        kl_at, start, goals, (full * low, full * high), tol=tol, rounds=rounds
    )
    return scales, kls, torch.stack(payloads) if columns else None


def _inverse_quadratic(
    xs: tuple[Tensor, Tensor, Tensor], ys: tuple[Tensor, Tensor, Tensor]
) -> Tensor:
    """Where the parabola x(y) through three points crosses y = 0 (NaN where two ys
    coincide or a point is missing)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d01, d02, d12 = y0 - y1, y0 - y2, y1 - y2
    distinct = (d01.abs() > 1e-12) & (d02.abs() > 1e-12) & (d12.abs() > 1e-12)
    d01, d02, d12 = (torch.where(distinct, d, 1.0) for d in (d01, d02, d12))
    value = x0 * y1 * y2 / (d01 * d02) - x1 * y0 * y2 / (d01 * d12) + x2 * y0 * y1 / (d02 * d12)
    return torch.where(distinct, value, math.nan)


@plain_ints
def kl_scales(
    model: Model | ModelAdapter,
    prompts: Prompts | TokenBatch,
    items: Sequence[tuple[SteeringVector, float]],
    *,
    positions: Positions = "all",
    tol: float = 1e-4,
    max_rounds: int = 30,
    progress: bool = False,
) -> list[float]:
    """For each (vector, signed KL target), the signed absolute scale at which steering
    gives a mean next-token KL(steered ‖ base) of |target| nats at the prompts' last tokens
    (the sign of the target is the sign of the direction).

    All items are searched together by ``kl_search``, their candidate scales batched into
    shared forward passes, from 1/32 of the hook's ``typical_norm``, between 1/256 and 64
    times it, until |log KL − log target| < ``tol``. ``progress`` shows a tqdm bar of
    vectors settled.
    """
    adapter = ModelAdapter.of(model)
    batch = adapter.tokenize(prompts)
    weights = position_weights(batch, positions)
    hooks, targets = [], []
    for vector, target in items:
        hooks.append(check_vector(adapter, vector))
        target = check_scale(target, "kl")
        if target == 0:
            raise ValueError("a KL target must be non-zero (nats; its sign gives the direction)")
        targets.append(target)
    if not items:
        return []
    distinct = sorted(set(hooks))
    norms = dict(zip(distinct, typical_norms(adapter, batch, distinct).tolist(), strict=True))
    units = torch.tensor([norms[hook] for hook in hooks], dtype=torch.float64)
    goals = torch.tensor([abs(t) for t in targets], dtype=torch.float64)
    directions = torch.stack(
        [
            math.copysign(1.0, t) * v.direction.double()
            for (v, _), t in zip(items, targets, strict=True)
        ]
    )
    zero = torch.zeros(1, adapter.d_model)
    base = {hook: steered_logits(adapter, batch, hook, zero)[0] for hook in distinct}

    def kl_at(rows: Tensor, scales: Tensor) -> tuple[Tensor, list[Any]]:
        """Mean KL at these (row, absolute scale) points, batched per hook."""
        out = torch.zeros(len(rows), dtype=torch.float64)
        chosen = [hooks[i] for i in rows.tolist()]
        for hook in sorted(set(chosen)):
            members = torch.tensor([j for j, h in enumerate(chosen) if h == hook])
            deltas = scales[members, None] * directions[rows[members]]
            logits = steered_logits(adapter, batch, hook, deltas, weights=weights)
            out[members] = kl_divergence(logits, base[hook][None]).mean(dim=1).cpu()
        return out, [None] * len(rows)

    for i, unit in enumerate(units.tolist()):
        if unit == 0:
            raise ValueError(
                f"steering with {items[i][0].name} cannot reach KL {goals[i]:.3g} nats: the "
                "activation at its hook is zero on these prompts, so there is no scale to "
                "search; choose another hook"
            )
    from tqdm.auto import tqdm

    low, high = KL_SCALE_RANGE
    with tqdm(total=len(items), desc="KL scale search", unit="vector", disable=not progress) as bar:
        scales, kls, _ = kl_search(
            kl_at, units * KL_PROBE_FRACTION, goals, (units * low, units * high), tol=tol,
            rounds=max_rounds, settled=lambda done: bar.update(done - bar.n),
        )  # fmt: skip
    for i, (vector, _) in enumerate(items):
        missed = float((kls[i] / goals[i]).clamp_min(1e-300).log())
        if abs(missed) <= tol:
            continue
        if missed < 0 and float(scales[i]) >= float(units[i]) * high * (1 - 1e-9):
            raise ValueError(
                f"steering with {vector.name} never reaches KL {float(goals[i])} nats up to "
                f"64x the activation's typical norm ({float(units[i]):.3g}); the largest KL "
                f"was {float(kls[i]):.3g}: choose a smaller KL target"
            )
        if missed > 0 and float(scales[i]) <= float(units[i]) * low * (1 + 1e-9):
            raise ValueError(
                f"steering with {vector.name} already exceeds KL {float(goals[i])} nats at "
                "1/256 of the activation's typical norm: choose a larger KL target"
            )
    return [math.copysign(float(a), t) for a, t in zip(scales, targets, strict=True)]


@plain_ints
def kl_scale(
    model: Model | ModelAdapter,
    prompts: Prompts | TokenBatch,
    vector: SteeringVector,
    kl: float,
    *,
    sign: int = 1,
    positions: Positions = "all",
) -> float:
    """The absolute scale a ≥ 0 at which steering with ``sign · a · direction`` gives a
    mean next-token KL(steered ‖ base) of ``kl`` nats at the prompts' last tokens (see
    ``kl_scales``, which searches many vectors at once)."""
    kl = check_scale(kl, "kl")
    if kl <= 0:
        raise ValueError(f"the KL target must be positive (nats), got {kl}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    return abs(kl_scales(model, prompts, [(vector, sign * kl)], positions=positions)[0])


def resolve_scales(
    model: Model | ModelAdapter,
    items: Sequence[tuple[SteeringVector, float]],
    *,
    scale_mode: str = "absolute",
    reference: Prompts | None = None,
    positions: Positions = "all",
    progress: bool = False,
) -> list[float]:
    """The signed absolute scale each (vector, scale) means in ``scale_mode`` (see the
    module docstring); KL targets are searched together."""
    check_mode(scale_mode, reference)
    scales = [check_scale(scale) for _, scale in items]
    if scale_mode == "absolute":
        return scales
    assert reference is not None
    adapter = ModelAdapter.of(model)
    batch = adapter.tokenize(reference)
    out = [0.0] * len(items)
    if scale_mode == "relative":
        units: dict[tuple[int, str], float] = {}
        for j, (v, scale) in enumerate(items):
            if scale != 0:
                key = (v.layer, v.site)
                if key not in units:
                    units[key] = typical_norm(adapter, batch, v.layer, v.site)
                out[j] = scale * units[key]
        return out
    searched = [j for j, scale in enumerate(scales) if scale != 0]
    values = kl_scales(
        adapter,
        batch,
        [(items[j][0], scales[j]) for j in searched],
        positions=positions,
        progress=progress,
    )
    for j, value in zip(searched, values, strict=True):
        out[j] = value
    return out


def check_scales(scales: float | Sequence[float]) -> list[float]:
    values = [scales] if not isinstance(scales, Sequence) else list(scales)
    if not values:
        raise ValueError("scales is empty: give at least one scale")
    for value in values:
        if check_scale(value) < 0:
            raise ValueError(f"scales must be non-negative (signs gives the sign), got {value}")
    return [float(value) for value in values]


def check_signs(signs: Sequence[int]) -> list[int]:
    values = list(signs)
    if not values or any(s not in (1, -1) for s in values):
        raise ValueError(f"signs must be a non-empty list of +1 and -1, got {signs!r}")
    return values


def scale_plan(
    model: Model | ModelAdapter,
    vectors: list[SteeringVector],
    signs: list[int],
    scales: list[float],
    **resolve: Any,
) -> list[tuple[SteeringVector, int, float, float]]:
    """(vector, sign, scale, signed absolute scale) for every vector × sign × scale."""
    combos = [(v, sign, s) for v in vectors for sign in signs for s in scales]
    amounts = resolve_scales(model, [(v, sign * s) for v, sign, s in combos], **resolve)
    return [(v, sign, s, a) for (v, sign, s), a in zip(combos, amounts, strict=True)]
