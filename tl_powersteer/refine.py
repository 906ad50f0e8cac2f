"""Refinement inside an unsupervised subspace: the unit combination of a few vectors
that moves a logit difference most at matched KL.

Power Steering singles out a subspace without labels (a pair's top-k right singular
vectors, or the near-degenerate band past a small gap); which direction inside it moves a
given fork's answer is a k-dimensional question. ``refine_in_subspace`` answers it with the
fit prompts' labels, each prompt's scale set by its own KL as ``transfer`` sets it::

    maximise  F(c) = mean_p s · Δm_p(a_p(c) · Q c)   over unit c ∈ Rᵏ,
    a_p(c):   the scale at which KL_p(steered ‖ base) = κ on prompt p,

with Q an orthonormal basis of the vectors' span, Δm_p the change of logit(A) − logit(B)
at prompt p's last token and s = ±1 the way the metric should move.

1. **Linear start.** Near zero, Δm_p ≈ a gₚᵀc and KL_p ≈ ½ a² cᵀFₚc, with gₚ the
   metric's gradient and Fₚ the Fisher information of the next-token distribution in the
   subspace; so F(c) ≈ √(2κ) · mean_p gₚᵀc / √(cᵀFₚc). Both come from the Jacobian of the
   last-token logits with respect to c (k + 2 passes over the fit prompts); the surrogate
   is maximised on the sphere without the model. Its best direction, each ±vector and the
   surrogate's, are then scaled to κ and measured; the best is the start.
2. **Matched-KL ascent.** Each round takes the gradient of F on the sphere, by implicit
   differentiation of a_p: ∇F = s · mean_p [∇mₚ − (∇mₚ·c) / (∇KLₚ·c) · ∇KLₚ] (one forward
   and two backward passes), and a line search along it whose candidates are scaled to κ
   on every prompt. It stops after ``rounds`` rounds, or when no step helps.

The labels only pick a direction inside the span the model singled out; report the result
as its own method beside Power Steering (``transfer`` labels it
``refined_<method of the vectors>``), never inside Power Steering's numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor

from .adapters import (
    Model,
    ModelAdapter,
    SteeredRun,
    TokenBatch,
    steered_logits_with_grad,
    steered_runs,
)
from .checks import is_int, is_number, plain_ints
from .scales import matched_kl_search, typical_norms
from .vectors import SteeringVector, check_vector, vector_list

__all__ = [
    "FitPrompts",
    "linear_terms",
    "matched_gradient",
    "refine_in_subspace",
    "subspace_surrogate",
]

# The ascent's line search tries these multiples of its last accepted step (radians).
_STEPS = (0.5, 1.0, 2.0)
_FIRST_STEP = 0.25
_SMALLEST_STEP = 1e-3
# Scale searches while exploring only rank directions: a looser tolerance in log KL.
_EXPLORE_TOL = 1e-2
# What refine_in_subspace may measure to choose its start.
STARTS = ("all", "surrogate")


def subspace_surrogate(
    g: Tensor, fisher: Tensor, *, starts: Tensor, steps: int = 300
) -> tuple[Tensor, Tensor]:
    """Maximise S(c) = mean_p gₚᵀc / √(cᵀFₚc) over unit c (``g`` ``[p, k]``, ``fisher``
    ``[p, k, k]``) by ascent on the sphere from each row of ``starts``; returns (the best
    unit c, S there). S is the matched-KL effect of the linearised model divided by √(2κ).
    """

    def value(c: Tensor) -> Tensor:
        quad = torch.einsum("pij,ni,nj->np", fisher, c, c).clamp_min(1e-300)
        return ((c @ g.T) / quad.sqrt()).mean(dim=1)

    c = (starts / starts.norm(dim=1, keepdim=True)).clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=0.05)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad()
        with torch.enable_grad():
            (-value(c).sum()).backward()
        opt.step()
        with torch.no_grad():
            c.div_(c.norm(dim=1, keepdim=True))
    with torch.no_grad():
        final = value(c)
        best = int(final.argmax())
        return c[best].detach().clone(), final[best].detach().clone()


class FitPrompts:
    """The fit prompts, one steered run each, with their answers, unsteered values, base
    logits and typical norms; counts the passes the refinement spends."""

    def __init__(
        self,
        stack: ExitStack,
        adapter: ModelAdapter,
        batch: TokenBatch,
        hook: str,
        pairs: list[tuple[int, int]],
    ):
        self.adapter, self.batch, self.hook, self.pairs = adapter, batch, hook, pairs
        self.runs: list[SteeredRun] = []
        self.bases, self.values, self.units = [], [], []
        zero = torch.zeros(1, adapter.d_model, dtype=torch.float64)
        for p, length in enumerate(batch.lengths.tolist()):
            single = TokenBatch(batch.tokens[p : p + 1, :length], batch.lengths[p : p + 1], None)
            run = stack.enter_context(steered_runs(adapter, single, hook, chunk=128))
            base = run(zero)[0]
            a, b = pairs[p]
            self.runs.append(run)
            self.bases.append(base)
            self.values.append(float(base[0, a] - base[0, b]))
            self.units.append(float(typical_norms(adapter, single, [hook])[0]))
        self.passes = 0.0

    @property
    def n(self) -> int:
        return len(self.runs)

    def matched(
        self, directions: Tensor, kl: float, tol: float, probes: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Each direction's effect ``[rows, prompts]`` (NaN where the KL was not matched)
        and scale ``[rows, prompts]`` at ``kl`` on every prompt."""
        effects = torch.full((directions.shape[0], self.n), math.nan, dtype=torch.float64)
        scales = torch.zeros_like(effects)
        goals = torch.full((directions.shape[0],), kl, dtype=torch.float64)
        for p, run in enumerate(self.runs):
            before = run.rows_run
            probe = None if probes is None else probes[:, p]
            s, kls, cols = matched_kl_search(
                run, self.bases[p], directions, goals, self.units[p], list(self.pairs[p]),
                tol=tol, probe=probe,
            )  # fmt: skip
            assert cols is not None
            ok = (kls / kl).log().abs() <= tol
            effects[:, p] = torch.where(ok, cols[:, 0] - cols[:, 1] - self.values[p], math.nan)
            scales[:, p] = s
            self.passes += (run.rows_run - before) / self.n
        return effects, scales

    def logits(self, deltas: Tensor) -> Tensor:
        """Last-token logits of every prompt with its own delta, differentiable."""
        return steered_logits_with_grad(self.adapter, self.batch, self.hook, deltas)

    def answer_logits(self, logits: Tensor) -> Tensor:
        rows = torch.arange(self.n)
        a = torch.tensor([p[0] for p in self.pairs])
        b = torch.tensor([p[1] for p in self.pairs])
        return logits[rows, a] - logits[rows, b]


