"""The effect map: every atlas pair's top vectors measured at matched KL, both signs,
against random directions at the same source hook and the same KL.

σ says how strongly a target reacts to a direction, not whether the reaction is the one
a user cares about. ``atlas_effects`` asks the behavioural question of every pair at
once: each vector and sign is scaled until the next-token KL(steered ‖ base) at the
prompts' last tokens is ``kl`` nats, and the change of a logit difference between two
answers is read there. Random unit directions at each source, scaled to the same KL,
say what any disruption of that size does; a pair whose best vector does no more than
the best random one is inactive for this fork, however large its σ.

The numbers are those of ``rank_vectors(model, prompts, vectors, holdout=None)`` on the
same vectors and controls, computed in a fraction of its passes:

* every row of one source layer (its pairs' vectors, both signs, and its controls) is
  searched together by ``kl_search``, batched into shared passes;
* the blocks before the source run once per source layer (``steered_runs``): each pass
  computes only the blocks after the source's (the default ``hook_mlp_out`` is a block's
  last addition to the residual stream, so the delta is added at the next block's
  input), and only the last tokens' logits;
* the KL is reduced one slice of the vocabulary at a time as the unembedding makes it
  (``SteeredRun.kl``), so the logits of all 262k tokens are never written out;
* the logit difference is read from the same pass as the KL that fixes the scale, so
  nothing is run twice.

The search stops within ``tol`` of log KL; the default 1e-3 (0.1% of the KL) moves an
effect by about 0.05%, well inside the spread between vectors, and takes about a
tenth fewer passes than ``kl_scales``' 1e-4 (``docs/concepts/scales.md``).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .adapters import Model, ModelAdapter, Prompts, decode_token, steered_logits, steered_runs
from .atlas import SensitivityAtlas
from .atlas.effects import check_atlas_model
from .checks import check_seed, is_int, is_number, plain_ints
from .effects import check_metric
from .io import check_destination, check_shapes, register, resumable, save
from .positions import position_weights
from .power_steering import power_steering_name
from .scales import KL_PROBE_FRACTION, KL_SCALE_RANGE, kl_search, typical_norms
from .steering import batch_generations
from .vectors import SteeringVector, random_vectors

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["AtlasEffects", "atlas_effects", "generation_key"]

SIGNS = (1, -1)
# Sequences per forward pass: larger passes amortise the per-pass cost of the unembedding
# and the hooks, and only the last tokens' logits are kept.
_SEQUENCES_PER_PASS = 128


def _check_loaded(result: AtlasEffects) -> None:
    n, top, controls = result.effects.shape[0], result.top, result.controls
    shapes = {
        "effects": (n, n, top, 2),
        "scales": (n, n, top, 2),
        "kls": (n, n, top, 2),
        "matched": (n, n, top, 2),
        "control_effects": (n, controls, 2),
        "control_scales": (n, controls, 2),
        "control_kls": (n, controls, 2),
        "control_matched": (n, controls, 2),
        "source_norms": (n,),
    }
    check_shapes(result, shapes, "the effect map's")


@register(check=_check_loaded)
@dataclass
class AtlasEffects:
    """Effects of an atlas's top vectors at matched KL, with random controls per source.

    Per pair (source, target), vector rank and sign (+, −): the absolute scale that
    reached the KL, the KL reached, whether it is within ``tol`` of the budget
    (``matched``) and the effect, the mean change of logit(A) − logit(B) over the
    prompts. The same per source, control and sign for the random directions
    (``random_vectors(d_model, source, site, controls, seed=seed)``, as ``rank_vectors``
    makes them). Entries of sources not yet computed are NaN (False for ``matched``).
    """

    effects: Float[Tensor, "n_layers n_layers top 2"]
    scales: Float[Tensor, "n_layers n_layers top 2"]
    kls: Float[Tensor, "n_layers n_layers top 2"]
    matched: Bool[Tensor, "n_layers n_layers top 2"]
    control_effects: Float[Tensor, "n_layers controls 2"]
    control_scales: Float[Tensor, "n_layers controls 2"]
    control_kls: Float[Tensor, "n_layers controls 2"]
    control_matched: Bool[Tensor, "n_layers controls 2"]
    source_norms: Float[Tensor, " n_layers"]
    singular_values: Float[Tensor, "n_layers n_layers top"]
    baseline: float
    kl: float
    answers: list[str]
    answer_ids: list[int]
    top: int
    controls: int
    seed: int
    tol: float
    sources: list[int]
    targets: list[int]
    source_site: str
    model_name: str
    weights_fingerprint: str
    prompts: list[str] | None
    tokens: Tensor | None = None
    # Per computed source, a hash of the atlas vectors it measured: a checkpoint resumes
    # only for an atlas with the same vectors.
    vector_digests: dict[str, str] = field(default_factory=dict)
    completed_sources: list[int] = field(default_factory=list)
    # Greedy continuations of the first prompt at each row's scale (``generation_key``),
    # and unsteered under "baseline"; ``generated_tokens`` 0 means none were made.
    generated_tokens: int = 0
    generations: dict[str, str] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.effects.shape[0])

    def pairs(self) -> list[tuple[int, int]]:
        """The (source, target) pairs measured so far, source-major."""
        done = set(self.completed_sources)
        return [(s, t) for s in self.sources if s in done for t in self.targets if t > s]

    def _random_level(self, s: int) -> tuple[float, float]:
        """Mean and largest |effect| of source ``s``'s matched controls (NaN if none)."""
        values = self.control_effects[s][self.control_matched[s]].abs()
        if not len(values):
            return math.nan, math.nan
        return float(values.mean()), float(values.max())

    def to_pandas(self) -> pd.DataFrame:
        """One row per pair: the best matched vector and sign and its effect against the
        source's random controls.

        Columns: ``source, target, sigma`` (σ₁), ``best_effect`` (signed, the largest |effect|
        over the top vectors and both signs), ``rank, sign, scale, relative_scale`` (scale ÷
        the source's typical norm), ``kl``, ``random_mean`` and ``random_max`` (mean and
        largest |effect| of the controls, both signs), ``ratio = |best_effect| /
        random_mean`` and ``beats_random`` (|best_effect| > random_max: the best of 2·top
        tries against the best of 2·controls, so that choosing the maximum favours
        neither). A pair with no matched vector has NaN effects.
        """
        import pandas as pd

        rows = []
        for s, t in self.pairs():
            mean, largest = self._random_level(s)
            size = self.effects[s, t].abs().masked_fill(~self.matched[s, t], -1.0)
            rank, sign = divmod(int(size.argmax()), 2)
            found = bool(self.matched[s, t, rank, sign])
            best = float(self.effects[s, t, rank, sign]) if found else math.nan
            scale = float(self.scales[s, t, rank, sign]) if found else math.nan
            rows.append(
                {
                    "source": s,
                    "target": t,
                    "sigma": float(self.singular_values[s, t, 0]),
                    "best_effect": best,
                    "rank": rank if found else -1,
                    "sign": SIGNS[sign] if found else 0,
                    "scale": scale,
                    "relative_scale": scale / float(self.source_norms[s]),
                    "kl": float(self.kls[s, t, rank, sign]) if found else math.nan,
                    "random_mean": mean,
                    "random_max": largest,
                    "ratio": abs(best) / mean if mean > 0 else math.nan,
                    "beats_random": bool(abs(best) > largest) if found else False,
                }
            )
        return pd.DataFrame(rows, columns=_PAIR_COLUMNS)

    def vectors(self) -> pd.DataFrame:
        """One row per pair, vector rank and sign: ``source, target, rank, sigma, sign,
        scale, relative_scale, kl, matched, effect``."""
        import pandas as pd

        rows = []
        for s, t in self.pairs():
            for rank in range(self.top):
                for j in range(len(SIGNS)):
                    rows.append(
                        {
                            "source": s,
                            "target": t,
                            "rank": rank,
                            "sigma": float(self.singular_values[s, t, rank]),
                            **self._row(
                                s,
                                j,
                                self.scales[s, t, rank],
                                self.kls[s, t, rank],
                                self.matched[s, t, rank],
                                self.effects[s, t, rank],
                            ),
                        }
                    )
        return pd.DataFrame(rows)

    def controls_table(self) -> pd.DataFrame:
        """One row per source, random control and sign: ``source, control, sign, scale,
        relative_scale, kl, matched, effect``."""
        import pandas as pd

        rows = []
        for s in self.sources:
            if s not in self.completed_sources:
                continue
            for c in range(self.controls):
                for j in range(len(SIGNS)):
                    rows.append(
                        {
                            "source": s,
                            "control": c,
                            **self._row(
                                s,
                                j,
                                self.control_scales[s, c],
                                self.control_kls[s, c],
                                self.control_matched[s, c],
                                self.control_effects[s, c],
                            ),
                        }
                    )
        return pd.DataFrame(rows)

    def _row(
        self, s: int, j: int, scale: Tensor, kl: Tensor, matched: Tensor, value: Tensor
    ) -> dict[str, Any]:
        """The sign ``SIGNS[j]`` of one vector's (scale, kl, matched, effect) pairs."""
        return {
            "sign": SIGNS[j],
            "scale": float(scale[j]),
            "relative_scale": float(scale[j]) / float(self.source_norms[s]),
            "kl": float(kl[j]),
            "matched": bool(matched[j]),
            "effect": float(value[j]),
        }

    def ranking(self) -> pd.DataFrame:
        """Every vector and control with its better sign, sorted by |effect|, in
        ``rank_vectors``' columns (``vector, method, layer, site, sign, absolute_scale,
        kl, effect, abs_effect``) plus ``target, rank`` (−1 for controls) and
        ``matched``. Vectors are named as ``SensitivityAtlas.steering_vectors`` and
        ``random_vectors`` name them."""
        import pandas as pd

        rows = []

        def add(name: str, method: str, s: int, t: int, rank: int, e: Tensor, a: Tensor,
                k: Tensor, m: Tensor) -> None:  # fmt: skip
            # rank_vectors' rule: the sign with the larger |effect| (the first on a tie).
            j = 0 if abs(float(e[0])) >= abs(float(e[1])) else 1
            rows.append(
                {
                    "vector": name,
                    "method": method,
                    "layer": s,
                    "site": self.source_site,
                    "sign": SIGNS[j],
                    "absolute_scale": float(a[j]),
                    "kl": float(k[j]),
                    "effect": float(e[j]),
                    "abs_effect": abs(float(e[j])),
                    "target": t,
                    "rank": rank,
                    "matched": bool(m[j]),
                }
            )

        for s, t in self.pairs():
            for r in range(self.top):
                add(power_steering_name(s, t, r), "power_steering", s, t, r, self.effects[s, t, r],
                    self.scales[s, t, r], self.kls[s, t, r], self.matched[s, t, r])  # fmt: skip
        for s in self.completed_sources:
            for c in range(self.controls):
                add(f"random#{c} L{s}", "random", s, -1, -1, self.control_effects[s, c],
                    self.control_scales[s, c], self.control_kls[s, c],
                    self.control_matched[s, c])  # fmt: skip
        table = pd.DataFrame(rows)
        return table.sort_values("abs_effect", ascending=False, ignore_index=True, kind="stable")

    def settings(self) -> dict[str, Any]:
        """What this map was measured with; a checkpoint resumes only with the same."""
        return {
            "n_layers": self.n_layers,
            "kl": self.kl,
            "answer_ids": self.answer_ids,
            "top": self.top,
            "controls": self.controls,
            "seed": self.seed,
            "tol": self.tol,
            "sources": self.sources,
            "targets": self.targets,
            "source_site": self.source_site,
            "model_name": self.model_name,
            "weights_fingerprint": self.weights_fingerprint,
            "prompts": self.prompts,
            "tokens": None if self.tokens is None else self.tokens.tolist(),
            "generated_tokens": self.generated_tokens,
        }

    def generation(self, source: int, target: int | None, rank: int, sign: int) -> str | None:
        """The greedy continuation of the first prompt with vector ``rank`` of pair
        (``source``, ``target``) (or, with ``target`` None, random control ``rank`` of the
        source) added with ``sign`` at its matched scale; None where none was generated."""
        return self.generations.get(generation_key(source, target, rank, sign))

    def __repr__(self) -> str:
        pairs = self.pairs()
        text = (
            f"AtlasEffects(model={self.model_name!r}, {len(pairs)} pairs measured, "
            f"top {self.top}, {self.controls} controls per source, KL {self.kl:g} nats, "
            f"answers {self.answers!r}"
        )
        if pairs:
            table = self.to_pandas()
            text += f", {int(table['beats_random'].sum())} beat the random controls"
        return text + ")"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.safetensors`` file (tensors, plus JSON metadata in its header)."""
        save(self, path)


_PAIR_COLUMNS = [
    "source", "target", "sigma", "best_effect", "rank", "sign", "scale", "relative_scale",
    "kl", "random_mean", "random_max", "ratio", "beats_random",
]  # fmt: skip


def generation_key(source: int, target: int | None, rank: int, sign: int) -> str:
    """The key of a row's text in ``AtlasEffects.generations``: ``"s,t,rank,+"`` for a
    pair's vector, ``"s,random,c,-"`` for a control."""
    if sign not in SIGNS:
        raise ValueError(f"sign must be 1 or -1, got {sign!r}")
    where = "random" if target is None else str(target)
    return f"{source},{where},{rank},{'+' if sign == 1 else '-'}"


