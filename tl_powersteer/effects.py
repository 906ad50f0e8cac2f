"""Measuring what a steering vector changes, with random directions as the control.

Metrics, each at the prompt's last token unless said otherwise:

* ``"kl"``: KL(steered ‖ base) of the next-token distribution, in nats;
* ``"logit_diff"``: logit(answer A) − logit(answer B), for a decision fork with two answers;
* ``"logprob"``: log p(continuation | prompt), summed over the continuation's tokens;
* a function ``f(text) -> float`` of the greedy continuation (e.g. a regex accuracy).

Every table also carries the KL, so effects can be compared at *matched KL*, not only at
matched norm: Power Steering vectors are the highest-gain directions by construction, so
at equal norm they move everything more than a random direction does. The question worth
asking is whether they move the target more per unit of disruption; ``rank_vectors``
answers it by calibrating each vector (and each sign) to the same KL budget on some
prompts and measuring on the others.

>>> import torch
>>> from transformer_lens.config import TransformerBridgeConfig
>>> from transformer_lens.model_bridge import TransformerBridge
>>> import tl_powersteer as tps
>>> cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_heads=2, n_layers=2, n_ctx=16,
...                               d_vocab=20, d_mlp=16, act_fn="gelu", seed=0)
>>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64)
>>> vector = tps.SteeringVector(torch.arange(8.0), layer=0, site="hook_resid_post", method="custom")
>>> table = tps.effect(model, torch.tensor([[1, 2, 3, 4]]), vector, [0.5, 2.0])
>>> list(table["sign"]), bool((table["kl"] > 0).all())
([1, 1, -1, -1], True)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .adapters import Model, ModelAdapter, Prompts, TokenBatch, steered_logits
from .checks import check_seed, is_int, plain_ints
from .positions import Positions, check_positions, check_positions_fit, position_mask
from .scales import (
    check_mode,
    check_scale,
    check_scales,
    check_signs,
    kl_divergence,
    kl_scales,
    scale_plan,
)
from .steering import check_new_tokens, generations, steer
from .vectors import SteeringVector, check_vector, random_vectors, vector_list

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "METRICS",
    "CheckedMetric",
    "Metric",
    "RankOptions",
    "check_metric",
    "check_rank_options",
    "effect",
    "effects_and_generations",
    "rank_vectors",
    "split_prompts",
]

METRICS = ("kl", "logit_diff", "logprob")
Metric = str | Callable[[str], float]


@dataclass
class CheckedMetric:
    """A checked metric: its name and what it needs."""

    name: str
    answers: tuple[int, int] | None = None
    continuation: Tensor | None = None
    fn: Callable[[str], float] | None = None
    max_new_tokens: int = 20


def check_metric(
    adapter: ModelAdapter,
    metric: Metric,
    answers: Sequence[str | int] | None,
    continuation: str | None,
    max_new_tokens: int,
) -> CheckedMetric:
    if callable(metric):
        return CheckedMetric("text", fn=metric, max_new_tokens=check_new_tokens(max_new_tokens))
    if metric not in METRICS:
        raise ValueError(
            f"metric must be one of {METRICS} or a function of the generated text, got {metric!r}"
        )
    if metric == "logit_diff":
        if answers is None or isinstance(answers, str) or len(answers) != 2:
            raise ValueError(
                "metric='logit_diff' needs answers=(A, B): two single tokens such as "
                "(' great', ' terrible'); the value is logit(A) - logit(B)"
            )
        a, b = (adapter.single_token(x, "answer") for x in answers)
        if a == b:
            raise ValueError(
                f"answers {tuple(answers)!r} are the same token (id {a}), so "
                "logit(A) - logit(B) is 0 whatever the steering: give two different tokens"
            )
        return CheckedMetric("logit_diff", answers=(a, b))
    if metric == "logprob":
        if not isinstance(continuation, str) or not continuation:
            raise ValueError("metric='logprob' needs continuation='...', the text to score")
        return CheckedMetric(
            "logprob", continuation=adapter.text_tokens(continuation, "continuation")
        )
    return CheckedMetric("kl")


def _single_prompts(adapter: ModelAdapter, prompts: Prompts) -> list[TokenBatch]:
    """One batch per prompt (prompts are measured one at a time, scales batched)."""
    batch = adapter.tokenize(prompts)
    out = []
    for i, length in enumerate(batch.lengths.tolist()):
        text = None if batch.texts is None else [batch.texts[i]]
        out.append(TokenBatch(batch.tokens[i : i + 1, :length], batch.lengths[i : i + 1], text))
    return out


def _measure(
    model: Model | ModelAdapter,
    prompt: TokenBatch,
    items: list[tuple[SteeringVector, float]],
    metric: CheckedMetric,
    positions: Positions,
) -> tuple[list[tuple[float, float]], float]:
    """Per item (vector, signed absolute scale): (KL, metric value); and the unsteered value."""
    adapter = ModelAdapter.of(model)
    length = int(prompt.lengths[0])
    check_positions_fit(positions, length)
    tokens = prompt.tokens
    if metric.continuation is not None:
        tokens = torch.cat([tokens, metric.continuation[None]], dim=1)
    full = TokenBatch(tokens, torch.tensor([tokens.shape[1]], device=tokens.device), None)
    weights = position_mask(positions, 0, tokens.shape[1], length)[None]
    # Only the continuation's log-probability needs logits beyond the last prompt token.
    every = metric.name == "logprob"
    by_hook: dict[str, list[int]] = {}
    for i, (v, _) in enumerate(items):
        by_hook.setdefault(check_vector(adapter, v), []).append(i)
    logits: list[Tensor] = [torch.empty(0)] * len(items)
    base = torch.empty(0)
    for n, (hook, members) in enumerate(by_hook.items()):
        # The unsteered row rides along with the first hook's deltas.
        rows = [items[i][1] * items[i][0].direction.double() for i in members]
        if n == 0:
            rows.insert(0, torch.zeros(adapter.d_model, dtype=torch.float64))
        out = steered_logits(
            adapter, full, hook, torch.stack(rows), weights=weights, last_only=not every
        )[:, 0]
        if n == 0:
            base, out = out[0], out[1:]
        for row, i in zip(out, members, strict=True):
            logits[i] = row

    def last(seq_logits: Tensor) -> Tensor:
        return seq_logits[length - 1] if every else seq_logits

    def value(seq_logits: Tensor, steering: list[tuple[SteeringVector, float]]) -> float:
        if metric.name == "kl":
            return float(kl_divergence(last(seq_logits), last(base)))
        if metric.name == "logit_diff":
            assert metric.answers is not None
            a, b = metric.answers
            return float(last(seq_logits)[a] - last(seq_logits)[b])
        if metric.name == "logprob":
            assert metric.continuation is not None
            logp = torch.log_softmax(seq_logits[length - 1 : -1].double(), dim=-1)
            ids = metric.continuation.to(logp.device)
            return float(logp[torch.arange(len(ids)), ids].sum())
        assert metric.fn is not None
        vs, amounts = [v for v, _ in steering], [a for _, a in steering]
        with steer(adapter, vs, amounts, positions=positions) if steering else nullcontext():
            out = adapter.generate(prompt.tokens, max_new_tokens=metric.max_new_tokens, greedy=True)
        return float(metric.fn(adapter.decode(out[0, length:])))

    results = [
        (float(kl_divergence(last(logits[i]), last(base))), value(logits[i], [item]))
        for i, item in enumerate(items)
    ]
    return results, value(base, [])


def _with_controls(items: list[SteeringVector], controls: int, seed: int) -> list[SteeringVector]:
    if not is_int(controls) or controls < 0:
        raise ValueError(f"controls must be a non-negative int, got {controls!r}")
    out = list(items)
    hooks = sorted({(v.layer, v.site, v.d_model) for v in items})
    for layer, site, d_model in hooks:
        out += random_vectors(d_model, layer, site, controls, seed=seed)
    return out


def _effect_plan(
    adapter: ModelAdapter,
    prompts: Prompts,
    vectors: SteeringVector | Sequence[SteeringVector],
    scales: float | Sequence[float],
    *,
    metric: Metric,
    answers: Sequence[str | int] | None,
    continuation: str | None,
    max_new_tokens: int,
    signs: Sequence[int],
    scale_mode: str,
    positions: Positions,
    controls: int,
    reference: Prompts | None,
    seed: int,
    progress: bool,
) -> tuple[list[tuple[SteeringVector, int, float, float]], CheckedMetric, list[TokenBatch]]:
    """``effect``'s checks, then its scale plan (controls included), metric and prompts."""
    check_seed(seed)
    items = _with_controls(vector_list(vectors), controls, seed)
    for v in items:
        check_vector(adapter, v)
    scale_list, sign_list = check_scales(scales), check_signs(signs)
    check_positions(positions)
    checked = check_metric(adapter, metric, answers, continuation, max_new_tokens)
    singles = _single_prompts(adapter, prompts)
    for p in singles:
        check_positions_fit(positions, int(p.lengths[0]))
    reference = prompts if reference is None else reference
    check_mode(scale_mode, reference)
    plan = scale_plan(
        adapter, items, sign_list, scale_list, scale_mode=scale_mode, reference=reference,
        positions=positions, progress=progress,
    )  # fmt: skip
    return plan, checked, singles


