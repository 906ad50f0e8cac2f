"""Contrastive activation addition (CAA): the mean difference of paired activations.

With activations a⁺ᵢ, a⁻ᵢ of paired positive and negative prompts at one hook and token
position, the CAA vector is  m = (1/n) Σᵢ (a⁺ᵢ − a⁻ᵢ).  Its direction m / ‖m‖ is the
steering direction and ‖m‖ its natural scale (``vector.norm``): steering with
``scale=vector.norm`` adds m itself.

>>> import torch
>>> from transformer_lens.config import TransformerBridgeConfig
>>> from transformer_lens.model_bridge import TransformerBridge
>>> import tl_powersteer as tps
>>> cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_heads=2, n_layers=2, n_ctx=16,
...                               d_vocab=20, d_mlp=16, act_fn="gelu", seed=0)
>>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64)
>>> v = tps.caa_vector(model, torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 4]]), layer=1)
>>> v.method, v.layer, v.site, round(float(v.direction.norm()), 6)
('caa', 1, 'hook_resid_post', 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..adapters import Model, ModelAdapter, Prompts, TokenBatch, activations
from ..checks import is_int, plain_ints
from ..models import model_provenance
from ..vectors import SteeringVector

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["caa_layer_sweep", "caa_vector", "check_caa_options", "token_at_position"]


def token_at_position(batch: TokenBatch, acts: Tensor, position: int, what: str) -> Tensor:
    """Each prompt's activation at ``position`` (negative counts from its last real token)."""
    shortest = int(batch.lengths.min())
    if not is_int(position):
        raise TypeError(f"position must be an int, got {position!r}")
    if not -shortest <= position < shortest:
        raise ValueError(
            f"position={position} does not fit the shortest {what} prompt ({shortest} tokens): "
            f"use {-shortest}..{shortest - 1}"
        )
    index = batch.lengths + position if position < 0 else torch.full_like(batch.lengths, position)
    return acts[torch.arange(acts.shape[0]), index]


def check_caa_options(
    adapter: ModelAdapter,
    positive: Prompts,
    negative: Prompts,
    layers: Sequence[int],
    site: str,
    position: int,
) -> tuple[TokenBatch, TokenBatch, list[int], list[str]]:
    """CAA's arguments checked with no forward pass: the tokenized positive and negative
    prompts, the resolved layers and their hooks."""
    pos, neg = adapter.tokenize(positive), adapter.tokenize(negative)
    if pos.tokens.shape[0] != neg.tokens.shape[0]:
        raise ValueError(
            f"CAA pairs prompts: got {pos.tokens.shape[0]} positive and "
            f"{neg.tokens.shape[0]} negative prompts; give the same number of each"
        )
    layers = [adapter.resolve_layer(layer, "layer") for layer in layers]
    hooks = [adapter.hook_name(layer, site) for layer in layers]
    token_at_position(pos, pos.tokens[..., None], position, "positive")
    token_at_position(neg, neg.tokens[..., None], position, "negative")
    return pos, neg, layers, hooks


def _paired(
    model: Model | ModelAdapter,
    positive: Prompts,
    negative: Prompts,
    layers: Sequence[int],
    site: str,
    position: int,
) -> tuple[ModelAdapter, list[int], list[tuple[Tensor, Tensor]]]:
    """(adapter, resolved layers, per layer the positive and negative activations
    ``[n_pairs, d_model]`` at ``position``), checked before any forward pass."""
    adapter = ModelAdapter.of(model)
    pos, neg, layers, hooks = check_caa_options(adapter, positive, negative, layers, site, position)
    acts = zip(activations(adapter, pos, hooks), activations(adapter, neg, hooks), strict=True)
    return (
        adapter,
        layers,
        [
            (
                token_at_position(pos, a, position, "positive").double(),
                token_at_position(neg, b, position, "negative").double(),
            )
            for a, b in acts
        ],
    )


def _caa(
    adapter: ModelAdapter,
    mean_difference: Tensor,
    layer: int,
    site: str,
    position: int,
    n_pairs: int,
    normalize: bool,
) -> SteeringVector:
    norm = float(mean_difference.norm())
    if norm == 0:
        raise ValueError(
            f"the positive and negative prompts give identical activations at layer {layer}: "
            "CAA has no direction there"
        )
    return SteeringVector(
        (mean_difference / norm).to(adapter.dtype).cpu(),
        layer=layer,
        site=site,
        method="caa",
        norm=1.0 if normalize else norm,
        metadata={
            "name": f"caa L{layer}",
            "model_name": adapter.name,
            "position": position,
            "n_pairs": n_pairs,
            "mean_difference_norm": norm,
            "provenance": model_provenance(adapter),
        },
    )


@plain_ints
def caa_vector(
    model: Model | ModelAdapter,
    positive_prompts: Prompts,
    negative_prompts: Prompts,
    layer: int,
    *,
    site: str = "hook_resid_post",
    position: int = -1,
    normalize: bool = True,
) -> SteeringVector:
    """The CAA vector of paired prompts at ``blocks.{layer}.{site}``, token ``position``
    (negative counts from each prompt's last real token).

    ``normalize=True`` gives ``norm=1`` (scale in activation units, like every other
    method); ``normalize=False`` keeps the mean difference's length as ``norm``. The length
    is always in ``metadata["mean_difference_norm"]``.
    """
    adapter, (layer,), [(a, b)] = _paired(
        model, positive_prompts, negative_prompts, [layer], site, position
    )
    return _caa(adapter, (a - b).mean(0), layer, site, position, a.shape[0], normalize)


@plain_ints
def caa_layer_sweep(
    model: Model | ModelAdapter,
    positive_prompts: Prompts,
    negative_prompts: Prompts,
    layers: Sequence[int] | None = None,
    *,
    site: str = "hook_resid_post",
    position: int = -1,
) -> pd.DataFrame:
    """CAA at every layer from one forward pass per prompt set, as a DataFrame.

    Columns: ``layer``, ``mean_difference_norm``, ``separation`` (the gap between the
    positive and negative prompts' mean projections on the unit direction, divided by the
    pooled standard deviation of the projections: how cleanly the layer separates the two
    sets; NaN with one pair) and ``vector`` (the ``SteeringVector``, ``norm=1``).
    """
    import pandas as pd

    if layers is not None and not list(layers):
        raise ValueError("layers is empty: give at least one layer or None for all")
    adapter = ModelAdapter.of(model)
    chosen = list(range(adapter.n_layers)) if layers is None else list(layers)
    adapter, chosen, acts = _paired(
        adapter, positive_prompts, negative_prompts, chosen, site, position
    )
    rows = []
    for layer, (a, b) in zip(chosen, acts, strict=True):
        n = a.shape[0]
        vector = _caa(adapter, (a - b).mean(0), layer, site, position, n, True)
        u = vector.direction.double().to(a.device)
        proj_pos, proj_neg = a @ u, b @ u
        spread = torch.cat([proj_pos - proj_pos.mean(), proj_neg - proj_neg.mean()]).std()
        gap = float(proj_pos.mean() - proj_neg.mean())
        rows.append(
            {
                "layer": layer,
                "mean_difference_norm": vector.metadata["mean_difference_norm"],
                "separation": gap / float(spread) if n > 1 and spread > 0 else float("nan"),
                "vector": vector,
            }
        )
    return pd.DataFrame(rows)
