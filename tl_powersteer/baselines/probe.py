"""Cosine probes: how strongly each prompt's activation points along a vector.

    probe(x) = ⟨a(x), v⟩ / (‖a(x)‖ ‖v‖)

at the vector's hook (or another layer and site) and one token position per prompt.

>>> import torch
>>> from transformer_lens.config import TransformerBridgeConfig
>>> from transformer_lens.model_bridge import TransformerBridge
>>> import tl_powersteer as tps
>>> cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_heads=2, n_layers=2, n_ctx=16,
...                               d_vocab=20, d_mlp=16, act_fn="gelu", seed=0)
>>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64)
>>> v = tps.SteeringVector(torch.arange(8.0), layer=1, site="hook_resid_post", method="custom")
>>> tps.probe(model, torch.tensor([[1, 2, 3], [1, 4, 5]]), v).shape
torch.Size([2])
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from ..adapters import Model, ModelAdapter, Prompts, activations
from ..checks import plain_ints
from ..vectors import SteeringVector
from .caa import token_at_position

__all__ = ["probe"]


@plain_ints
def probe(
    model: Model | ModelAdapter,
    prompts: Prompts,
    vector: SteeringVector,
    *,
    layer: int | None = None,
    site: str | None = None,
    position: int = -1,
) -> Float[Tensor, " n_prompts"]:
    """Cosine similarity of each prompt's activation with ``vector``, at the vector's own
    hook unless ``layer``/``site`` say otherwise, at token ``position`` (negative counts
    from each prompt's last real token)."""
    if not isinstance(vector, SteeringVector):
        raise TypeError(f"vector must be a SteeringVector, got {type(vector).__name__}")
    adapter = ModelAdapter.of(model)
    if vector.d_model != adapter.d_model:
        raise ValueError(
            f"{vector.name} has width {vector.d_model}, the model's d_model is {adapter.d_model}"
        )
    hook = adapter.hook_name(vector.layer if layer is None else layer, site or vector.site)
    batch = adapter.tokenize(prompts)
    token_at_position(batch, batch.tokens[..., None], position, "")
    act = token_at_position(batch, activations(adapter, batch, [hook])[0], position, "").double()
    u = vector.direction.to(act.device).double()
    return ((act @ u) / act.norm(dim=-1).clamp_min(1e-30)).float().cpu()