def linear_terms(fit: FitPrompts, Q: Tensor) -> tuple[Tensor, Tensor]:
    """gₚ ``[p, k]`` and Fₚ ``[p, k, k]`` at zero, from the Jacobian of every prompt's
    last-token logits with respect to its coefficients (reverse over reverse: the
    gradient's graph is linear in the cotangent u, and its own gradient in u is the
    Jacobian-vector product)."""
    k = Q.shape[1]
    C = torch.zeros(fit.n, k, dtype=Q.dtype, requires_grad=True)
    with torch.enable_grad():
        logits = fit.logits(C @ Q.T)
        u = torch.zeros_like(logits, requires_grad=True)
        (grad_c,) = torch.autograd.grad((logits * u).sum(), C, create_graph=True)
        Y = torch.stack(
            [
                torch.autograd.grad(grad_c[:, j].sum(), u, retain_graph=j < k - 1)[0]
                for j in range(k)
            ],
            dim=-1,
        ).double()
    fit.passes += 2 + k
    probs = logits.detach().double().softmax(dim=-1)
    g = torch.stack([Y[p, a] - Y[p, b] for p, (a, b) in enumerate(fit.pairs)])
    weighted = Y * probs[..., None]
    mean = weighted.sum(dim=1)  # Yᵀπ, [p, k]
    fisher = torch.einsum("pvi,pvj->pij", weighted, Y) - mean[:, :, None] * mean[:, None, :]
    return g, fisher


