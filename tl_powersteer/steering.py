"""Applying steering vectors: the ``steer`` context manager and steered generation.

``steer`` adds ``a · direction`` of each ``SteeringVector`` to its hook's activation at
the chosen token positions (see ``tl_powersteer.positions``), where the absolute scale
``a`` comes from a scale mode (see ``tl_powersteer.scales``). Singular vectors have no
natural sign, so ``generate_steered`` tries both. Power Steering itself, which finds the
vectors, is ``tl_powersteer.power_steering``.

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

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import positions as positions_module
from . import scales as scales_module
from . import vectors as vectors_module
from .adapters import Model, ModelAdapter, Prompts
from .checks import check_seed, is_int, plain_ints
from .positions import Positions, SequenceTracker, check_positions, check_positions_fit
from .scales import check_mode, check_scales, check_signs, resolve_scales, scale_plan
from .vectors import SteeringVector, check_vector, vector_list
from .version import KV_CACHE_FIX, versions_line

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Steering",
    "batch_generations",
    "check_greedy_continuation",
    "check_new_tokens",
    "generate_steered",
    "generations",
    "steer",
]


@dataclass
class Steering:
    """What a ``steer`` block adds: ``scales[i] · vectors[i].direction`` at its hook."""

    vectors: list[SteeringVector]
    scales: list[float]
    positions: Positions


@contextmanager
@plain_ints
def steer(
    model: Model | ModelAdapter,
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
    adapter = ModelAdapter.of(model)
    items = vector_list(vectors)
    hooks = [check_vector(adapter, v) for v in items]
    given = [scale] * len(items) if not isinstance(scale, Sequence) else list(scale)
    if len(given) != len(items):
        raise ValueError(f"got {len(given)} scales for {len(items)} vectors")
    check_positions(positions)
    scales = resolve_scales(
        adapter,
        list(zip(items, given, strict=True)),
        scale_mode=scale_mode,
        reference=reference,
        positions=positions,
    )
    tracker = SequenceTracker(positions)
    input_hook, scores_hook = adapter.sequence_hooks()
    fwd: list[tuple[str, Callable[..., Any]]] = [(input_hook, tracker.on_input)]
    if scores_hook is not None:
        fwd.append((scores_hook, tracker.on_scores))

    listing = [False]  # while the error lists the usable sites, with a pass of its own

    def adder(delta: Tensor, name: str) -> Callable[[Tensor, Any], Tensor]:
        def add(act: Tensor, hook: Any) -> Tensor:
            if listing[0]:
                return act
            if act.ndim != 3 or act.shape[-1] != adapter.d_model:
                listing[0] = True
                try:
                    probe = torch.zeros(1, 2, dtype=torch.long, device=adapter.device)
                    error = adapter.not_residual(name, tuple(act.shape), probe)
                finally:
                    listing[0] = False
                raise error
            weight = tracker.mask().to(act.device, act.dtype)
            return act + weight[:, None] * delta.to(act.device, act.dtype)

        return add

    fwd += [
        (hook, adder(a * v.direction.double(), hook))
        for hook, v, a in zip(hooks, items, scales, strict=True)
    ]
    with adapter.hooks(fwd):
        yield Steering(items, scales, positions)


def check_new_tokens(max_new_tokens: Any) -> int:
    if not is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    return max_new_tokens


@plain_ints
def generate_steered(
    model: Model | ModelAdapter,
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
) -> pd.DataFrame:
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

    adapter = ModelAdapter.of(model)
    items = vector_list(vectors)
    for v in items:
        check_vector(adapter, v)
    scale_list, sign_list = check_scales(scales), check_signs(signs)
    check_seed(seed)
    check_positions(positions)
    check_new_tokens(max_new_tokens)
    if isinstance(prompt, str) or (isinstance(prompt, Tensor) and prompt.ndim == 1):
        batch = adapter.tokenize(prompt)
    else:
        raise TypeError("generate_steered takes one prompt: a string or a 1-D token tensor")
    check_positions_fit(positions, int(batch.lengths[0]))
    tokens = batch.tokens
    if reference is None:
        reference = batch.texts if batch.texts is not None else tokens
    check_mode(scale_mode, reference)

    rows = scale_plan(
        adapter, items, sign_list, scale_list, scale_mode=scale_mode, reference=reference,
        positions=positions, progress=progress,
    )  # fmt: skip
    return generations(
        adapter, tokens, rows, positions=positions, max_new_tokens=max_new_tokens,
        greedy=greedy, seed=seed, use_cache=use_cache, progress=progress,
    )  # fmt: skip


def check_greedy_continuation(
    adapter: ModelAdapter,
    out: Tensor,
    prompt_length: int,
    *,
    use_cache: bool = True,
    rows: Sequence[int] | None = None,
) -> None:
    """Refuse a greedy generation that is not the model's own cache-free continuation.

    A faulty KV cache (as in transformers 5.24.0 under TransformerLens 4.3) gives wrong
    text with no error; one teacher-forced pass finds it (see
    ``ModelAdapter.greedy_mismatches``). ``out`` may hold several rows generated together,
    named in the message as ``rows`` numbers them.
    """
    for row, found in enumerate(adapter.greedy_mismatches(out, prompt_length)):
        if found is None:
            continue
        i, got, best = found
        versions = versions_line(("transformers", "transformer-lens"))
        cause = (
            f"The KV cache of this environment is broken ({versions}): {KV_CACHE_FIX}."
            if use_cache
            else f"Generation without the cache disagrees with the forward pass ({versions}): "
            "please report it with the output of `tl-powersteer doctor`."
        )
        where = f" of row {row if rows is None else rows[row]}" if out.shape[0] > 1 else ""
        raise RuntimeError(
            f"generation went wrong at token {i} of the continuation{where}: it produced "
            f"{adapter.decode(out.new_tensor([got]))!r} where the model's own forward pass picks "
            f"{adapter.decode(out.new_tensor([best]))!r}. {cause} "
            "`tl-powersteer doctor` checks the environment."
        )


def batch_generations(
    model: Model | ModelAdapter,
    tokens: Int[Tensor, "1 seq"],
    hook: str,
    deltas: Float[Tensor, "m d_model"],
    *,
    max_new_tokens: int,
    chunk: int = 256,
) -> list[str]:
    """Greedy continuations of one prompt, one per delta added at ``hook`` on every token
    (the prompt's and each generated one), ``chunk`` rows generated together: each step
    reads the whole unembedding, which a large vocabulary makes the largest weight, so
    more rows per step cost less each.

    Row i is the text ``generate_steered`` gives for a vector along ``deltas[i]`` at scale
    ‖deltas[i]‖ with ``positions="all"``, and ends at the end-of-sequence token, as a
    generation of its own would. The first and last row of each chunk are checked against
    the model's own cache-free choice, as ``generate_steered`` checks its rows.
    """
    adapter = ModelAdapter.of(model)
    check_new_tokens(max_new_tokens)
    n = tokens.shape[1]
    tokens = tokens.to(adapter.device)
    active = [deltas[:0]]

    def add(act: Tensor, hook: Any) -> Tensor:
        return act + active[0].to(act.device, act.dtype)[:, None, :]

    texts: list[str] = []
    eos = adapter.eos_token_id
    with adapter.hooks([(hook, add)]):
        for start in range(0, deltas.shape[0], chunk):
            rows = deltas[start : start + chunk]
            active[0] = rows
            out = adapter.generate(
                tokens.expand(rows.shape[0], -1), max_new_tokens=max_new_tokens, greedy=True
            )
            # The rows of a chunk share one code path (one prompt, no padding), so a broken
            # cache shows in any of them: checking the first and last costs a pass of two
            # rows instead of a pass as large as the generation itself.
            ends = [0, rows.shape[0] - 1] if rows.shape[0] > 1 else [0]
            active[0] = rows[ends]
            check_greedy_continuation(adapter, out[ends], n, rows=[start + i for i in ends])
            for row in out[:, n:]:
                if eos is not None and bool((row == eos).any()):
                    row = row[: int((row == eos).nonzero()[0, 0]) + 1]
                texts.append(adapter.decode(row))
    return texts


def generations(
    model: Model | ModelAdapter,
    tokens: Tensor,
    plan: Sequence[tuple[SteeringVector, int, float, float]],
    *,
    positions: Positions = "all",
    max_new_tokens: int = 30,
    greedy: bool = True,
    seed: int = 0,
    use_cache: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """The baseline and one generation per (vector, sign, scale, signed absolute scale)
    of ``plan``, from prompt ``tokens`` ``[1, seq]``, as ``generate_steered``'s table."""
    import pandas as pd
    from tqdm.auto import tqdm

    adapter = ModelAdapter.of(model)

    def run(steering: list[tuple[SteeringVector, float]]) -> str:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vs, amounts = [v for v, _ in steering], [a for _, a in steering]
            with steer(adapter, vs, amounts, positions=positions) if steering else nullcontext():
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


# Names this module held before it was split; importing them from here keeps working for
# one release.
_MOVED = {
    name: module
    for module in (vectors_module, positions_module, scales_module)
    for name in module.__all__
}


def __getattr__(name: str) -> Any:
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"tl_powersteer.steering.{name} moved to {home.__name__}.{name}: import it from "
        "there (the old path goes in the next release)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(home, name)
