"""Power Steering against the reference algorithm, per layer pair, measured in one run.

The reference is the algorithm of the original Power Steering code: block power iteration
on JᵀJ where each product is a double-backward ``autograd.grad`` (J w as the derivative of
the VJP with respect to its cotangent), one vector at a time, block of 12, a fixed number of
iterations (5 as published), Rayleigh-Ritz at the end. Both are asked for the same
accuracy: top-8 singular values within 1e-3 relative and top-4 subspace within 1e-2 rad of
the exact SVD of ``LayerJacobian.dense()``. ``power_steer`` gets ``tol=1e-3`` and stops on
its own error bound; the reference is stopped by an oracle that knows the exact SVD, at the
fewest iterations that reach the accuracy asked for, or the one ``power_steer`` reached if
that is looser. The printed ratio is reference time / power_steer time per pair.

    python benchmarks/bench_power.py                 # tiny random GPT-2, offline
    python benchmarks/bench_power.py --pairs 1:5 2:9 --d-model 256 --layers 12
    python benchmarks/bench_power.py --model gemma-3-270m   # the embedded model, 5 pairs
    python benchmarks/bench_power.py --model gemma-3-270m --block-size 16   # k + 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

import tl_powersteer as tps

SIGMA_RTOL = 1e-3
ANGLE_TOL = 1e-2
K = 8
REAL_PROMPT = (
    "I watched the film last night with my sister. Honestly, after all the hype, the movie was"
)


def synchronize() -> None:
    """Wait for queued GPU work, so that a wall-clock reading includes it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def tiny_gpt2(d_model: int, n_layers: int, seed: int = 0, device: str = "cpu") -> Any:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=d_model, n_layer=n_layers, n_head=8, vocab_size=1000, n_positions=128
    )
    # The weights are read into memory, so the folder can go once the model is booted.
    with tempfile.TemporaryDirectory(prefix="bench_gpt2_") as root:
        GPT2LMHeadModel(config).save_pretrained(root)
        return TransformerBridge.boot_transformers(root, device=device).eval()


def accuracy(
    vectors: torch.Tensor, sigmas: torch.Tensor, exact: Any, k: int = K
) -> tuple[float, float]:
    """(max relative σ error over top-k, max principal angle over the top-4 subspace)."""
    S, Vh = exact
    k = min(k, sigmas.numel())
    rel = ((sigmas[:k].double().cpu() - S[:k]).abs() / S[:k]).max().item()
    A, B = vectors[:4].double().cpu(), Vh[:4]
    # Sines of the principal angles: accurate for small angles, unlike arccos of cosines.
    sines = torch.linalg.svdvals(A - (A @ B.T) @ B).clamp(max=1.0)
    return rel, torch.arcsin(sines).max().item()


