"""Held-out steerability: does a vector chosen on some prompts move others, more than a
random direction moves them at the same KL?

``transfer`` runs the protocol for any method's vectors (Power Steering, its refinement,
MELBO, CAA, your own):

1. **Matched KL, prompt by prompt.** Every candidate, both signs, and ``controls`` random
   unit directions at each candidate's hook are scaled on each prompt until
   KL(steered ‖ base) reaches each budget κ: the next-token KL at the prompt's last token,
   or (``kl_over="continuation"``) the mean KL over the tokens of the unsteered greedy
   continuation, teacher-forced. The KL needs no labels, so calibrating it on the
   evaluation prompts leaks nothing about the metric.
2. **Choice on the fit prompts.** At each κ, each method's vector and sign are the ones
   whose mean effect Δ (the metric's change) over the fit prompts is largest, in the
   direction ``goal`` asks for or, by default, in either direction (that direction is
   then the method's). A method's *chosen budget* is the κ whose ratio to random is
   largest on the fit prompts.
3. **Measurement on the evaluation prompts.** The chosen vector's mean Δ there, signed so
   that it is positive when the vector moves the metric the way it did on the fit
   prompts; the random level is the mean |Δ| of the controls (each sign) at that hook,
   with its 90th percentile; ``ratio`` = effect / random mean. Intervals are bootstrap
   percentiles over the evaluation prompts, controls resampled with them.

The pseudo-method ``"random"`` is the controls treated like a method: the control and
sign with the best fit effect, measured on the evaluation prompts. Choosing the best of
many candidates on the fit prompts flatters every method on them, which is why only
held-out numbers are reported as effects.

>>> import torch
>>> from tl_powersteer.transfer import bootstrap_means
>>> values = torch.tensor([[1.0, 2.0, 3.0]])
>>> low, high = bootstrap_means(values, draws=200, seed=0).quantile(torch.tensor([0.0, 1.0]), dim=-1)
>>> bool(low >= 1.0) and bool(high <= 3.0)
True
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from .adapters import Model, ModelAdapter, TokenBatch, decode_token, steered_runs
from .checks import check_seed, is_int, is_number, plain_ints
from .io import check_destination, check_shapes, register, resumable, save
from .scales import matched_kl_search, typical_norms
from .steering import batch_generations, check_greedy_continuation, check_new_tokens
from .vectors import SteeringVector, check_vector, random_vectors

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "KL_BUDGETS",
    "KL_OVER",
    "TransferResult",
    "bootstrap_means",
    "transfer",
]

KL_BUDGETS = (0.05, 0.1, 0.25, 0.5, 1.0)
KL_OVER = ("next_token", "continuation")
SIGNS = (1, -1)
RANDOM = "random"
# Steered sequences per forward pass (one prompt at a time).
_ROWS_PER_PASS = 128


def _check_loaded(result: TransferResult) -> None:
    n, budgets = len(result.names), len(result.kl_budgets)
    c, fit, held = len(result.control_layers), len(result.fit_prompts), len(result.eval_prompts)
    shapes = {
        "fit_effects": (n, 2, budgets, fit),
        "eval_effects": (n, 2, budgets, held),
        "control_fit_effects": (c, 2, budgets, fit),
        "control_eval_effects": (c, 2, budgets, held),
    }
    check_shapes(result, shapes, "its")


@register(check=_check_loaded)
@dataclass
class TransferResult:
    """Effects of candidate vectors and random controls at matched KL, prompt by prompt,
    on fit and evaluation prompts (``transfer``).

    Effects, KLs and absolute scales are indexed ``[vector, sign (+, −), budget,
    prompt]``; an effect is NaN where the KL could not be matched (it saturates below
    the budget, or exceeds it at the smallest scale) and on prompts not yet measured.
    ``labels`` name each candidate's method (the lines of ``plot_steerability``);
    ``passes`` and ``seconds`` are what each method spent finding its vectors, where
    known. ``goal`` is +1 or −1 for a metric to raise or lower, 0 for either way.
    """

    directions: Float[Tensor, "n d_model"]
    names: list[str]
    labels: list[str]
    layers: list[int]
    sites: list[str]
    fit_effects: Float[Tensor, "n 2 budgets n_fit"]
    fit_kls: Float[Tensor, "n 2 budgets n_fit"]
    fit_scales: Float[Tensor, "n 2 budgets n_fit"]
    eval_effects: Float[Tensor, "n 2 budgets n_eval"]
    eval_kls: Float[Tensor, "n 2 budgets n_eval"]
    eval_scales: Float[Tensor, "n 2 budgets n_eval"]
    control_layers: list[int]
    control_sites: list[str]
    control_fit_effects: Float[Tensor, "c 2 budgets n_fit"]
    control_fit_kls: Float[Tensor, "c 2 budgets n_fit"]
    control_eval_effects: Float[Tensor, "c 2 budgets n_eval"]
    control_eval_kls: Float[Tensor, "c 2 budgets n_eval"]
    fit_baseline: Float[Tensor, " n_fit"]
    eval_baseline: Float[Tensor, " n_eval"]
    kl_budgets: list[float]
    metric: str
    fit_answers: list[list[str]] | None
    eval_answers: list[list[str]] | None
    goal: int
    kl_over: str
    max_new_tokens: int
    controls: int
    seed: int
    tol: float
    draws: int
    fit_prompts: list[str]
    eval_prompts: list[str]
    model_name: str
    weights_fingerprint: str
    passes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    completed_fit: list[int] = field(default_factory=list)
    completed_eval: list[int] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        """The candidates' method labels, in order of first appearance, then ``"random"``."""
        return [*dict.fromkeys(self.labels), RANDOM]

    @property
    def complete(self) -> bool:
        return len(self.completed_fit) == len(self.fit_prompts) and len(self.completed_eval) == len(
            self.eval_prompts
        )

    def _hook_controls(self, layer: int, site: str) -> Tensor:
        return torch.tensor(
            [i for i, (lay, s) in enumerate(zip(self.control_layers, self.control_sites,
                                                strict=True)) if (lay, s) == (layer, site)],
            dtype=torch.long,
        )  # fmt: skip

    def _rows(self, label: str) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
        """A method's fit and eval effects ``[rows, budgets, prompts]`` (rows: its vectors
        × signs) and each row's (vector, sign index); for ``"random"`` every control."""
        if label == RANDOM:
            fit, held, n = (
                self.control_fit_effects,
                self.control_eval_effects,
                len(self.control_layers),
            )
            members = list(range(n))
        else:
            members = [i for i, x in enumerate(self.labels) if x == label]
            fit, held = self.fit_effects[members], self.eval_effects[members]
        keys = [(i, j) for i in members for j in range(2)]
        return fit.flatten(0, 1), held.flatten(0, 1), keys

    def _random_abs(self, layer: int, site: str, which: str) -> Tensor:
        """|mean Δ| per control and sign at a hook, on the fit or eval prompts: the
        metric moves of random directions, ``[controls · 2, budgets, prompts]`` before
        the mean (the caller averages, possibly over a resample of prompts)."""
        effects = self.control_fit_effects if which == "fit" else self.control_eval_effects
        return effects[self._hook_controls(layer, site)].flatten(0, 1)

    def random_band(self, layer: int, site: str) -> tuple[list[float], list[float]]:
        """Per budget, the mean and the 90th percentile of the random controls' |effect|
        (mean Δ over the eval prompts, each control and sign) at the hook ``blocks.{layer}.{site}``."""
        level = self._random_abs(layer, site, "eval").mean(dim=-1).abs()
        mean, q90 = [], []
        for b in range(len(self.kl_budgets)):
            x = level[:, b][level[:, b].isfinite()]
            mean.append(float(x.mean()) if len(x) else math.nan)
            q90.append(float(x.quantile(0.9)) if len(x) else math.nan)
        return mean, q90

    def to_pandas(self, *, interval: float = 0.95) -> pd.DataFrame:
        """One row per method and KL budget: the vector and sign chosen on the fit
        prompts and its held-out effect against the random controls.

        Columns: ``method, budget, vector, sign, layer, fit_effect`` (mean Δ on the fit
        prompts, signed by the method's direction), ``effect`` (the same on the eval
        prompts), ``effect_low, effect_high`` (bootstrap interval), ``random_mean,
        random_q90`` (mean and 90th percentile of the controls' |Δ| at that hook on the
        eval prompts), ``ratio = effect / random_mean`` with ``ratio_low, ratio_high``,
        ``fit_ratio`` (the same ratio on the fit prompts), ``chosen_budget`` (True on the
        budget with the best fit ratio), ``beats_q90`` (effect > random_q90), ``kl``
        (mean KL reached on the eval prompts), ``direction`` (+1: the metric was raised),
        ``prompts`` (eval prompts on which its KL was matched), ``passes`` and
        ``seconds`` (what the method spent; NaN if unknown).
        """
        import pandas as pd

        rows = []
        lo_q, hi_q = (1 - interval) / 2, 1 - (1 - interval) / 2
        for label in self.methods:
            fit, held, keys = self._rows(label)
            mine = []
            for b, budget in enumerate(self.kl_budgets):
                row = self._method_row(label, fit, held, keys, b, (lo_q, hi_q))
                row["budget"] = budget
                mine.append(row)
            ratios = [r["fit_ratio"] for r in mine]
            finite = [r for r in ratios if math.isfinite(r)]
            best = ratios.index(max(finite)) if finite else -1
            for b, row in enumerate(mine):
                row["chosen_budget"] = b == best
            rows += mine
        return pd.DataFrame(rows, columns=_COLUMNS)

    def summary(self, *, interval: float = 0.95) -> pd.DataFrame:
        """``to_pandas()``'s row of each method at its chosen budget (the one with the
        best ratio to random on the fit prompts)."""
        table = self.to_pandas(interval=interval)
        return table[table["chosen_budget"]].reset_index(drop=True)

    def _method_row(
        self,
        label: str,
        fit: Tensor,
        held: Tensor,
        keys: list[tuple[int, int]],
        b: int,
        quantiles: tuple[float, float],
    ) -> dict[str, Any]:
        fit_means = fit[:, b].mean(dim=-1)  # NaN where a prompt's KL was not matched
        score = fit_means.abs() if self.goal == 0 else self.goal * fit_means
        row: dict[str, Any] = {"method": label, "passes": math.nan, "seconds": math.nan}
        row["passes"] = self.passes.get(label, math.nan)
        row["seconds"] = self.seconds.get(label, math.nan)
        if not bool(score.isfinite().any()):
            return {**row, **dict.fromkeys(_MEASURED, math.nan), "vector": "", "sign": 0}
        pick = int(torch.where(score.isfinite(), score, -math.inf).argmax())
        i, j = keys[pick]
        direction = self.goal or (1 if float(fit_means[pick]) >= 0 else -1)
        if label == RANDOM:
            layer, site = self.control_layers[i], self.control_sites[i]
            name = f"random#{i} L{layer}"
            kls = self.control_eval_kls[i, j, b]
        else:
            layer, site, name = self.layers[i], self.sites[i], self.names[i]
            kls = self.eval_kls[i, j, b]
        chosen = direction * held[pick, b]
        # Prompts where the chosen row's KL was matched; the controls are read on the same.
        measured = chosen.isfinite()
        chosen = chosen[measured]
        fit_level = self._random_abs(layer, site, "fit")[:, b].mean(dim=-1).abs()
        fit_random = fit_level[fit_level.isfinite()].mean()
        controls = self._random_abs(layer, site, "eval")[:, b][:, measured]
        controls = controls[controls.isfinite().all(dim=-1)]
        level = controls.mean(dim=-1).abs()
        random_mean = float(level.mean()) if len(level) else math.nan
        effect = float(chosen.mean()) if len(chosen) else math.nan
        draws = _paired_draws(chosen, controls, self.draws, self.seed)
        lo, hi = torch.tensor(quantiles, dtype=torch.float64)
        if draws is None:
            e_lo = e_hi = r_lo = r_hi = math.nan
        else:
            e_lo, e_hi = (float(x) for x in draws[0].quantile(torch.stack([lo, hi])))
            r_lo, r_hi = (float(x) for x in draws[1].quantile(torch.stack([lo, hi])))
        q90 = float(level.quantile(0.9)) if len(level) else math.nan
        return {
            **row,
            "vector": name,
            "sign": SIGNS[j],
            "layer": layer,
            "fit_effect": direction * float(fit_means[pick]),
            "effect": effect,
            "effect_low": e_lo,
            "effect_high": e_hi,
            "random_mean": random_mean,
            "random_q90": q90,
            "ratio": effect / random_mean if random_mean > 0 else math.nan,
            "ratio_low": r_lo,
            "ratio_high": r_hi,
            "fit_ratio": (direction * float(fit_means[pick])) / float(fit_random)
            if float(fit_random) > 0
            else math.nan,
            "beats_q90": bool(effect > q90),
            "kl": float(kls[measured].mean()),
            "direction": direction,
            "prompts": int(measured.sum()),
        }

    def candidates_table(self) -> pd.DataFrame:
        """One row per candidate (and control), sign and budget: ``method, vector, layer,
        sign, budget, fit_effect, effect`` (mean Δ on the fit and eval prompts, not
        signed by any choice), ``fit_kl, kl`` and ``scale`` (mean absolute scale on the
        eval prompts)."""
        import pandas as pd

        rows = []
        for i, name in enumerate(self.names):
            for j, sign in enumerate(SIGNS):
                for b, budget in enumerate(self.kl_budgets):
                    rows.append({
                        "method": self.labels[i], "vector": name, "layer": self.layers[i],
                        "sign": sign, "budget": budget,
                        "fit_effect": float(self.fit_effects[i, j, b].mean()),
                        "effect": float(self.eval_effects[i, j, b].mean()),
                        "fit_kl": float(self.fit_kls[i, j, b].mean()),
                        "kl": float(self.eval_kls[i, j, b].mean()),
                        "scale": float(self.eval_scales[i, j, b].mean()),
                    })  # fmt: skip
        for c, layer in enumerate(self.control_layers):
            for j, sign in enumerate(SIGNS):
                for b, budget in enumerate(self.kl_budgets):
                    rows.append({
                        "method": RANDOM, "vector": f"random#{c} L{layer}", "layer": layer,
                        "sign": sign, "budget": budget,
                        "fit_effect": float(self.control_fit_effects[c, j, b].mean()),
                        "effect": float(self.control_eval_effects[c, j, b].mean()),
                        "fit_kl": float(self.control_fit_kls[c, j, b].mean()),
                        "kl": float(self.control_eval_kls[c, j, b].mean()),
                        "scale": math.nan,
                    })  # fmt: skip
        return pd.DataFrame(rows)

    def settings(self) -> dict[str, Any]:
        """What the measurement was made with; a checkpoint resumes only with the same."""
        return {
            "names": self.names,
            "labels": self.labels,
            "directions": _digest(self.directions),
            "kl_budgets": self.kl_budgets,
            "metric": self.metric,
            "fit_answers": self.fit_answers,
            "eval_answers": self.eval_answers,
            "kl_over": self.kl_over,
            "max_new_tokens": self.max_new_tokens,
            "controls": self.controls,
            "seed": self.seed,
            "tol": self.tol,
            "fit_prompts": self.fit_prompts,
            "eval_prompts": self.eval_prompts,
            "model_name": self.model_name,
            "weights_fingerprint": self.weights_fingerprint,
        }

    def __repr__(self) -> str:
        done = len(self.completed_fit) + len(self.completed_eval)
        total = len(self.fit_prompts) + len(self.eval_prompts)
        return (
            f"TransferResult(model={self.model_name!r}, methods {self.methods}, "
            f"{len(self.fit_prompts)} fit and {len(self.eval_prompts)} eval prompts "
            f"({done}/{total} measured), budgets {self.kl_budgets}, metric {self.metric!r}, "
            f"KL over the {self.kl_over.replace('_', ' ')})"
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.safetensors`` file (tensors, plus JSON metadata in its header)."""
        save(self, path)


_MEASURED = [
    "layer", "fit_effect", "effect", "effect_low", "effect_high", "random_mean", "random_q90",
    "ratio", "ratio_low", "ratio_high", "fit_ratio", "beats_q90", "kl", "direction", "prompts",
]  # fmt: skip
_COLUMNS = [
    "method", "budget", "vector", "sign", *_MEASURED, "chosen_budget", "passes", "seconds",
]  # fmt: skip


def _digest(t: Tensor) -> str:
    data = t.detach().double().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def bootstrap_means(values: Float[Tensor, "*rows prompts"], *, draws: int, seed: int) -> Tensor:
    """Means over prompts of ``draws`` resamples (with replacement) of the prompts,
    ``[*rows, draws]``; every row is resampled with the same prompts, so rows measured
    on the same prompts keep their pairing."""
    n = values.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, n, (draws, n), generator=gen)
    return values[..., picks].mean(dim=-1)


def _paired_draws(
    chosen: Tensor, controls: Tensor, draws: int, seed: int
) -> tuple[Tensor, Tensor] | None:
    """Bootstrap draws of the chosen effect and of its ratio to the controls' mean |Δ|,
    the controls resampled with the same prompts."""
    if draws == 0 or not len(chosen) or not len(controls):
        return None
    effect = bootstrap_means(chosen, draws=draws, seed=seed)
    level = bootstrap_means(controls, draws=draws, seed=seed).abs().mean(dim=0)
    return effect, effect / level


@dataclass
class _Candidates:
    vectors: list[SteeringVector]
    labels: list[str]
    passes: dict[str, int]
    seconds: dict[str, float]


def _check_candidates(adapter: ModelAdapter, candidates: Any) -> _Candidates:
    """Vectors and their method labels from a list of vectors (labelled by their method),
    of runs (``compare.MethodRun``: anything with ``method``, ``vectors``, ``passes`` and
    ``seconds``), or a mapping from a label to vectors or a run."""
    if isinstance(candidates, SteeringVector):
        candidates = [candidates]
    groups: list[tuple[str | None, Any]]
    if isinstance(candidates, Mapping):
        groups = [(str(label), item) for label, item in candidates.items()]
    elif isinstance(candidates, Sequence) and not isinstance(candidates, str):
        groups = [(None, item) for item in candidates]
    else:
        raise TypeError(
            "candidates must be a list of SteeringVectors or of find_vectors' runs, or a "
            f"dict from a label to either; got {type(candidates).__name__}"
        )
    found = _Candidates([], [], {}, {})
    for label, item in groups:
        if isinstance(item, SteeringVector):
            vectors, run = [item], None
        elif hasattr(item, "vectors") and hasattr(item, "method"):
            vectors, run = list(item.vectors), item
        elif isinstance(item, Sequence) and all(isinstance(v, SteeringVector) for v in item):
            vectors, run = list(item), None
        else:
            raise TypeError(
                f"a candidate must be a SteeringVector or a run of find_vectors, got "
                f"{type(item).__name__}"
            )
        for v in vectors:
            check_vector(adapter, v)
            name = label or (run.method if run is not None else v.method)
            if name == RANDOM:
                raise ValueError(
                    "'random' labels the controls transfer draws itself (controls=); give "
                    "your own random vectors another label, e.g. {'my random': vectors}"
                )
            found.vectors.append(v)
            found.labels.append(name)
        if run is not None:
            key = label or run.method
            found.passes[key] = int(run.passes)
            found.seconds[key] = float(run.seconds)
    if not found.vectors:
        raise ValueError("candidates is empty: give at least one steering vector")
    return found


def _check_budgets(kl_budgets: Any) -> list[float]:
    values = list(kl_budgets) if isinstance(kl_budgets, Sequence) else [kl_budgets]
    if not values or not all(is_number(x) and 0 < x < math.inf for x in values):
        raise ValueError(
            f"kl_budgets must be positive numbers of nats, e.g. {KL_BUDGETS}; got {kl_budgets!r}"
        )
    if sorted(set(values)) != values:
        raise ValueError(f"kl_budgets must be ascending and distinct, got {kl_budgets!r}")
    return [float(x) for x in values]


def _check_prompts(prompts: Any, what: str) -> list[str]:
    if (
        isinstance(prompts, str)
        or not isinstance(prompts, Sequence)
        or not prompts
        or not all(isinstance(p, str) and p for p in prompts)
    ):
        raise ValueError(f"{what} must be a non-empty list of prompt strings")
    return list(prompts)


@dataclass
class _Measured:
    """One prompt's measurement at one hook: per row (direction × budget) its effect,
    KL and absolute scale."""

    effects: Tensor
    kls: Tensor
    scales: Tensor


class _Prompt:
    """One prompt: its tokens, answers, unsteered value, and (for a KL over the
    continuation) its unsteered greedy continuation."""

    def __init__(
        self,
        adapter: ModelAdapter,
        text: str,
        pair: tuple[int, int] | None,
        scorer: Callable[[str], float] | None,
        kl_over: str,
        max_new_tokens: int,
    ):
        self.adapter, self.pair, self.scorer = adapter, pair, scorer
        self.max_new_tokens = max_new_tokens
        self.prompt = adapter.tokenize(text)
        n = int(self.prompt.lengths[0])
        self.continuation = ""
        self.batch, self.read = self.prompt, None
        if kl_over == "continuation" or scorer is not None:
            out = adapter.generate(self.prompt.tokens, max_new_tokens=max_new_tokens, greedy=True)
            check_greedy_continuation(adapter, out, n)
            self.continuation = adapter.decode(out[0, n:])
            if kl_over == "continuation":
                # Position i predicts token i + 1: read from the prompt's last token to the
                # one before the continuation's last.
                tokens = out
                length = torch.tensor([tokens.shape[1]], device=tokens.device)
                self.batch = TokenBatch(tokens, length, None)
                self.read = torch.arange(n - 1, tokens.shape[1] - 1, device=tokens.device)[None]

    def baseline(self, hook: str) -> tuple[Tensor, float]:
        """The unsteered logits where the KL is read, and the metric's unsteered value."""
        zero = torch.zeros(1, self.adapter.d_model, dtype=torch.float64)
        with steered_runs(self.adapter, self.batch, hook, read=self.read) as run:
            base = run(zero)[0]
        first = base.reshape(-1, base.shape[-1])[0]
        if self.pair is not None:
            a, b = self.pair
            return base, float(first[a] - first[b])
        assert self.scorer is not None
        return base, float(self.scorer(self.continuation))

    def measure(self, hook: str, directions: Tensor, budgets: Tensor, tol: float) -> _Measured:
        """Every direction at every budget, scaled to its KL on this prompt."""
        adapter = self.adapter
        base, value = self.baseline(hook)
        unit = float(typical_norms(adapter, self.prompt, [hook])[0])
        if unit == 0:
            raise ValueError(
                f"the activation at {hook} is zero on a prompt, so no scale reaches a KL "
                "there; choose another hook"
            )
        nb = budgets.shape[0]
        rows = directions.repeat_interleave(nb, dim=0)
        goals = budgets.repeat(directions.shape[0])
        columns = list(self.pair) if self.pair is not None else []
        with steered_runs(adapter, self.batch, hook, read=self.read, chunk=_ROWS_PER_PASS) as run:
            scales, kls, cols = matched_kl_search(run, base, rows, goals, unit, columns, tol=tol)
        if cols is not None:
            values = cols[:, 0] - cols[:, 1]
        else:
            assert self.scorer is not None
            texts = batch_generations(
                adapter, self.prompt.tokens, hook, scales[:, None] * rows,
                max_new_tokens=self.max_new_tokens,
            )  # fmt: skip
            values = torch.tensor([float(self.scorer(t)) for t in texts], dtype=torch.float64)
        effects = values - value
        matched = (kls / goals).clamp_min(1e-300).log().abs() <= tol
        effects = torch.where(matched, effects, math.nan)
        shape = (directions.shape[0], nb)
        return _Measured(effects.view(shape), kls.view(shape), scales.view(shape))


def _resumed(fresh: TransferResult, path: Path) -> TransferResult:
    saved: TransferResult = resumable(fresh, path, "a transfer measurement")
    saved.passes, saved.seconds = fresh.passes, fresh.seconds
    return saved


@plain_ints
def transfer(
    model: Model | ModelAdapter,
    fit_prompts: Sequence[str],
    eval_prompts: Sequence[str],
    candidates: Any,
    *,
    metric: str | Callable[[str], float] = "logit_diff",
    answers: Any = None,
    eval_answers: Any = None,
    kl_budgets: Sequence[float] = KL_BUDGETS,
    controls: int = 16,
    goal: int | None = None,
    kl_over: str = "next_token",
    max_new_tokens: int = 20,
    draws: int = 1000,
    tol: float = 1e-3,
    seed: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> TransferResult:
    """Held-out steerability of candidate vectors against random directions at matched
    KL (see the module docstring for the protocol).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        fit_prompts: prompts on which each method's vector, sign and budget are chosen.
        eval_prompts: held-out prompts on which the choice is measured.
        candidates: ``SteeringVector``s (grouped by their ``method``), ``find_vectors``'
            runs (which also say what each method spent), or a dict from a label to
            either.
        metric: ``"logit_diff"`` (logit(A) − logit(B) at the prompt's last token), or a
            function scoring the greedy continuation's text (generated at every row's
            scale, ``max_new_tokens`` long).
        answers: (A, B) for ``"logit_diff"``, one pair for every prompt or a list of
            pairs, one per fit prompt (and per eval prompt unless ``eval_answers``).
        eval_answers: the eval prompts' pairs, when they differ from the fit prompts'.
        kl_budgets: the KL budgets in nats, ascending.
        controls: random unit directions at each candidate hook (seeds ``seed``...).
        goal: +1 to raise the metric, −1 to lower it, None for whichever way each
            method moves it most on the fit prompts.
        kl_over: ``"next_token"`` (the prompt's last token) or ``"continuation"`` (the
            mean over the unsteered greedy continuation of ``max_new_tokens`` tokens,
            teacher-forced, the steering added on every token).
        max_new_tokens: length of the continuations (text metric, continuation KL).
        draws: bootstrap resamples of the eval prompts for the intervals (0: none).
        tol: each scale search stops within ``tol`` of log κ; rows that cannot get
            there are left out (NaN).
        seed: the controls' and the bootstrap's seed.
        checkpoint: a ``.safetensors`` path written after every prompt (atomically); a
            run with the same arguments resumes from it.
        progress: a tqdm bar of prompts measured.
    """
    adapter = ModelAdapter.of(model)
    fit = _check_prompts(fit_prompts, "fit_prompts")
    held = _check_prompts(eval_prompts, "eval_prompts")
    found = _check_candidates(adapter, candidates)
    budgets = _check_budgets(kl_budgets)
    if not is_int(controls) or controls < 1:
        raise ValueError(
            f"controls must be a positive int (random directions per hook), got {controls!r}"
        )
    if goal not in (None, 1, -1):
        raise ValueError(f"goal must be +1 (raise the metric), -1 (lower it) or None, got {goal!r}")
    if kl_over not in KL_OVER:
        raise ValueError(f"kl_over must be one of {KL_OVER}, got {kl_over!r}")
    new_tokens = check_new_tokens(max_new_tokens)
    if not is_int(draws) or draws < 0:
        raise ValueError(f"draws must be a non-negative int (bootstrap resamples), got {draws!r}")
    if not is_number(tol) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number between 0 and 1 (in log KL), got {tol!r}")
    check_seed(seed)
    scorer: Callable[[str], float] | None = None
    fit_pairs: list[tuple[int, int]] | None = None
    eval_pairs: list[tuple[int, int]] | None = None
    if callable(metric):
        scorer, metric_name = metric, getattr(metric, "__name__", "text")
    elif metric == "logit_diff":
        metric_name = metric
        fit_pairs = adapter.answer_pairs(answers, len(fit), "answers")
        eval_pairs = adapter.answer_pairs(
            answers if eval_answers is None else eval_answers, len(held),
            "answers" if eval_answers is None else "eval_answers",
        )  # fmt: skip
    else:
        raise ValueError(
            f"metric must be 'logit_diff' or a function of the generated text, got {metric!r}"
        )
    path = (
        None if checkpoint is None else check_destination(checkpoint, ".safetensors", "checkpoint")
    )

    hooks = list(dict.fromkeys(check_vector(adapter, v) for v in found.vectors))
    where = {adapter.hook_name(v.layer, v.site): (v.layer, v.site) for v in found.vectors}
    control_vectors: list[SteeringVector] = []
    for hook in hooks:
        layer, site = where[hook]
        control_vectors += random_vectors(adapter.d_model, layer, site, controls, seed=seed)
    n, c, nb = len(found.vectors), len(control_vectors), len(budgets)
    nan = lambda *shape: torch.full(shape, math.nan, dtype=torch.float64)  # noqa: E731
    result = TransferResult(
        directions=torch.stack([v.direction.double() for v in found.vectors]),
        names=[v.name for v in found.vectors], labels=found.labels,
        layers=[v.layer for v in found.vectors], sites=[v.site for v in found.vectors],
        fit_effects=nan(n, 2, nb, len(fit)), fit_kls=nan(n, 2, nb, len(fit)),
        fit_scales=nan(n, 2, nb, len(fit)), eval_effects=nan(n, 2, nb, len(held)),
        eval_kls=nan(n, 2, nb, len(held)), eval_scales=nan(n, 2, nb, len(held)),
        control_layers=[v.layer for v in control_vectors],
        control_sites=[v.site for v in control_vectors],
        control_fit_effects=nan(c, 2, nb, len(fit)), control_fit_kls=nan(c, 2, nb, len(fit)),
        control_eval_effects=nan(c, 2, nb, len(held)), control_eval_kls=nan(c, 2, nb, len(held)),
        fit_baseline=nan(len(fit)), eval_baseline=nan(len(held)), kl_budgets=budgets,
        metric=metric_name, fit_answers=_decoded(adapter, fit_pairs),
        eval_answers=_decoded(adapter, eval_pairs), goal=goal or 0, kl_over=kl_over,
        max_new_tokens=new_tokens, controls=controls, seed=seed, tol=float(tol), draws=draws,
        fit_prompts=fit, eval_prompts=held, model_name=adapter.name,
        weights_fingerprint=adapter.weights_fingerprint(), passes=found.passes,
        seconds=found.seconds,
    )  # fmt: skip
    if path is not None and path.exists():
        result = _resumed(result, path)

    budget_tensor = torch.tensor(budgets, dtype=torch.float64)
    vector_rows = {h: [i for i, v in enumerate(found.vectors) if check_vector(adapter, v) == h]
                   for h in hooks}  # fmt: skip
    control_rows = {h: [i for i, v in enumerate(control_vectors)
                        if adapter.hook_name(v.layer, v.site) == h] for h in hooks}  # fmt: skip
    work = [("fit", i, text) for i, text in enumerate(fit) if i not in result.completed_fit]
    work += [("eval", i, text) for i, text in enumerate(held) if i not in result.completed_eval]
    from tqdm.auto import tqdm

    total = len(fit) + len(held)
    with tqdm(total=total, desc="transfer", unit="prompt", disable=not progress) as bar:
        bar.update(total - len(work))
        for which, p, text in work:
            bar.set_postfix_str(f"{which} prompt {p}")
            pairs = fit_pairs if which == "fit" else eval_pairs
            prompt = _Prompt(
                adapter, text, None if pairs is None else pairs[p], scorer, kl_over, new_tokens
            )
            _, value = prompt.baseline(hooks[0])
            (result.fit_baseline if which == "fit" else result.eval_baseline)[p] = value
            for hook in hooks:
                mine, theirs = vector_rows[hook], control_rows[hook]
                signed = [sign * found.vectors[i].direction.double() for i in mine
                          for sign in SIGNS]  # fmt: skip
                signed += [sign * control_vectors[i].direction.double() for i in theirs
                           for sign in SIGNS]  # fmt: skip
                measured = prompt.measure(hook, torch.stack(signed), budget_tensor, tol)
                split = 2 * len(mine)
                _store(result, which, p, mine, theirs, measured, split)
            (result.completed_fit if which == "fit" else result.completed_eval).append(p)
            if path is not None:
                result.save(path)
            bar.update(1)
    return result


def _store(
    result: TransferResult,
    which: str,
    p: int,
    mine: list[int],
    theirs: list[int],
    measured: _Measured,
    split: int,
) -> None:
    """Put one prompt's rows (vectors' signs first, then controls') into ``result``."""
    nb = len(result.kl_budgets)

    def rows(t: Tensor, members: list[int]) -> Tensor:
        return t.view(len(members), 2, nb)

    vec = slice(0, split)
    ctl = slice(split, None)
    if which == "fit":
        result.fit_effects[mine, :, :, p] = rows(measured.effects[vec], mine)
        result.fit_kls[mine, :, :, p] = rows(measured.kls[vec], mine)
        result.fit_scales[mine, :, :, p] = rows(measured.scales[vec], mine)
        result.control_fit_effects[theirs, :, :, p] = rows(measured.effects[ctl], theirs)
        result.control_fit_kls[theirs, :, :, p] = rows(measured.kls[ctl], theirs)
    else:
        result.eval_effects[mine, :, :, p] = rows(measured.effects[vec], mine)
        result.eval_kls[mine, :, :, p] = rows(measured.kls[vec], mine)
        result.eval_scales[mine, :, :, p] = rows(measured.scales[vec], mine)
        result.control_eval_effects[theirs, :, :, p] = rows(measured.effects[ctl], theirs)
        result.control_eval_kls[theirs, :, :, p] = rows(measured.kls[ctl], theirs)


def _decoded(adapter: ModelAdapter, pairs: list[tuple[int, int]] | None) -> list[list[str]] | None:
    if pairs is None:
        return None
    return [[decode_token(adapter.model, a), decode_token(adapter.model, b)] for a, b in pairs]
