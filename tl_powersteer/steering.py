"""Applying steering vectors: one vector type, a context manager, scales, generations.

A ``SteeringVector`` is a unit direction at a hook ``blocks.{layer}.{site}``. Steering
adds ``a · direction`` to that activation at chosen token positions, where the absolute
scale ``a`` comes from one of three modes:

* ``"absolute"``: a = scale;
* ``"relative"``: a = scale × the *robust typical norm* of the activation at the hook on the
  reference prompts (``typical_norm``);
* ``"kl"``: a = the scale at which the next-token KL(steered ‖ base) at the last position,
  averaged over the reference prompts, reaches ``scale`` nats (``kl_scale``).

A negative scale steers along −direction. Singular vectors have no natural sign, so
``generate_steered`` and ``effect`` try both signs.

Positions are counted in the full sequence, prompt then generated tokens, also when
``generate`` feeds one token at a time through a KV cache: ``"all"``, ``"prompt"`` (the
prompt's tokens), ``"generated"`` (tokens produced after the prompt), an int (one prompt
position; negative counts from the prompt's end) or a slice (its start inside the prompt;
an open end reaches into the generated tokens).

>>> import torch
>>> from transformer_lens.config import TransformerBridgeConfig
>>> from transformer_lens.model_bridge import TransformerBridge
>>> import tl_powersteer as tps
>>> cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_heads=2, n_layers=2, n_ctx=16,
...                               d_vocab=20, d_mlp=16, act_fn="gelu", seed=0)
>>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64)
>>> vector = tps.SteeringVector(torch.arange(8.0), layer=0, site="hook_resid_post", method="custom")
>>> tokens = torch.tensor([[1, 2, 3, 4]])
>>> with tps.steer(model, vector, scale=4.0, positions="all"):
...     steered = model(tokens)
>>> bool((steered - model(tokens)).abs().max() > 1e-3)  # the hook is gone after the block
True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .adapters import (
    KV_CACHE_FIX,
    ModelAdapter,
    Prompts,
    TokenBatch,
    activations,
    steered_logits,
    versions_line,
)
from .io import register
from .io import save as save_result

__all__ = [
    "POSITION_CHOICES",
    "SCALE_MODES",
    "SteeringVector",
    "Steering",
    "check_greedy_continuation",
    "generate_steered",
    "kl_scale",
    "kl_scales",
    "random_vectors",
    "resolve_scales",
    "robust_norm",
    "steer",
    "typical_norm",
]

POSITION_CHOICES = ("all", "prompt", "generated")
SCALE_MODES = ("absolute", "relative", "kl")
Positions = str | int | slice


@register()
@dataclass
class SteeringVector:
    """A unit direction at the hook ``blocks.{layer}.{site}``, with its provenance.

    ``norm`` is the method's own magnitude for the vector (the CAA mean difference's norm,
    MELBO's radius, 1 for Power Steering), so ``scale=vector.norm`` in absolute mode adds
    the vector the method found. ``metadata`` holds JSON-friendly provenance (model, layers,
    prompts, rank, singular value, ...); ``metadata["name"]`` labels the vector in tables.
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
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"layer must be an int, got {self.layer!r}")
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


def random_vectors(
    d_model: int, layer: int, site: str, n: int, *, seed: int = 0
) -> list[SteeringVector]:
    """``n`` random unit directions (the control baseline), reproducible from ``seed``."""
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


def typical_norm(model: Any, prompts: Prompts, layer: int, site: str) -> float:
    """``robust_norm`` of the activation at ``blocks.{layer}.{site}`` over the prompts'
    real tokens, without each prompt's first token (often an attention sink with a norm
    many times the others')."""
    adapter = ModelAdapter(model)
    batch = adapter.tokenize(prompts)
    return float(typical_norms(adapter, batch, [adapter.hook_name(layer, site)])[0])


def typical_norms(adapter: ModelAdapter, batch: TokenBatch, hooks: Sequence[str]) -> Tensor:
    """``typical_norm`` of each hook's activation, from one forward pass."""
    acts = activations(adapter, batch, list(hooks))
    mask = batch.mask.clone()
    mask[:, 0] &= batch.lengths == 1
    return torch.tensor([robust_norm(act[mask]) for act in acts], dtype=torch.float64)


