"""Independent dense references: the full forward pass, one prompt at a time, no early stop."""

from __future__ import annotations

from typing import Any

import torch

from tl_powersteer.adapters import _tensor_attributes_kept


def reference_function(
    model: Any, tokens: torch.Tensor, source_hook: str, target_hook: str, positions: int
) -> Any:
    """v -> target activation at the last ``positions`` tokens of one unpadded prompt."""

    def f(v: torch.Tensor) -> torch.Tensor:
        store: dict[str, torch.Tensor] = {}

        def add(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return act + v

        def keep(act: torch.Tensor, hook: Any) -> None:
            store["target"] = act

        # Bridges cache attention patterns on modules; under torch.func those caches are
        # transform wrappers that must not outlive the call.
        with _tensor_attributes_kept(model):
            model.run_with_hooks(tokens[None], fwd_hooks=[(source_hook, add), (target_hook, keep)])
        return store["target"][0, -positions:].reshape(-1)

    return f


def reference_jacobian(
    model: Any,
    prompts: list[torch.Tensor],
    source_hook: str,
    target_hook: str,
    positions: int,
) -> torch.Tensor:
    """The stacked Jacobian [Σ n_out, d_model] by torch.func.jacfwd, one prompt at a time."""
    d_model = model.cfg.d_model
    dtype = next(model.parameters()).dtype
    zero = torch.zeros(d_model, dtype=dtype)
    blocks = []
    for tokens in prompts:
        f = reference_function(model, tokens, source_hook, target_hook, positions)
        with torch.no_grad():
            blocks.append(torch.func.jacfwd(f)(zero))
    return torch.cat(blocks)


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Largest-first angles (radians) between the row spaces of A and B (rows orthonormal).

    Computed from sines, which stay accurate for small angles where arccos does not.
    """
    if A.shape != B.shape:
        raise ValueError(
            f"compare subspaces of equal size, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    A, B = A.double(), B.double()
    sines = torch.linalg.svdvals(A - (A @ B.T) @ B).clamp(max=1.0)
    return torch.arcsin(sines)