def _vector_digest(atlas: SensitivityAtlas, s: int, top: int) -> str:
    later = [t for t in atlas.targets if t > s]
    block = atlas.right_vectors[s, later, :top].detach().cpu().contiguous()
    return hashlib.sha256(block.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _resumed(fresh: AtlasEffects, path: Path) -> AtlasEffects:
    """The checkpoint at ``path``, if it was measured with the settings of ``fresh``."""
    saved: AtlasEffects = resumable(fresh, path, "an effect map")
    changed = [
        s for s in saved.completed_sources
        if saved.vector_digests.get(str(s)) != fresh.vector_digests.get(str(s))
    ]  # fmt: skip
    if changed:
        raise ValueError(
            f"the checkpoint {str(path)!r} measured other vectors at source layers {changed} "
            "than this atlas has: it belongs to another atlas; use another checkpoint path"
        )
    return saved


@plain_ints
def atlas_effects(
    model: Model | ModelAdapter,
    atlas: SensitivityAtlas,
    prompts: Prompts | None = None,
    *,
    answers: Sequence[str | int],
    metric: str = "logit_diff",
    kl: float = 0.5,
    top: int | None = None,
    controls: int = 4,
    seed: int = 0,
    tol: float = 1e-3,
    generate: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> AtlasEffects:
    """Measure every computed pair's top vectors, both signs, at ``kl`` nats of
    next-token KL, against ``controls`` random directions per source at the same KL.

    Args:
        model: the model the atlas was computed on.
        atlas: a ``SensitivityAtlas``; its completed source layers are measured.
        prompts: where to measure (default: the atlas's own prompts or tokens). The KL is
            the mean over prompts at each one's last token, the steering added at every
            real token, as ``kl_scales`` does.
        answers: two single tokens (A, B); the effect is the mean change of
            logit(A) − logit(B) at the last token.
        metric: ``"logit_diff"``, the one metric read from the passes that fix the scales.
        kl: the budget in nats every vector, sign and control is scaled to.
        top: how many of each pair's vectors (1 ≤ top ≤ atlas.k; default 4, or all of
            them if the atlas has fewer): past the first few, vectors sit in near-flat
            bands of σ and are not reproducible one by one.
        controls: random unit directions per source (≥ 1), seeds as ``random_vectors``.
        seed: the controls' seed.
        tol: the search stops within ``tol`` of log ``kl``; rows that cannot get there
            (KL saturates below the budget, or exceeds it at the smallest scale) are
            kept with ``matched`` False and left out of the best effects and the random
            level.
        generate: new tokens of greedy generation from the first prompt for every row
            (each vector and sign, and each control) at its scale, and once unsteered,
            for reading beside the numbers (``generation``); 0 generates nothing.
        checkpoint: a ``.safetensors`` path; the map is written there after each source
            layer (atomically), and a run with the same arguments resumes from it.
        progress: a tqdm bar of pairs measured.

    Returns:
        An ``AtlasEffects``; ``to_pandas()`` gives one row per pair, ``vectors()`` one per
        vector and sign, ``ranking()`` the table ``rank_vectors`` would give.
    """
    adapter = ModelAdapter.of(model)
    check_atlas_model(adapter, atlas)
    if metric != "logit_diff":
        raise ValueError(
            f"metric must be 'logit_diff' (read from the same passes that fix each scale), "
            f"got {metric!r}; measure other metrics on chosen vectors with rank_vectors"
        )
    checked = check_metric(adapter, metric, answers, None, 1)
    assert checked.answers is not None
    if not is_number(kl) or not 0 < kl < math.inf:
        raise ValueError(f"kl must be a positive number of nats (e.g. 0.5), got {kl!r}")
    if top is None:
        top = min(4, atlas.k)
    if not is_int(top) or not 1 <= top <= atlas.k:
        raise ValueError(f"top must be an int between 1 and the atlas's k = {atlas.k}, got {top!r}")
    if not is_int(controls) or controls < 1:
        raise ValueError(
            f"controls must be a positive int (random directions per source), got {controls!r}"
        )
    check_seed(seed)
    if not is_int(generate) or generate < 0:
        raise ValueError(
            f"generate must be a number of new tokens (0 for no generations), got {generate!r}"
        )
    if not is_number(tol) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number between 0 and 1 (in log KL), got {tol!r}")
    if not atlas.completed_sources:
        raise ValueError("the atlas has no computed source layer yet: compute it first")
    if prompts is None:
        prompts = atlas.prompts if atlas.prompts is not None else atlas.tokens
        if prompts is None:
            raise ValueError("the atlas records no prompts or tokens: pass prompts=")
    batch = adapter.tokenize(prompts)
    weights = position_weights(batch, "all")
    path = (
        None if checkpoint is None else check_destination(checkpoint, ".safetensors", "checkpoint")
    )

    n = atlas.n_layers
    sources = [s for s in atlas.sources if s in atlas.completed_sources]
    hooks = [adapter.hook_name(s, atlas.source_site) for s in sources]
    nan = functools.partial(torch.full, fill_value=math.nan, dtype=torch.float64)
    no = functools.partial(torch.zeros, dtype=torch.bool)
    result = AtlasEffects(
        effects=nan((n, n, top, 2)), scales=nan((n, n, top, 2)), kls=nan((n, n, top, 2)),
        matched=no((n, n, top, 2)), control_effects=nan((n, controls, 2)),
        control_scales=nan((n, controls, 2)), control_kls=nan((n, controls, 2)),
        control_matched=no((n, controls, 2)), source_norms=nan((n,)),
        singular_values=atlas.singular_values[..., :top].double().clone(), baseline=math.nan,
        kl=float(kl), answers=[decode_token(adapter.model, i) for i in checked.answers],
        answer_ids=list(checked.answers), top=top, controls=controls, seed=seed,
        tol=float(tol), sources=sources, targets=list(atlas.targets),
        source_site=atlas.source_site, model_name=atlas.model_name,
        weights_fingerprint=atlas.weights_fingerprint or adapter.weights_fingerprint(),
        prompts=list(prompts) if batch.texts is not None else None,
        tokens=None if batch.texts is not None else batch.tokens.clone(),
        vector_digests={str(s): _vector_digest(atlas, s, top) for s in sources},
        generated_tokens=generate,
    )  # fmt: skip
    if path is not None and path.exists():
        result = _resumed(result, path)

    a, b = checked.answers
    zero = torch.zeros(1, adapter.d_model, dtype=torch.float64)
    base = steered_logits(adapter, batch, hooks[0], zero, weights=weights)[0]
    result.baseline = float((base[:, a] - base[:, b]).double().mean())
    units = typical_norms(adapter, batch, hooks)
    todo = [s for s in sources if s not in result.completed_sources]
    # Generations continue the first prompt alone: one text per row, read beside its numbers.
    first = batch.tokens[:1, : int(batch.lengths[0])]
    if generate and "baseline" not in result.generations:
        zero_delta = torch.zeros(1, adapter.d_model, dtype=torch.float64)
        (result.generations["baseline"],) = batch_generations(
            adapter, first, hooks[0], zero_delta, max_new_tokens=generate
        )
    later = {s: [t for t in atlas.targets if t > s] for s in sources}
    from tqdm.auto import tqdm

    with tqdm(
        total=sum(len(later[s]) for s in sources), desc="effect map", unit="pair",
        disable=not progress,
    ) as bar:  # fmt: skip
        bar.update(sum(len(later[s]) for s in result.completed_sources))
        for s in todo:
            bar.set_postfix_str(f"source L{s}")
            unit = float(units[sources.index(s)])
            vectors = atlas.steering_vectors([(s, t) for t in later[s]], top=top)
            vectors += random_vectors(adapter.d_model, s, atlas.source_site, controls, seed=seed)
            deltas = _measure_source(
                adapter, batch, weights, result, s, unit, vectors, base, later[s]
            )
            if generate:
                bar.set_postfix_str(f"source L{s}, generating")
                texts = batch_generations(
                    adapter, first, adapter.hook_name(s, atlas.source_site), deltas,
                    max_new_tokens=generate,
                )  # fmt: skip
                keys = [generation_key(s, t, r, sign) for t in later[s] for r in range(top)
                        for sign in SIGNS]  # fmt: skip
                keys += [generation_key(s, None, c, sign) for c in range(controls)
                         for sign in SIGNS]  # fmt: skip
                result.generations.update(zip(keys, texts, strict=True))
            result.completed_sources.append(s)
            if path is not None:
                result.save(path)
            bar.update(len(later[s]))
    return result


def _measure_source(
    adapter: ModelAdapter,
    batch: Any,
    weights: Tensor,
    result: AtlasEffects,
    s: int,
    unit: float,
    vectors: list[SteeringVector],
    base: Tensor,
    targets: list[int],
) -> Tensor:
    """Search and measure every row of source ``s``: each vector with each sign, in
    order (pairs' vectors, then controls), and store them in ``result``. Returns each
    row's delta (its signed direction times its scale)."""
    top, controls = result.top, result.controls
    result.source_norms[s] = unit
    if unit == 0:
        raise ValueError(
            f"the activation at source layer {s} ({result.source_site}) is zero on these "
            "prompts, so no scale reaches a KL there; measure with other prompts"
        )
    directions = torch.stack([sign * v.direction.double() for v in vectors for sign in SIGNS])
    rows = directions.shape[0]
    a, b = result.answer_ids
    hook = adapter.hook_name(s, result.source_site)
    chunk = max(1, _SEQUENCES_PER_PASS // batch.tokens.shape[0])
    with steered_runs(adapter, batch, hook, weights=weights, chunk=chunk) as run:

        def kl_at(which: Tensor, scales: Tensor) -> tuple[Tensor, list[Any]]:
            kls, answers = run.kl(scales[:, None] * directions[which], base, [a, b])
            values = (answers[..., 0] - answers[..., 1]).double().mean(dim=1)
            return kls.mean(dim=1), values.tolist()

        full = functools.partial(torch.full, (rows,), dtype=torch.float64)
        low, high = KL_SCALE_RANGE
        scales, kls, values = kl_search(
            kl_at, full(unit * KL_PROBE_FRACTION), result.kl, (full(unit * low), full(unit * high)),
            tol=result.tol, rounds=_ROUNDS,
        )  # fmt: skip
    effects = torch.tensor(values, dtype=torch.float64) - result.baseline
    matched = (kls / result.kl).clamp_min(1e-300).log().abs() <= result.tol
    n_vec = len(targets) * top
    shape = (len(targets), top, 2)
    result.effects[s, targets] = effects[: 2 * n_vec].view(shape)
    result.scales[s, targets] = scales[: 2 * n_vec].view(shape)
    result.kls[s, targets] = kls[: 2 * n_vec].view(shape)
    result.matched[s, targets] = matched[: 2 * n_vec].view(shape)
    result.control_effects[s] = effects[2 * n_vec :].view(controls, 2)
    result.control_scales[s] = scales[2 * n_vec :].view(controls, 2)
    result.control_kls[s] = kls[2 * n_vec :].view(controls, 2)
    result.control_matched[s] = matched[2 * n_vec :].view(controls, 2)
    return scales[:, None] * directions


# As kl_scales: a row that has not met the tolerance by then sits at a bound.
_ROUNDS = 30