def reference_iterations(
    f: Callable[[torch.Tensor], torch.Tensor],
    d: int,
    dtype: torch.dtype,
    block: int = 12,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The reference: double-backward JᵀJ w, one column at a time, block of 12.

    The n-th item is the Rayleigh-Ritz estimate after n - 1 power iterations, so stopping
    there is exactly the fixed-iteration algorithm with ``iters = n - 1``.
    """
    v = torch.zeros(d, dtype=dtype, device=device, requires_grad=True)
    y = f(v)
    u = torch.zeros_like(y, requires_grad=True)
    (jt_u,) = torch.autograd.grad(y, v, grad_outputs=u, create_graph=True)

    def gram(w: torch.Tensor) -> torch.Tensor:
        (jw,) = torch.autograd.grad(jt_u, u, grad_outputs=w, retain_graph=True)
        (jtjw,) = torch.autograd.grad(y, v, grad_outputs=jw, retain_graph=True)
        return jtjw

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(d, block, generator=gen, dtype=torch.float64).to(device, dtype)
    Q = torch.linalg.qr(start).Q
    while True:
        Z = torch.stack([gram(Q[:, j]) for j in range(block)], dim=1)
        evals, evecs = torch.linalg.eigh(Q.T @ Z)
        order = evals.argsort(descending=True)
        yield (Q @ evecs[:, order]).T, evals[order].clamp_min(0).sqrt()
        Q = torch.linalg.qr(Z).Q


def time_reference(
    op: tps.LayerJacobian,
    exact: Any,
    sigma_tol: float,
    angle_tol: float,
    cap: int = 80,
    k: int = K,
) -> tuple[float, int, tuple[float, float]]:
    """Seconds and iterations for the reference to reach the given accuracy (checks untimed)."""
    elapsed = 0.0
    start = time.perf_counter()
    steps = reference_iterations(op.readout, op.shape[1], op.dtype, device=op.device)
    for n, (vectors, sigmas) in enumerate(steps):
        synchronize()
        elapsed += time.perf_counter() - start
        acc = accuracy(vectors, sigmas, exact, k)
        if (acc[0] <= sigma_tol and acc[1] <= angle_tol) or n >= cap:
            return elapsed, n, acc
        start = time.perf_counter()
    raise AssertionError("unreachable")


def bench_pair(
    model: Any, prompt: Any, source: int, target: int, block_size: int | None
) -> dict[str, Any]:
    op = tps.LayerJacobian(model, prompt, source, target)
    U_S_Vh = torch.linalg.svd(op.dense().double(), full_matrices=False)
    exact = (U_S_Vh[1], U_S_Vh[2])

    start = time.perf_counter()
    res = tps.power_steer(model, prompt, source, target, k=K, tol=SIGMA_RTOL, block_size=block_size)
    ours = time.perf_counter() - start
    ours_acc = accuracy(res.vectors, res.singular_values, exact)

    # The reference gets the same setup (one forward pass) and must reach the same accuracy.
    start = time.perf_counter()
    fresh = tps.LayerJacobian(model, prompt, source, target)
    setup = time.perf_counter() - start
    ref_time, ref_iters, ref_acc = time_reference(
        fresh, exact, max(ours_acc[0], SIGMA_RTOL), max(ours_acc[1], ANGLE_TOL)
    )
    ref_time += setup
    return {
        "pair": f"L{source} -> L{target}",
        "ours_s": ours,
        "ours_iters": res.iterations,
        "ours_passes": res.n_jvp + res.n_vjp,
        "ours_sigma_err": ours_acc[0],
        "ours_bound": float(res.error_bounds.max()),
        "ours_angle": ours_acc[1],
        "ref_s": ref_time,
        "ref_iters": ref_iters,
        "ref_sigma_err": ref_acc[0],
        "ref_angle": ref_acc[1],
        "ratio": ref_time / ours,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help="a name for tps.load_model (e.g. gemma-3-270m); default: a tiny random GPT-2",
    )
    parser.add_argument("--d-model", type=int, default=128, help="width of the tiny model")
    parser.add_argument("--layers", type=int, default=8, help="depth of the tiny model")
    parser.add_argument("--seq", type=int, default=20, help="prompt length in tokens")
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=None,
        help="source:target pairs (default: five pairs suited to the model)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help=f"power_steer's block (default: its own, k + 4 = {K + 4})",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.model is None:
        model = tiny_gpt2(args.d_model, args.layers)
        gen = torch.Generator().manual_seed(0)
        prompt: Any = torch.randint(0, 1000, (1, args.seq), generator=gen)
        pairs = args.pairs or ["1:5", "2:6", "3:4", "0:7", "4:7"]
        described = f"random GPT-2, d_model={args.d_model}, {args.layers} layers"
    else:
        model = tps.load_model(args.model, device="cpu", progress=True)
        prompt = REAL_PROMPT
        pairs = args.pairs or ["8:16", "10:11", "6:14", "3:10", "12:17"]
        described = f"{args.model}, d_model={model.cfg.d_model}, {model.cfg.n_layers} layers"
    n_tokens = (
        prompt.shape[1] if isinstance(prompt, torch.Tensor) else model.to_tokens(prompt).shape[1]
    )
    print(f"model: {described}, {n_tokens} tokens, CPU threads: {torch.get_num_threads()}")
    print(f"targets: top-{K} sigma rel err <= {SIGMA_RTOL}, top-4 subspace <= {ANGLE_TOL} rad")
    print(f"power_steer block: {args.block_size or K + 4}")
    header = (
        f"{'pair':>10} {'ours s':>8} {'it':>3} {'passes':>6} {'σ err':>8} {'bound':>8} "
        f"{'angle':>8} | "
        f"{'ref s':>8} {'it':>3} {'σ err':>8} {'angle':>8} | {'ratio':>6}"
    )
    print(header)
    # First calls pay one-time costs (allocations, torch.func set-up) that a run of many
    # pairs does not: both methods run once, untimed, before the first pair is timed.
    source, target = (int(x) for x in pairs[0].split(":"))
    tps.power_steer(model, prompt, source, target, k=K, max_iters=2, block_size=args.block_size)
    warm = tps.LayerJacobian(model, prompt, source, target)
    for n, _ in enumerate(
        reference_iterations(warm.readout, warm.shape[1], warm.dtype, device=warm.device)
    ):
        if n >= 2:
            break
    rows = []
    for pair in pairs:
        source, target = (int(x) for x in pair.split(":"))
        r = bench_pair(model, prompt, source, target, args.block_size)
        rows.append(r)
        print(
            f"{r['pair']:>10} {r['ours_s']:8.3f} {r['ours_iters']:3d} {r['ours_passes']:6d} "
            f"{r['ours_sigma_err']:8.1e} {r['ours_bound']:8.1e} {r['ours_angle']:8.1e} | "
            f"{r['ref_s']:8.3f} "
            f"{r['ref_iters']:3d} {r['ref_sigma_err']:8.1e} {r['ref_angle']:8.1e} | "
            f"{r['ratio']:6.2f}x",
            flush=True,
        )
    ratios = [r["ratio"] for r in rows]
    met = all(r["ours_sigma_err"] <= SIGMA_RTOL and r["ours_angle"] <= ANGLE_TOL for r in rows)
    ref_met = all(r["ref_sigma_err"] <= SIGMA_RTOL and r["ref_angle"] <= ANGLE_TOL for r in rows)
    print(
        f"speed-up over the reference: median {statistics.median(ratios):.2f}x "
        f"(target >= 3x: {statistics.median(ratios) >= 3}), worst {min(ratios):.2f}x "
        f"(target >= 2.5x: {min(ratios) >= 2.5})"
    )
    print(f"power_steer met the accuracy targets on every pair: {met}")
    print(
        f"the bound covered power_steer's σ error on every pair: "
        f"{all(r['ours_sigma_err'] <= r['ours_bound'] for r in rows)}"
    )
    print(f"the reference met them on every pair: {ref_met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