def matched_gradient(fit: FitPrompts, Q: Tensor, c: Tensor, scales: Tensor, sign: int) -> Tensor:
    """The gradient on the sphere of s·F at unit ``c``, every prompt at its matched scale."""
    k = Q.shape[1]
    C = c.expand(fit.n, k).clone().requires_grad_(True)
    with torch.enable_grad():
        logits = fit.logits(scales[:, None].to(Q.dtype) * (C @ Q.T))
        metric = fit.answer_logits(logits)
        logp = logits.double().log_softmax(dim=-1)
        base = torch.stack([b[0] for b in fit.bases]).double().log_softmax(dim=-1)
        kl = (logp.exp() * (logp - base)).sum(dim=-1)
        (dm,) = torch.autograd.grad(metric.sum(), C, retain_graph=True)
        (dk,) = torch.autograd.grad(kl.sum(), C)
    fit.passes += 3
    dm, dk = dm.double(), dk.double()
    along = (dm @ c) / (dk @ c).where((dk @ c).abs() > 0, 1e-300)
    G = sign * (dm - along[:, None] * dk).mean(dim=0)
    return G - (G @ c) * c


@plain_ints
def refine_in_subspace(
    model: Model | ModelAdapter,
    prompts: str | Sequence[str],
    vectors: Sequence[SteeringVector],
    *,
    answers: Any,
    kl: float = 0.25,
    goal: int | None = None,
    rounds: int = 6,
    starts: str = "all",
    tol: float = 1e-3,
) -> SteeringVector:
    """The unit combination of ``vectors`` that moves logit(A) − logit(B) most on the fit
    ``prompts`` at ``kl`` nats of next-token KL, each prompt scaled to its own KL (see the
    module docstring).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        prompts: the fit prompts (a string or a list).
        vectors: two or more vectors at one hook, e.g. ``power_steer(...).steering_vectors()``.
        answers: (A, B), one pair for every prompt or one per prompt.
        kl: the KL budget (nats) at which the combination is optimised.
        goal: +1 to raise the logit difference, −1 to lower it, None for whichever way
            moves it more.
        rounds: matched-KL ascent rounds after the linear start (0: the start only).
        starts: the directions measured at ``kl`` to pick the start: ``"all"``, the
            surrogate's maximum and each vector, each sign (2k + 2 directions, so the
            result is never worse on the fit prompts than any one vector), or
            ``"surrogate"``, its maximum with each sign only (2 directions, a sixth of the
            passes at k = 8).
        tol: the final measurement's tolerance in log KL.

    Returns:
        A ``SteeringVector`` at the vectors' hook, with method ``refined_<their method>``;
        its metadata holds the coefficients on each vector, the fit effect at ``kl``,
        the passes it spent (forward or backward passes of one vector over the fit
        prompts, as ``find_vectors`` counts them) and the seconds.
    """
    adapter = ModelAdapter.of(model)
    items = vector_list(vectors)
    if len(items) < 2:
        raise ValueError(f"refining needs at least 2 vectors to combine, got {len(items)}")
    hooks = {check_vector(adapter, v) for v in items}
    if len(hooks) != 1:
        raise ValueError(
            f"the vectors sit at {len(hooks)} hooks ({', '.join(sorted(hooks))}); a combination "
            "needs them at one hook: refine each pair's vectors separately"
        )
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, Sequence) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("prompts must be a prompt string or a non-empty list of them")
    pairs = adapter.answer_pairs(answers, len(texts), "answers")
    if not is_number(kl) or not 0 < kl < math.inf:
        raise ValueError(f"kl must be a positive number of nats (e.g. 0.25), got {kl!r}")
    if goal not in (None, 1, -1):
        raise ValueError(f"goal must be +1 (raise the metric), -1 (lower it) or None, got {goal!r}")
    if not is_int(rounds) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    if starts not in STARTS:
        raise ValueError(f"starts must be one of {STARTS}, got {starts!r}")
    if not is_number(tol) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number between 0 and 1 (in log KL), got {tol!r}")
    V = torch.stack([v.direction.double() for v in items])
    Q, R = torch.linalg.qr(V.T)
    if bool((R.diagonal().abs() < 1e-6).any()):
        raise ValueError("the vectors are linearly dependent: give independent directions")

    began = time.perf_counter()
    (hook,) = hooks
    batch = adapter.tokenize(list(texts))
    with ExitStack() as stack:
        fit = FitPrompts(stack, adapter, batch, hook, pairs)
        g, fisher = linear_terms(fit, Q)
        k = Q.shape[1]
        mean_fisher = fisher.mean(dim=0) + 1e-12 * fisher.diagonal(
            dim1=1, dim2=2
        ).sum() * torch.eye(k, dtype=torch.float64)
        natural = torch.linalg.solve(mean_fisher, g.mean(dim=0))
        seeds = torch.cat([natural[None], torch.eye(k, dtype=torch.float64)])
        linear, _ = subspace_surrogate(g, fisher, starts=torch.cat([seeds, -seeds]))
        # The surrogate is odd in c, so only a measurement at κ tells which way moves more.
        candidates = torch.stack([linear, -linear])
        if starts == "all":
            basis = torch.eye(k, dtype=torch.float64)
            candidates = torch.cat([candidates, basis, -basis])
        effects, scales = fit.matched(candidates @ Q.T, kl, _EXPLORE_TOL)
        means = effects.mean(dim=1)
        score = means.abs() if goal is None else goal * means
        best = int(torch.where(score.isfinite(), score, -math.inf).argmax())
        if not math.isfinite(float(score[best])):
            raise ValueError(
                f"no combination reaches KL {kl} nats on every prompt: choose a smaller kl"
            )
        sign = goal or (1 if float(means[best]) >= 0 else -1)
        c, value, at = candidates[best], float(sign * means[best]), scales[best]
        step = _FIRST_STEP
        for _ in range(rounds):
            G = matched_gradient(fit, Q, c, at, sign)
            if float(G.norm()) == 0:
                break
            unit = G / G.norm()
            angles = torch.tensor([step * f for f in _STEPS], dtype=torch.float64)
            tries = angles.cos()[:, None] * c + angles.sin()[:, None] * unit
            effects, found = fit.matched(
                tries @ Q.T, kl, _EXPLORE_TOL, probes=at.expand(len(tries), -1)
            )
            gains = sign * effects.mean(dim=1)
            pick = int(torch.where(gains.isfinite(), gains, -math.inf).argmax())
            if not float(gains[pick]) > value:
                step /= 4
                if step < _SMALLEST_STEP:
                    break
                continue
            c, value, at, step = tries[pick], float(gains[pick]), found[pick], float(angles[pick])
        effects, _ = fit.matched((c @ Q.T)[None], kl, tol, probes=at[None])
        value = sign * float(effects.mean())
        passes = fit.passes
    direction = Q @ c
    method = items[0].method
    source = items[0].name.split(" #")[0]
    return SteeringVector(
        direction.float(),
        layer=items[0].layer,
        site=items[0].site,
        method=f"refined_{method}",
        metadata={
            "name": f"refined {source}",
            "basis": [v.name for v in items],
            "coefficients": (V @ direction).tolist(),
            "kl": float(kl),
            "goal": sign,
            "starts": starts,
            "rounds": rounds,
            "fit_effect": value,
            "passes": math.ceil(passes),
            "seconds": time.perf_counter() - began,
            "prompts": list(texts),
            "provenance": items[0].metadata.get("provenance", {}),
        },
    )