def _effect_table(
    adapter: ModelAdapter,
    singles: list[TokenBatch],
    plan: list[tuple[SteeringVector, int, float, float]],
    checked: CheckedMetric,
    positions: Positions,
    progress: bool,
) -> pd.DataFrame:
    import pandas as pd
    from tqdm.auto import tqdm

    rows = []
    for index, prompt in enumerate(
        tqdm(singles, desc="effects", unit="prompt", disable=not progress)
    ):
        measured, baseline = _measure(
            adapter, prompt, [(v, a) for v, _, _, a in plan], checked, positions
        )
        for (v, sign, s, a), (kl, val) in zip(plan, measured, strict=True):
            rows.append(
                {
                    "prompt": index,
                    "vector": v.name,
                    "method": v.method,
                    "layer": v.layer,
                    "site": v.site,
                    "sign": sign,
                    "scale": s,
                    "absolute_scale": abs(a),
                    "kl": kl,
                    "value": val,
                    "baseline": baseline,
                    "delta": val - baseline,
                }
            )
    return pd.DataFrame(rows)


@plain_ints
def effect(
    model: Model | ModelAdapter,
    prompts: Prompts,
    vectors: SteeringVector | Sequence[SteeringVector],
    scales: float | Sequence[float],
    *,
    metric: Metric = "kl",
    answers: Sequence[str | int] | None = None,
    continuation: str | None = None,
    max_new_tokens: int = 20,
    signs: Sequence[int] = (1, -1),
    scale_mode: str = "absolute",
    positions: Positions = "all",
    controls: int = 0,
    reference: Prompts | None = None,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """The effect of each vector, sign and scale on each prompt, as a pandas DataFrame.

    Columns: ``prompt`` (index), ``vector, method, layer, site, sign, scale,
    absolute_scale, kl`` (next-token KL at the last prompt token), ``value`` (the metric),
    ``baseline`` (the metric unsteered) and ``delta = value - baseline``. ``controls``
    adds that many random unit directions (seeds ``seed``...) at each vector's hook.
    In ``"relative"`` and ``"kl"`` scale modes the scales are calibrated on ``reference``
    (default: these prompts, which is optimistic; pass held-out prompts to avoid it).
    ``progress`` shows tqdm bars for the scale search and the prompts measured.
    """
    adapter = ModelAdapter.of(model)
    plan, checked, singles = _effect_plan(
        adapter, prompts, vectors, scales, metric=metric, answers=answers,
        continuation=continuation, max_new_tokens=max_new_tokens, signs=signs,
        scale_mode=scale_mode, positions=positions, controls=controls, reference=reference,
        seed=seed, progress=progress,
    )  # fmt: skip
    return _effect_table(adapter, singles, plan, checked, positions, progress)


@plain_ints
def effects_and_generations(
    model: Model | ModelAdapter,
    prompts: Prompts,
    vectors: SteeringVector | Sequence[SteeringVector],
    scales: float | Sequence[float],
    *,
    answers: Sequence[str | int] | None = None,
    scale_mode: str = "kl",
    controls: int = 2,
    max_new_tokens: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``effect`` on every prompt and ``generate_steered``'s greedy generations from the
    first, at the same scales: each vector, both signs and every scale, calibrated once
    on all the prompts. The metric is ``logit(A) - logit(B)`` of ``answers``, else the
    next-token KL; ``controls`` random directions per hook are measured beside the vectors
    but not generated with. Returns ``(effects, generations)``, the tables of ``effect``
    and ``generate_steered``."""
    adapter = ModelAdapter.of(model)
    plan, checked, singles = _effect_plan(
        adapter, prompts, vectors, scales, metric="logit_diff" if answers else "kl",
        answers=answers, continuation=None, max_new_tokens=max_new_tokens, signs=(1, -1),
        scale_mode=scale_mode, positions="all", controls=controls, reference=None, seed=seed,
        progress=progress,
    )  # fmt: skip
    effects = _effect_table(adapter, singles, plan, checked, "all", progress)
    found = {id(v) for v in vector_list(vectors)}
    texts = generations(
        adapter, singles[0].tokens, [row for row in plan if id(row[0]) in found],
        max_new_tokens=max_new_tokens, seed=seed, progress=progress,
    )  # fmt: skip
    return effects, texts


def split_prompts(prompts: Sequence[str], holdout: float, seed: int) -> tuple[list, list]:
    """(fit, evaluate) prompt lists: a seeded shuffle, ``holdout`` of them held out."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction between 0 and 1, got {holdout!r}")
    items = list(prompts)
    if len(items) < 2:
        raise ValueError(f"holding out prompts needs at least 2, got {len(items)}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(holdout * len(items))), len(items) - 1)
    fit = [items[i] for i in sorted(order[n_eval:])]
    evaluate = [items[i] for i in sorted(order[:n_eval])]
    return fit, evaluate


@dataclass
class RankOptions:
    """``rank_vectors``' checked options: the KL budget, signs and metric, the fit
    prompts and the evaluation prompts (one batch each)."""

    budget: float
    signs: list[int]
    metric: CheckedMetric
    fit: list[str]
    evaluate: list[TokenBatch]
    held_out: bool
    fitted: list[TokenBatch]


def check_rank_options(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    *,
    kl: float,
    metric: Metric,
    answers: Sequence[str | int] | None,
    continuation: str | None,
    max_new_tokens: int,
    signs: Sequence[int],
    positions: Positions,
    holdout: float | None,
    controls: int,
    seed: int,
) -> RankOptions:
    """Every check of ``rank_vectors``' options but its vectors, with no forward pass."""
    if metric == "kl":
        raise ValueError(
            "rank_vectors compares vectors at the same KL, so metric='kl' cannot rank them: "
            f"use one of {METRICS[1:]} or a function of the generated text"
        )
    if not is_int(controls) or controls < 0:
        raise ValueError(f"controls must be a non-negative int, got {controls!r}")
    check_seed(seed)
    budget = check_scale(kl, "kl")
    if budget <= 0:
        raise ValueError(f"the KL budget must be positive (nats), got {kl}")
    sign_list = check_signs(signs)
    check_positions(positions)
    checked = check_metric(adapter, metric, answers, continuation, max_new_tokens)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    held_out = False
    fit, evaluate = list(prompts), list(prompts)
    if holdout is not None and len(prompts) >= 2:
        fit, evaluate = split_prompts(prompts, holdout, seed)
        held_out = True
    singles = _single_prompts(adapter, evaluate)
    fitted = _single_prompts(adapter, fit)
    for p in fitted + singles:
        check_positions_fit(positions, int(p.lengths[0]))
    return RankOptions(budget, sign_list, checked, fit, singles, held_out, fitted)


@plain_ints
def rank_vectors(
    model: Model | ModelAdapter,
    prompts: Sequence[str],
    vectors: SteeringVector | Sequence[SteeringVector],
    *,
    kl: float = 0.25,
    metric: Metric = "logit_diff",
    answers: Sequence[str | int] | None = None,
    continuation: str | None = None,
    max_new_tokens: int = 20,
    signs: Sequence[int] = (1, -1),
    positions: Positions = "all",
    holdout: float | None = 0.5,
    controls: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Screen vectors by their effect at a fixed KL budget, the better of both signs.

    For each vector and sign, the scale that reaches ``kl`` nats is found on the fit
    prompts, and the effect (mean ``delta`` of the metric) is measured there and on the
    held-out ones (``holdout`` of the prompts; with ``None`` or a single prompt, the same
    prompts, and ``held_out`` is False). Each vector's sign is the one with the larger
    |effect| on the fit prompts: choosing it on the held-out prompts would select on what
    is measured. Random directions (``controls`` per hook) are ranked alongside. Returns a
    DataFrame sorted by ``abs_effect``, one row per vector: ``vector, method, layer,
    site, sign, absolute_scale, kl, effect, abs_effect, fit_effect, held_out``, with
    ``effect`` and ``kl`` on the held-out prompts, ``fit_effect`` on the fit ones.
    ``progress`` shows tqdm bars for the scale search and the prompts. For several
    budgets, intervals and per-prompt KL, see ``transfer``.
    """
    import pandas as pd

    adapter = ModelAdapter.of(model)
    ranking = check_rank_options(
        adapter, prompts, kl=kl, metric=metric, answers=answers, continuation=continuation,
        max_new_tokens=max_new_tokens, signs=signs, positions=positions, holdout=holdout,
        controls=controls, seed=seed,
    )  # fmt: skip
    items = _with_controls(vector_list(vectors), controls, seed)
    for v in items:
        check_vector(adapter, v)
    budget, sign_list, checked = ranking.budget, ranking.signs, ranking.metric
    fit, singles, held_out = ranking.fit, ranking.evaluate, ranking.held_out

    combos = [(v, sign) for v in items for sign in sign_list]
    amounts = kl_scales(
        adapter, fit, [(v, sign * budget) for v, sign in combos], positions=positions,
        progress=progress,
    )  # fmt: skip
    plan = [(v, a) for (v, _), a in zip(combos, amounts, strict=True)]
    from tqdm.auto import tqdm

    def mean_effects(prompts: list[TokenBatch], what: str) -> Tensor:
        """(KL, delta) per row of the plan, averaged over ``prompts``."""
        totals = torch.zeros(len(plan), 2, dtype=torch.float64)
        for prompt in tqdm(prompts, desc=what, unit="prompt", disable=not progress):
            measured, baseline = _measure(adapter, prompt, plan, checked, positions)
            totals += torch.tensor(
                [[k, val - baseline] for k, val in measured], dtype=torch.float64
            )
        return totals / len(prompts)

    totals = mean_effects(singles, "effects")
    chosen_on = mean_effects(ranking.fitted, "fit effects") if held_out else totals
    best: dict[int, int] = {}
    for i, (v, _) in enumerate(plan):
        j = best.get(id(v))
        if j is None or abs(chosen_on[i, 1]) > abs(chosen_on[j, 1]):
            best[id(v)] = i
    rows = []
    for v in items:
        i = best[id(v)]
        a = plan[i][1]
        rows.append(
            {
                "vector": v.name,
                "method": v.method,
                "layer": v.layer,
                "site": v.site,
                "sign": 1 if a >= 0 else -1,
                "absolute_scale": abs(a),
                "kl": float(totals[i, 0]),
                "effect": float(totals[i, 1]),
                "abs_effect": abs(float(totals[i, 1])),
                "fit_effect": float(chosen_on[i, 1]),
                "held_out": held_out,
            }
        )
    table = pd.DataFrame(rows)
    return table.sort_values("abs_effect", ascending=False, ignore_index=True)