def _check_positions(positions: Any) -> None:
    if isinstance(positions, str):
        if positions not in POSITION_CHOICES:
            raise ValueError(
                f"positions must be one of {POSITION_CHOICES}, an int or a slice; got {positions!r}"
            )
        return
    if isinstance(positions, slice):
        for part in (positions.start, positions.stop, positions.step):
            if part is not None and (isinstance(part, bool) or not isinstance(part, int)):
                raise TypeError(f"positions slice bounds must be ints or None, got {positions}")
        if positions.step is not None and positions.step < 1:
            raise ValueError(f"positions slice step must be positive, got {positions.step}")
        return
    if isinstance(positions, bool) or not isinstance(positions, int):
        raise TypeError(
            f"positions must be one of {POSITION_CHOICES}, an int or a slice; "
            f"got {type(positions).__name__}"
        )


def check_positions_fit(positions: Positions, prompt_length: int) -> None:
    """Refuse an int or slice start outside a prompt of ``prompt_length`` tokens."""
    _check_positions(positions)
    index = positions.start if isinstance(positions, slice) else positions
    if isinstance(index, int) and not -prompt_length <= index < prompt_length:
        raise ValueError(
            f"positions={positions!r} does not fit a prompt of {prompt_length} tokens: "
            f"use an index in {-prompt_length}..{prompt_length - 1}, 'prompt', 'generated' or 'all'"
        )


def position_mask(
    positions: Positions, offset: int, length: int, prompt_length: int
) -> Float[Tensor, " length"]:
    """1.0 where absolute positions ``offset .. offset + length - 1`` are steered."""
    pos = torch.arange(offset, offset + length)
    if positions == "all":
        keep = torch.ones(length, dtype=torch.bool)
    elif positions == "prompt":
        keep = pos < prompt_length
    elif positions == "generated":
        keep = pos >= prompt_length
    elif isinstance(positions, slice):
        start = positions.start or 0
        start = start + prompt_length if start < 0 else start
        stop = positions.stop
        if stop is not None and stop < 0:
            stop += prompt_length
        keep = pos >= start
        if stop is not None:
            keep &= pos < stop
        keep &= (pos - start) % (positions.step or 1) == 0
    else:
        assert isinstance(positions, int)
        keep = pos == (positions + prompt_length if positions < 0 else positions)
    return keep.float()


class _SequenceTracker:
    """Where each forward pass sits in its sequence, for position-dependent steering.

    A pass either starts a sequence (no KV cache: every token from position 0) or extends
    one through a cache (offset = tokens seen). A full pass whose first-block input begins
    with the current prompt's is a cache-less generation step: the prompt keeps its length.
    Any other full pass is a new prompt.
    """

    def __init__(self, positions: Positions):
        self.positions = positions
        self.prompt: Tensor | None = None
        self.prompt_length = 0
        self.seen = 0
        self.offset = 0
        self.length = 0
        self._before: tuple[Any, ...] = ()
        self._input: Tensor | None = None

    def _decide(self, cached: bool) -> None:
        x = self._input
        assert x is not None
        n = x.shape[1]
        if cached:
            self.offset, self.seen = self.seen, self.seen + n
            return
        self.offset, self.seen = 0, n
        p = self.prompt
        continues = (
            p is not None
            and p.shape[0] == x.shape[0]
            and n > p.shape[1]
            and torch.allclose(x[:, : p.shape[1]], p, rtol=1e-5, atol=1e-6)
        )
        if not continues:
            check_positions_fit(self.positions, n)
            self.prompt, self.prompt_length = x.detach().clone(), n

    def on_input(self, act: Tensor, hook: Any) -> None:
        self._before = (self.prompt, self.prompt_length, self.seen)
        self._input = act.detach()
        self.length = act.shape[1]
        # Provisional until the attention scores say whether a cache is in use.
        self._decide(cached=self.prompt is not None and act.shape[1] == 1)

    def on_scores(self, scores: Tensor, hook: Any) -> None:
        cached = scores.shape[-1] > scores.shape[-2]
        if cached != (self.offset > 0):
            self.prompt, self.prompt_length, self.seen = self._before
            self._decide(cached)

    def mask(self) -> Tensor:
        return position_mask(self.positions, self.offset, self.length, self.prompt_length)


@dataclass
class Steering:
    """What a ``steer`` block adds: ``scales[i] · vectors[i].direction`` at its hook."""

    vectors: list[SteeringVector]
    scales: list[float]
    positions: Positions


