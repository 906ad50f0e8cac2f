"""The one KL scale search, on curves whose KL is known in closed form."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tl_powersteer.scales import kl_divergence, kl_search


def _kl_curves(a: torch.Tensor, p: torch.Tensor, cap: float = math.inf) -> Any:
    """A ``kl_at`` for rows whose KL is a·scale^p (at most ``cap``), counting calls per
    row; each payload is the scale it was evaluated at."""
    calls = torch.zeros(len(a), dtype=torch.long)

    def kl_at(rows: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        calls[rows] += 1
        return (a[rows] * scales ** p[rows]).clamp(max=cap), scales.tolist()

    return kl_at, calls


def test_kl_search_on_known_curves() -> None:
    a = torch.tensor([1e-3, 2e-2, 0.5, 4.0, 1e-4, 3e-3], dtype=torch.float64)
    p = torch.tensor([2.0, 1.6, 1.3, 1.2, 3.0, 1.0], dtype=torch.float64)
    kl_at, calls = _kl_curves(a, p)
    n = len(a)
    probe = torch.full((n,), 1.0, dtype=torch.float64)
    bounds = (
        torch.full((n,), 1e-3, dtype=torch.float64),
        torch.full((n,), 1e3, dtype=torch.float64),
    )
    scales, kls, payloads = kl_search(kl_at, probe, 0.7, bounds, tol=0.1, rounds=6)
    torch.testing.assert_close(kls, a * scales**p)
    assert (kls / 0.7).log().abs().max() <= 0.1
    assert payloads == scales.tolist()  # the payload of the evaluation that was kept
    # KL ∝ scale² is hit by the first step; the others take a few more.
    assert calls[0] == 2 and calls.max() <= 5
    assert float(scales[0]) == pytest.approx((0.7 / 1e-3) ** 0.5)


def test_kl_search_stops_at_what_it_cannot_reach() -> None:
    # Row 0 saturates at 0.3 nats; row 1 never moves; row 2 exceeds the target at the
    # smallest scale allowed.
    a = torch.tensor([1e-2, 0.0, 50.0], dtype=torch.float64)
    p = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    kl_at, calls = _kl_curves(a, p, cap=0.3)
    kl_at_big, _ = _kl_curves(a[2:], p[2:])
    probe = torch.full((3,), 1.0, dtype=torch.float64)
    bounds = (
        torch.full((3,), 0.5, dtype=torch.float64),
        torch.full((3,), 64.0, dtype=torch.float64),
    )
    scales, kls, _ = kl_search(kl_at, probe, 1.0, bounds, tol=0.1, rounds=6)
    assert float(kls[0]) == pytest.approx(0.3) and float(kls[1]) == 0.0
    assert ((scales >= 0.5) & (scales <= 64.0)).all() and (calls <= 7).all()
    high, high_kl, _ = kl_search(
        kl_at_big, probe[2:], 1.0, (bounds[0][2:], bounds[1][2:]), tol=0.1, rounds=6
    )
    assert float(high) == 0.5 and float(high_kl) == pytest.approx(25.0)


@pytest.mark.parametrize("kind", ["bend", "saturate"])
def test_kl_search_follows_curves_that_bend(kind: str) -> None:
    """Near 0.5 nats the KL of a real model grows like the third or fourth power of the
    scale, or flattens out: curves like a·s²·exp(b·s) and c·(1 − exp(−a·s²)). The
    parabola through the last three points reaches 1e-3 of log KL in at most 30 (bend)
    and 34 (saturate) evaluations over these six rows; two-point secant steps take 35
    and 41."""
    a = torch.tensor([1e-3, 1e-2, 3e-2, 1e-1, 1e-3, 2e-3], dtype=torch.float64)
    b = torch.tensor([0.3, 0.5, 1.0, 2.0, 0.1, 0.8], dtype=torch.float64)
    calls = torch.zeros(len(a), dtype=torch.long)

    def kl_at(rows: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        calls[rows] += 1
        if kind == "bend":
            return a[rows] * s**2 * torch.exp(b[rows] * s), s.tolist()
        return 0.6 * (1 - torch.exp(-10 * a[rows] * s**2)), s.tolist()

    one = torch.ones(len(a), dtype=torch.float64)
    _, kls, _ = kl_search(kl_at, one, 0.5, (one / 1000, one * 1000), tol=1e-3, rounds=30)
    assert (kls / 0.5).log().abs().max() <= 1e-3
    assert int(calls.sum()) <= (30 if kind == "bend" else 34)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_divergence_against_float64_softmax(dtype: torch.dtype) -> None:
    """Over a 262k-token vocabulary, float32 logits give the float64 KL of the same
    logits to within 1e-6 nats, from 1e-5 nats to several; float64 logits to 1e-12."""
    generator = torch.Generator().manual_seed(0)
    base = (4 * torch.randn(1, 2, 262_144, generator=generator, dtype=torch.float64)).to(dtype)
    sizes = torch.tensor([0.005, 0.05, 0.5, 2.0], dtype=torch.float64)[:, None, None]
    noise = torch.randn(4, 2, 262_144, generator=generator, dtype=torch.float64)
    steered = (base.double() + sizes * noise).to(dtype)
    log_p = torch.log_softmax(steered.double(), dim=-1)
    log_q = torch.log_softmax(base.double(), dim=-1)
    reference = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    found = kl_divergence(steered, base)
    assert found.dtype == torch.float64 and found.shape == (4, 2)
    assert reference.min() < 1e-3 and reference.max() > 1.0
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(found, reference, rtol=0, atol=atol)
