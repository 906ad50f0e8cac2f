"""Independent dense references: the full forward pass, one prompt at a time, no early stop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import tl_powersteer as tps
from tl_powersteer.adapters import ModelAdapter, tensor_attributes_kept


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
        with tensor_attributes_kept(model):
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


def greedy_loop(
    model: Any,
    tokens: torch.Tensor,
    n_new: int,
    hook: str,
    delta: torch.Tensor | float,
    where: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """Greedy continuation by full forward passes, no cache: ``delta`` is added at ``hook``
    with weight ``where(length)[position]``, positions counted in the whole sequence."""
    seq = tokens
    for _ in range(n_new):
        weight = where(seq.shape[1])

        def add(act: torch.Tensor, hook: Any, weight: torch.Tensor = weight) -> torch.Tensor:
            return act + weight[:, None].to(act.dtype) * torch.as_tensor(delta).to(act.dtype)

        with torch.no_grad():
            logits = model.run_with_hooks(seq, fwd_hooks=[(hook, add)])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


# Half the typical norm changes the text without drowning it; the last prompt token alone
# needs more.
RELATIVE_SCALE = {None: 0.0, "all": 0.5, "generated": 0.5, -1: 3.0}


def steered_where(rule: Any, length: int, prompt_length: int) -> torch.Tensor:
    """The positions each rule steers, written out independently of the library."""
    pos = torch.arange(length)
    if rule == "all":
        return torch.ones(length)
    if rule == "generated":
        return (pos >= prompt_length).double()
    return (pos == rule % prompt_length).double()  # a negative int counts from the prompt's end


def assert_generation_is_greedy(
    model: Any, prompt: torch.Tensor, rule: Any, n_new: int, *, layer: int
) -> None:
    """Generation with the KV cache, without it, and ``greedy_loop`` agree token for token,
    unsteered (``rule`` None) or under ``steer`` with a random direction at ``layer``'s
    residual stream, at ``RELATIVE_SCALE[rule]`` typical norms; and the vector changes
    the text (an unsteered text must vary instead)."""
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(model.cfg.d_model, generator=gen, dtype=torch.float64)
    v = tps.SteeringVector(direction, layer, "hook_resid_post", "random")
    scale = RELATIVE_SCALE[rule] * tps.typical_norm(model, prompt, layer, v.site)
    n = prompt.shape[1]
    expected = greedy_loop(
        model, prompt, n_new, v.hook_name, scale * v.direction,
        lambda length: steered_where(rule or "all", length, n),
    )  # fmt: skip
    for use_cache in (True, False):
        with tps.steer(model, v, scale, positions=rule or "all"):
            out = ModelAdapter(model).generate(
                prompt, max_new_tokens=n_new, greedy=True, use_cache=use_cache, stop_at_eos=False
            )
        assert out.tolist() == expected.tolist(), f"use_cache={use_cache}"
    unsteered = greedy_loop(model, prompt, n_new, v.hook_name, 0.0, torch.ones)
    if rule is None:
        assert len(set(unsteered[0, n:].tolist())) > 3, "the text varies"
    else:
        assert unsteered.tolist() != expected.tolist(), "the vector changes the text"