def _vector_list(vectors: SteeringVector | Sequence[SteeringVector]) -> list[SteeringVector]:
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


def _check_vector(adapter: ModelAdapter, vector: SteeringVector) -> str:
    """The vector's hook name, after checking it fits the model."""
    if vector.d_model != adapter.d_model:
        raise ValueError(
            f"{vector.name} has width {vector.d_model} but the model's d_model is "
            f"{adapter.d_model}: it was made for another model"
        )
    return adapter.hook_name(vector.layer, vector.site)


def _check_scale(scale: Any, what: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{what} must be a number, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{what} must be finite, got {scale!r}")
    return float(scale)


def _check_mode(scale_mode: Any, reference: Any) -> None:
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
    """KL(steered ‖ base) in nats between the next-token distributions of two logit sets."""
    log_p = torch.log_softmax(steered.double(), dim=-1)
    log_q = torch.log_softmax(base.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _position_weights(batch: TokenBatch, positions: Positions) -> Tensor:
    """Steering weights of a batch of prompts: ``positions`` per prompt, real tokens only."""
    rows = []
    for length in batch.lengths.tolist():
        check_positions_fit(positions, length)
        row = position_mask(positions, 0, batch.tokens.shape[1], length)
        row[length:] = 0
        rows.append(row)
    return torch.stack(rows)


# The scales a KL search tries, in typical norms of the hook's activation.
KL_SCALE_RANGE = (1 / 256, 64.0)


def kl_scales(
    model: Any,
    prompts: Prompts,
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

    All items are searched together, their candidate scales batched into shared forward
    passes. KL is first evaluated on a geometric grid from 1/256 to 64 times the hook's
    ``typical_norm``; inside the first bracket where it crosses the target, false
    position on log KL against log scale (KL grows like a power of the scale, so this
    converges in a few rounds; the Illinois rule keeps it from stalling) runs until
    |log KL − log target| < ``tol``. ``progress`` shows a tqdm bar of vectors settled.
    """
    adapter = ModelAdapter(model)
    batch = adapter.tokenize(prompts)
    weights = _position_weights(batch, positions)
    checked = []
    for vector, target in items:
        hook = _check_vector(adapter, vector)
        target = _check_scale(target, "kl")
        if target == 0:
            raise ValueError("a KL target must be non-zero (nats; its sign gives the direction)")
        checked.append((hook, vector, target))
    zero = torch.zeros(1, adapter.d_model)
    base: dict[str, Tensor] = {}
    units: dict[tuple[int, str], float] = {}
    for hook, vector, _ in checked:
        if hook not in base:
            base[hook] = steered_logits(adapter, batch, hook, zero)[0]
        key = (vector.layer, vector.site)
        if key not in units:
            units[key] = typical_norm(model, prompts, vector.layer, vector.site)

    def log_kl(points: list[tuple[int, float]]) -> list[float]:
        """log mean KL for (item index, absolute scale) points, batched per hook."""
        out = [0.0] * len(points)
        by_hook: dict[str, list[int]] = {}
        for j, (i, _) in enumerate(points):
            by_hook.setdefault(checked[i][0], []).append(j)
        for hook, members in by_hook.items():
            deltas = torch.stack(
                [
                    points[j][1]
                    * math.copysign(1.0, checked[points[j][0]][2])
                    * checked[points[j][0]][1].direction.double()
                    for j in members
                ]
            )
            logits = steered_logits(adapter, batch, hook, deltas, weights=weights)
            values = kl_divergence(logits, base[hook][None]).mean(dim=1)
            for j, value in zip(members, values.tolist(), strict=True):
                out[j] = math.log(max(value, 1e-300))
        return out

    low, high = KL_SCALE_RANGE
    factors = [low * 4.0**e for e in range(round(math.log(high / low, 4)) + 1)]
    grid = [
        (i, units[(v.layer, v.site)] * f) for i, (_, v, _) in enumerate(checked) for f in factors
    ]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(checked), desc="KL scale search", unit="vector", disable=not progress)
    grid_values = log_kl(grid)
    # Per item: [log a_lo, y_lo, log a_hi, y_hi], y = log KL - log target.
    brackets: list[list[float]] = []
    for i, (_, vector, target) in enumerate(checked):
        goal = math.log(abs(target))
        ys = [grid_values[i * len(factors) + f] - goal for f in range(len(factors))]
        xs = [math.log(grid[i * len(factors) + f][1]) for f in range(len(factors))]
        above = [f for f, y in enumerate(ys) if y >= 0]
        if not above:
            raise ValueError(
                f"steering with {vector.name} never reaches KL {abs(target)} nats up to 64x the "
                f"activation's typical norm ({units[(vector.layer, vector.site)]:.3g}); the "
                f"largest KL was {math.exp(max(ys) + goal):.3g}: choose a smaller KL target"
            )
        f = above[0]
        if f == 0:
            raise ValueError(
                f"steering with {vector.name} already exceeds KL {abs(target)} nats at 1/256 "
                "of the activation's typical norm: choose a larger KL target"
            )
        brackets.append([xs[f - 1], ys[f - 1], xs[f], ys[f]])
    found = [0.0] * len(checked)
    active = list(range(len(checked)))
    kept_side = [0] * len(checked)  # Illinois: which end stayed put last round
    for _ in range(max_rounds):
        bar.update(len(checked) - len(active) - bar.n)
        if not active:
            break
        guesses = []
        for i in active:
            x_lo, y_lo, x_hi, y_hi = brackets[i]
            guesses.append(x_lo - y_lo * (x_hi - x_lo) / (y_hi - y_lo))
        values = log_kl([(i, math.exp(x)) for i, x in zip(active, guesses, strict=True)])
        still = []
        for i, x, lv in zip(active, guesses, values, strict=True):
            y = lv - math.log(abs(checked[i][2]))
            found[i] = x
            if abs(y) < tol:
                continue
            bracket = brackets[i]
            if y < 0:
                bracket[0], bracket[1] = x, y
                if kept_side[i] == 1:
                    bracket[3] /= 2
                kept_side[i] = 1
            else:
                bracket[2], bracket[3] = x, y
                if kept_side[i] == -1:
                    bracket[1] /= 2
                kept_side[i] = -1
            if bracket[2] - bracket[0] < 1e-12:
                continue
            still.append(i)
        active = still
    return [
        math.copysign(math.exp(x), target) for x, (_, _, target) in zip(found, checked, strict=True)
    ]


def kl_scale(
    model: Any,
    prompts: Prompts,
    vector: SteeringVector,
    kl: float,
    *,
    sign: int = 1,
    positions: Positions = "all",
) -> float:
    """The absolute scale a ≥ 0 at which steering with ``sign · a · direction`` gives a
    mean next-token KL(steered ‖ base) of ``kl`` nats at the prompts' last tokens (see
    ``kl_scales``, which searches many vectors at once)."""
    kl = _check_scale(kl, "kl")
    if kl <= 0:
        raise ValueError(f"the KL target must be positive (nats), got {kl}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    return abs(kl_scales(model, prompts, [(vector, sign * kl)], positions=positions)[0])


def resolve_scales(
    model: Any,
    items: Sequence[tuple[SteeringVector, float]],
    *,
    scale_mode: str = "absolute",
    reference: Prompts | None = None,
    positions: Positions = "all",
    progress: bool = False,
) -> list[float]:
    """The signed absolute scale each (vector, scale) means in ``scale_mode`` (see the
    module docstring); KL targets are searched together."""
    _check_mode(scale_mode, reference)
    scales = [_check_scale(scale) for _, scale in items]
    if scale_mode == "absolute":
        return scales
    assert reference is not None
    out = [0.0] * len(items)
    if scale_mode == "relative":
        units: dict[tuple[int, str], float] = {}
        for j, (v, scale) in enumerate(items):
            if scale != 0:
                key = (v.layer, v.site)
                if key not in units:
                    units[key] = typical_norm(model, reference, v.layer, v.site)
                out[j] = scale * units[key]
        return out
    searched = [j for j, scale in enumerate(scales) if scale != 0]
    values = kl_scales(
        model,
        reference,
        [(items[j][0], scales[j]) for j in searched],
        positions=positions,
        progress=progress,
    )
    for j, value in zip(searched, values, strict=True):
        out[j] = value
    return out


@contextmanager
def steer(
    model: Any,
    vectors: SteeringVector | Sequence[SteeringVector],
    scale: float | Sequence[float] = 8.0,
    *,
    positions: Positions = "all",
    scale_mode: str = "absolute",
    reference: Prompts | None = None,
) -> Iterator[Steering]:
    """Add ``scale · direction`` of each vector at its hook inside the ``with`` block.

    Several vectors compose (each with its own scale, or one scale for all). Every forward
    pass in the block is steered, ``model.generate`` included, with or without its KV
    cache; the hooks are removed when the block ends, also on an exception. The block's
    value, a ``Steering``, holds the absolute scales used. ``scale_mode``
    ``"relative"`` and ``"kl"`` measure the model on ``reference`` prompts first (see the
    module docstring).
    """
    adapter = ModelAdapter(model)
    items = _vector_list(vectors)
    hooks = [_check_vector(adapter, v) for v in items]
    given = [scale] * len(items) if not isinstance(scale, Sequence) else list(scale)
    if len(given) != len(items):
        raise ValueError(f"got {len(given)} scales for {len(items)} vectors")
    _check_positions(positions)
    scales = resolve_scales(
        model,
        list(zip(items, given, strict=True)),
        scale_mode=scale_mode,
        reference=reference,
        positions=positions,
    )
    tracker = _SequenceTracker(positions)
    input_hook, scores_hook = adapter.sequence_hooks()
    fwd: list[tuple[str, Callable[..., Any]]] = [(input_hook, tracker.on_input)]
    if scores_hook is not None:
        fwd.append((scores_hook, tracker.on_scores))

    def adder(delta: Tensor) -> Callable[[Tensor, Any], Tensor]:
        def add(act: Tensor, hook: Any) -> Tensor:
            weight = tracker.mask().to(act.device, act.dtype)
            return act + weight[:, None] * delta.to(act.device, act.dtype)

        return add

    fwd += [
        (hook, adder(a * v.direction.double()))
        for hook, v, a in zip(hooks, items, scales, strict=True)
    ]
    with adapter.hooks(fwd):
        yield Steering(items, scales, positions)


def _scale_list(scales: float | Sequence[float]) -> list[float]:
    values = [scales] if not isinstance(scales, Sequence) else list(scales)
    if not values:
        raise ValueError("scales is empty: give at least one scale")
    for value in values:
        if _check_scale(value) < 0:
            raise ValueError(f"scales must be non-negative (signs gives the sign), got {value}")
    return [float(value) for value in values]


def _check_signs(signs: Sequence[int]) -> list[int]:
    values = list(signs)
    if not values or any(s not in (1, -1) for s in values):
        raise ValueError(f"signs must be a non-empty list of +1 and -1, got {signs!r}")
    return values


def _check_new_tokens(max_new_tokens: Any) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    return max_new_tokens


def _scale_plan(
    model: Any,
    vectors: list[SteeringVector],
    signs: list[int],
    scales: list[float],
    **resolve: Any,
) -> list[tuple[SteeringVector, int, float, float]]:
    """(vector, sign, scale, signed absolute scale) for every vector × sign × scale."""
    combos = [(v, sign, s) for v in vectors for sign in signs for s in scales]
    amounts = resolve_scales(model, [(v, sign * s) for v, sign, s in combos], **resolve)
    return [(v, sign, s, a) for (v, sign, s), a in zip(combos, amounts, strict=True)]


def generate_steered(
    model: Any,
    prompt: str | Tensor,
    vectors: SteeringVector | Sequence[SteeringVector],
    scales: float | Sequence[float],
    *,
    signs: Sequence[int] = (1, -1),
    scale_mode: str = "absolute",
    positions: Positions = "all",
    max_new_tokens: int = 30,
    greedy: bool = True,
    seed: int = 0,
    use_cache: bool = True,
    reference: Prompts | None = None,
    progress: bool = True,
) -> Any:
    """Generations for every vector × sign × scale, plus the unsteered baseline.

    Returns a pandas DataFrame with columns ``vector, method, layer, site, sign, scale,
    absolute_scale, text`` (``text`` is the continuation only); the baseline row has
    vector ``"baseline"`` and sign 0. ``scale`` is in ``scale_mode`` units, measured for
    ``"relative"`` and ``"kl"`` on ``reference`` (default: the prompt itself). Sampling (``greedy=False``) restarts
    from ``seed`` for every row, without touching the global RNG. Every greedy row is
    checked by one teacher-forced pass against the model's own cache-free choices, and a
    ``RuntimeError`` names the token and the versions where they differ (a broken KV cache). ``progress`` shows tqdm
    bars for the KL scale search and the generations.
    """

    adapter = ModelAdapter(model)
    items = _vector_list(vectors)
    for v in items:
        _check_vector(adapter, v)
    scale_list, sign_list = _scale_list(scales), _check_signs(signs)
    _check_positions(positions)
    _check_new_tokens(max_new_tokens)
    if isinstance(prompt, str) or (isinstance(prompt, Tensor) and prompt.ndim == 1):
        batch = adapter.tokenize(prompt)
    else:
        raise TypeError("generate_steered takes one prompt: a string or a 1-D token tensor")
    check_positions_fit(positions, int(batch.lengths[0]))
    tokens = batch.tokens
    if reference is None:
        reference = batch.texts if batch.texts is not None else tokens
    _check_mode(scale_mode, reference)

    rows = _scale_plan(
        model, items, sign_list, scale_list, scale_mode=scale_mode, reference=reference,
        positions=positions, progress=progress,
    )  # fmt: skip
    return generations(
        model, tokens, rows, positions=positions, max_new_tokens=max_new_tokens,
        greedy=greedy, seed=seed, use_cache=use_cache, progress=progress,
    )  # fmt: skip


def check_greedy_continuation(
    adapter: ModelAdapter, out: Tensor, prompt_length: int, *, use_cache: bool = True
) -> None:
    """Refuse a greedy generation that is not the model's own cache-free continuation.

    A faulty KV cache (as in transformers 5.24.0 under TransformerLens 4.3) gives wrong
    text with no error; one teacher-forced pass finds it (see
    ``ModelAdapter.greedy_mismatch``).
    """
    found = adapter.greedy_mismatch(out, prompt_length)
    if found is None:
        return
    i, got, best = found
    versions = versions_line(("transformers", "transformer-lens"))
    cause = (
        f"The KV cache of this environment is broken ({versions}): {KV_CACHE_FIX}."
        if use_cache
        else f"Generation without the cache disagrees with the forward pass ({versions}): "
        "please report it with the output of `tl-powersteer doctor`."
    )
    raise RuntimeError(
        f"generation went wrong at token {i} of the continuation: it produced "
        f"{adapter.decode(out.new_tensor([got]))!r} where the model's own forward pass picks "
        f"{adapter.decode(out.new_tensor([best]))!r}. {cause} "
        "`tl-powersteer doctor` checks the environment."
    )


def generations(
    model: Any,
    tokens: Tensor,
    plan: Sequence[tuple[SteeringVector, int, float, float]],
    *,
    positions: Positions = "all",
    max_new_tokens: int = 30,
    greedy: bool = True,
    seed: int = 0,
    use_cache: bool = True,
    progress: bool = True,
) -> Any:
    """The baseline and one generation per (vector, sign, scale, signed absolute scale)
    of ``plan``, from prompt ``tokens`` ``[1, seq]``, as ``generate_steered``'s table."""
    import pandas as pd
    from tqdm.auto import tqdm

    adapter = ModelAdapter(model)

    def run(steering: list[tuple[SteeringVector, float]]) -> str:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vs, amounts = [v for v, _ in steering], [a for _, a in steering]
            with steer(model, vs, amounts, positions=positions) if steering else nullcontext():
                out = adapter.generate(
                    tokens, max_new_tokens=max_new_tokens, greedy=greedy, use_cache=use_cache
                )
                if greedy:
                    check_greedy_continuation(adapter, out, tokens.shape[1], use_cache=use_cache)
        return adapter.decode(out[0, tokens.shape[1] :])

    rows = [
        {
            "vector": "baseline",
            "method": "none",
            "layer": -1,
            "site": "",
            "sign": 0,
            "scale": 0.0,
            "absolute_scale": 0.0,
            "text": run([]),
        }
    ]
    for v, sign, s, a in tqdm(plan, desc="generations", unit="row", disable=not progress):
        rows.append(
            {
                "vector": v.name,
                "method": v.method,
                "layer": v.layer,
                "site": v.site,
                "sign": sign,
                "scale": s,
                "absolute_scale": abs(a),
                "text": run([(v, a)]),
            }
        )
    return pd.DataFrame(rows)
