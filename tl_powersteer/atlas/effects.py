"""Next-token effects of every atlas vector, for the atlas page.

Each vector of a pair is added at its source hook with both signs, at the scale where the
next-token KL is about a chosen number of nats, and the tokens whose probability it raises
and lowers most are listed. The page (``tl_powersteer.plotting.atlas_html``) shows them; it runs no
model itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..adapters import Model, ModelAdapter, TokenBatch, decode_token, steered_logits
from ..checks import is_int, is_number, plain_ints
from ..scales import KL_PROBE_FRACTION, KL_SCALE_RANGE, kl_divergence, kl_search
from .result import SensitivityAtlas

__all__ = ["TokenMoves", "check_atlas_model", "kl_matched_effects", "token_effects"]


def kl_matched_effects(
    adapter: ModelAdapter,
    batch: TokenBatch,
    hook: str,
    directions: Float[Tensor, "rows d_model"],
    unit: float,
    kl: float,
    top: int,
) -> tuple[Tensor, Tensor, list[TokenMoves]]:
    """Per unit direction, the scale at which steering along it reaches about ``kl`` nats
    (``kl_search``, from 1/32 of ``unit``, the hook's typical norm), the KL there and
    the ``top`` next tokens whose probability at the last token (averaged over prompts)
    rose and fell most there."""
    # Some 32 sequences per forward pass (faster than fewer: docs/concepts/atlas.md); only
    # last-token logits are kept, so memory stays small.
    chunk = max(1, 32 // batch.tokens.shape[0])
    base = steered_logits(adapter, batch, hook, 0 * directions[:1], chunk=chunk)
    base_p = base.double().softmax(-1)

    def kl_at(rows: Tensor, scales: Tensor) -> tuple[Tensor, list[Any]]:
        logits = steered_logits(
            adapter, batch, hook, scales[:, None] * directions[rows], chunk=chunk
        )
        dp = (logits.double().softmax(-1) - base_p).mean(dim=1).cpu()
        dl = (logits - base).mean(dim=1).double().cpu()
        # Only the listed tokens are kept: a row's whole vocabulary would fill memory.
        moves = [TokenMoves.of(p, d, top) for p, d in zip(dp, dl, strict=True)]
        return kl_divergence(logits, base).mean(dim=1).cpu(), moves

    n = directions.shape[0]
    if unit == 0:  # an activation that is always zero: nothing to scale against
        scales = torch.zeros(n, dtype=torch.float64)
        kls, moves = kl_at(torch.arange(n), scales)
        return scales, kls, moves
    full = functools.partial(torch.full, (n,), dtype=torch.float64)
    # A vector that barely moves the output is shown at the largest scale, one that moves
    # it at once at the smallest.
    bounds = (full(unit * KL_SCALE_RANGE[0]), full(unit * KL_SCALE_RANGE[1]))
    return kl_search(kl_at, full(KL_PROBE_FRACTION * unit), kl, bounds, tol=0.1, rounds=6)


@dataclass(frozen=True)
class TokenMoves:
    """The tokens whose next-token probability rose (``up``) and fell (``down``) most, as
    (token id, change of probability, change of logit), largest change first.

    Ranked by probability, not logit: a rare token's logit can jump while it stays
    improbable, and such tokens say nothing about where the model's mass went."""

    up: list[tuple[int, float, float]]
    down: list[tuple[int, float, float]]

    @classmethod
    def of(cls, dp: Float[Tensor, " vocab"], dl: Float[Tensor, " vocab"], top: int) -> TokenMoves:
        def listed(largest: bool) -> list[tuple[int, float, float]]:
            ids = dp.topk(top, largest=largest).indices.tolist()
            return [(i, float(dp[i]), float(dl[i])) for i in ids]

        return cls(listed(True), listed(False))


def check_atlas_model(model: Model | ModelAdapter, atlas: SensitivityAtlas) -> None:
    """Refuse a model other than the one the atlas was computed on (its shape, and its
    weights where the atlas records their fingerprint)."""
    adapter = ModelAdapter.of(model)
    if (adapter.n_layers, adapter.d_model) != (atlas.n_layers, int(atlas.right_vectors.shape[-1])):
        raise ValueError(
            f"the model ({adapter.n_layers} layers, d_model {adapter.d_model}) is not the one "
            f"the atlas was computed on ({atlas.model_name})"
        )
    if atlas.weights_fingerprint and atlas.weights_fingerprint != adapter.weights_fingerprint():
        raise ValueError(
            f"the model's weights are not those the atlas was computed on ({atlas.model_name}, "
            "same shapes, another weights_fingerprint): its vectors would be measured on "
            "another model; compute the atlas again on this one"
        )


@plain_ints
def token_effects(
    model: Model | ModelAdapter,
    atlas: SensitivityAtlas,
    *,
    kl: float = 1.0,
    top: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Next-token effects of every atlas vector, both signs, for the atlas browser.

    Each pair's vector v is added at the source hook on every real token, with both signs,
    at a scale (one per sign) where the next-token KL(steered ‖ base) at each prompt's last
    token (averaged over prompts) is about ``kl`` nats, so that vectors of layers with very
    different sensitivities are compared at the same strength. The scale is searched from
    1/32 of the source's typical norm, to within 10% of the KL (``kl_search``, as
    ``kl_scales`` does to 0.01%); the KL reached is reported with it. The change in
    next-token probability at the last token (averaged over prompts) gives the ``top``
    most promoted and most suppressed tokens, each with its change of probability and of
    logit (ranked by probability: the tokens whose mass moved). Returns ``{"kl": kl,
    "pairs": {"s,t": [per vector: {"+": {"scale": absolute scale, "relative": scale /
    typical norm, "kl": reached, "promoted": [[text, Δp, Δlogit], ...], "suppressed":
    [...]}, "-": {...}}]}}``.
    """
    adapter = ModelAdapter.of(model)
    check_atlas_model(adapter, atlas)
    if not is_number(kl) or not 0 < kl < float("inf"):
        raise ValueError(f"kl must be a positive number of nats (e.g. 1.0), got {kl!r}")
    if not is_int(top) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    prompts = atlas.prompts if atlas.prompts is not None else atlas.tokens
    if prompts is None:
        raise ValueError("the atlas records no prompts or tokens to measure effects on")
    batch = adapter.tokenize(prompts)
    from tqdm.auto import tqdm

    def listed(moves: list[tuple[int, float, float]]) -> list[list[Any]]:
        return [[decode_token(adapter.model, i), round(dp, 6), round(dl, 4)] for i, dp, dl in moves]

    pairs: dict[str, Any] = {}
    for s in tqdm(
        atlas.completed_sources, desc="token effects", unit="layer", disable=not progress
    ):
        later = [t for t in atlas.targets if t > s]
        V = torch.cat([atlas.right_vectors[s, t] for t in later]).double()
        unit = float(atlas.source_norms[s])
        # Rows: +v for every vector, then -v; each sign gets its own scale, as in kl_scales.
        hook = adapter.hook_name(s, atlas.source_site)
        scales, kls, moves = kl_matched_effects(
            adapter, batch, hook, torch.cat([V, -V]), unit, kl, top
        )
        n_vec = V.shape[0]
        for j, t in enumerate(later):
            effects = []
            for r in range(atlas.k):
                i = j * atlas.k + r
                entry: dict[str, Any] = {}
                for sign, row in (("+", i), ("-", n_vec + i)):
                    entry[sign] = {
                        "scale": float(scales[row]),
                        "relative": float(scales[row]) / unit if unit > 0 else 0.0,
                        "kl": float(kls[row]),
                        "promoted": listed(moves[row].up),
                        "suppressed": listed(moves[row].down),
                    }
                effects.append(entry)
            pairs[f"{s},{t}"] = effects
    return {"kl": kl, "pairs": pairs}
