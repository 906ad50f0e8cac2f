"""Sensitivity atlas methods compared in one run: wall time, peak memory, error vs exact.

Runs ``sensitivity_atlas`` with the exact, sketch and (optionally) power methods on the
same pairs and prints, for each, seconds, speed-up over the reference, peak memory growth
during that run (resident memory on the CPU, sampled every few milliseconds; allocated GPU
memory with ``--device cuda``) as a multiple of the model's fp32 weights, and the error of
its top-k singular values against the exact ones (median and worst relative error over
pairs and ranks, and the worst pair). The reference is the original Power Steering
algorithm run pair by pair (double-backward JᵀJ w, block 12; ``bench_power.py``), each
pair iterated until its top-k singular values are within 1e-3 of the exact ones.

Two lines put the ratios in context, both measured in the same run:

* the matrix-product floor of the exact method: its GEMM FLOPs (every identity column
  through every block it crosses, the last block only at the read positions) divided by the
  device's best fp32 GEMM rate on the model's MLP shapes. No fp32 implementation of the exact
  atlas can be faster, so reference / floor bounds its achievable speed-up;
* the singular value spectrum of the pair where the sketch errs most: restricted to a basis
  of 4r columns, a sketch cannot resolve σ1..σk better than the tail σ_{4r+1} / σ1 allows.

    python benchmarks/bench_atlas.py                          # tiny random GPT-2, offline
    python benchmarks/bench_atlas.py --model gemma-3-270m     # all 153 pairs of Gemma 3 270M
    python benchmarks/bench_atlas.py --model gemma-3-270m --sketch-ranks 12 16 20 24 32
    python benchmarks/bench_atlas.py --model gemma-3-270m --sketch-matmuls default float32
    python benchmarks/bench_atlas.py --model gemma-3-270m --device cuda --chunk-size 640
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from bench_power import REAL_PROMPT, synchronize, time_reference, tiny_gpt2

import tl_powersteer as tps
from tl_powersteer.atlas import validate_atlas_arguments
from tl_powersteer.atlas.sketch import BASIS_FACTOR
from tl_powersteer.jacobian import default_chunk_size


def release_freed_memory() -> None:
    """Hand the memory that freed tensors leave in the C allocator's heap back to the system
    (glibc's ``malloc_trim``; elsewhere nothing), so that an earlier run's does not count
    as resident before the next one and hide what the latter really needs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_mb() -> float:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def peak_growth(device: torch.device, every: float = 0.002) -> Iterator[list[float]]:
    """MB the block adds to memory at its peak, in the list it yields once the block is over:
    allocated memory on a CUDA device, else resident memory sampled every ``every`` seconds
    (the process's own peak would hide a run's behind an earlier, larger one's)."""
    grown: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield grown
        grown.append((torch.cuda.max_memory_allocated(device) - before) / 2**20)
        return
    gc.collect()
    release_freed_memory()
    before, peak, done = resident_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(every):
            peak[0] = max(peak[0], resident_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield grown
    finally:
        done.set()
        sampler.join()
    grown.append(max(peak[0], resident_mb()) - before)


def gemm_rate(
    rows: int, d_model: int, d_mlp: int, repeats: int = 5, device: torch.device | str = "cpu"
) -> float:
    """Best fp32 GEMM rate (FLOP/s) of the device on the MLP's shapes, ``rows`` tokens."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(rows, d_model, generator=gen).to(device)
    W = torch.randn(d_model, d_mlp, generator=gen).to(device)
    H = torch.randn(rows, d_mlp, generator=gen).to(device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up the device's kernels
        synchronize()
        start = time.perf_counter()
        X @ W
        H @ W.T
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 2 * rows * d_model * d_mlp / best


def matmul_floor(
    cfg: Any,
    pairs: list[tuple[int, int]],
    tokens: int,
    positions: int,
    chunk: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """(seconds, FLOP/s): the exact atlas's matrix products alone at the device's GEMM rate,
    measured on GEMMs as tall as one chunk (default: the library's for one prompt)."""
    heads, kv_heads = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads
    macs_per_token = cfg.d_model * cfg.d_head * (2 * heads + 2 * kv_heads) + (
        cfg.d_model * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    )
    last = {s: max(t for s2, t in pairs if s2 == s) for s, _ in pairs}
    # Blocks s+1 .. last are crossed; the last one is needed only at the read positions.
    blocks = sum(last[s] - s - 1 + positions / tokens for s in last)
    flops = 2 * macs_per_token * tokens * cfg.d_model * blocks
    chunk = default_chunk_size(tokens) if chunk is None else chunk
    rate = gemm_rate(chunk * tokens, cfg.d_model, cfg.d_mlp, device=device)
    return flops / rate, rate


def spectrum_tail(model: Any, prompt: Any, source: int, target: int, ranks: list[int]) -> str:
    """σ_{r+1} / σ_1 of one pair for each r, from its dense Jacobian."""
    dense = tps.LayerJacobian(model, prompt, source, target).dense()
    S = torch.linalg.svdvals(dense.double().cpu())
    return ", ".join(f"σ{r + 1}/σ1 {S[r] / S[0]:.2f}" for r in ranks if r < S.numel())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="tps.load_model name; default tiny GPT-2")
    parser.add_argument("--d-model", type=int, default=64, help="width of the tiny model")
    parser.add_argument("--layers", type=int, default=6, help="depth of the tiny model")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--methods", nargs="+", default=["exact", "sketch"], help="exact is always run first"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the (slow) pair-by-pair reference"
    )
    parser.add_argument(
        "--sketch-ranks",
        type=int,
        nargs="+",
        default=None,
        help="sketch ranks r to run (each one a row); default the method's default rank",
    )
    parser.add_argument(
        "--sketch-matmuls",
        nargs="+",
        choices=["default", "float32", "bfloat16"],
        default=["default"],
        help="sketch_matmul_dtype of each sketch row: the library's default (bfloat16 on a "
        "CPU that multiplies it in hardware, else full precision), or a given dtype",
    )
    parser.add_argument("--device", type=torch.device, default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="sensitivity_atlas's (default its own)"
    )
    parser.add_argument(
        "--sources", type=int, nargs="+", default=None, help="source layers (default all)"
    )
    args = parser.parse_args(argv)
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")
    warnings.filterwarnings("ignore")
    if args.model is None:
        model = tiny_gpt2(args.d_model, args.layers, device=str(device))
        prompt: Any = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(0))
    else:
        model = tps.load_model(args.model, device=str(device))
        prompt = REAL_PROMPT
    matmuls = [None if m == "default" else getattr(torch, m) for m in args.sketch_matmuls]
    try:  # bad options fail here, with the library's own message, before any timing
        for rank in args.sketch_ranks or [None]:
            for matmul in matmuls:
                validate_atlas_arguments(
                    model, prompt, sources=args.sources, k=args.k, sketch_rank=rank,
                    sketch_matmul_dtype=matmul, chunk_size=args.chunk_size,
                )  # fmt: skip
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    n = model.cfg.n_layers
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU threads {torch.get_num_threads()}"
    )
    sources = range(n) if args.sources is None else [s % n for s in args.sources]
    n_pairs = sum(n - 1 - s for s in set(sources))
    print(f"model {args.model or 'tiny GPT-2'}: {n} layers, d_model {model.cfg.d_model}, "
          f"{n_pairs} pairs, top-{args.k}, {where}")  # fmt: skip
    runs: list[tuple[str, int | None, torch.dtype | None]] = [("exact", None, None)]
    for method in [m for m in args.methods if m != "exact"]:
        if method == "sketch":
            runs += [(method, r, m) for r in args.sketch_ranks or [None] for m in matmuls]
        else:
            runs.append((method, None, None))
    results = {}
    for method, rank, matmul in runs:
        synchronize()
        with peak_growth(device) as grown:
            start = time.perf_counter()
            atlas = tps.sensitivity_atlas(
                model, prompt, sources=args.sources, k=args.k, method=method, sketch_rank=rank,
                sketch_matmul_dtype=matmul, chunk_size=args.chunk_size, progress=False,
            )  # fmt: skip
            synchronize()
            seconds = time.perf_counter() - start
        label = method
        if method == "sketch":  # the rank and matmul dtype it ran with
            label = f"sketch r={atlas.sketch_rank} {atlas.sketch_matmul_dtype}"
        results[label] = (atlas, seconds, grown[0])
    exact, exact_s, _ = results["exact"]
    reference_s, iterations = float("nan"), []
    if not args.no_reference:
        reference_s = 0.0
        for s, t in exact.pairs():
            synchronize()
            start = time.perf_counter()
            op = tps.LayerJacobian(model, prompt, s, t)
            synchronize()
            setup = time.perf_counter() - start
            target = (exact.singular_values[s, t].double(), exact.vectors(s, t).double())
            seconds, n_iters, _ = time_reference(op, target, 1e-3, float("inf"), k=args.k)
            reference_s += setup + seconds
            iterations.append(n_iters)
    weights_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    print(
        f"reference (pair by pair, to 1e-3): {reference_s:.1f} s; fp32 weights {weights_mb:.0f} MB"
    )
    if iterations:
        print(
            f"  power iterations it needed per pair: median {statistics.median(iterations):g}, "
            f"max {max(iterations)}"
        )
    tokens = (prompt if isinstance(prompt, torch.Tensor) else model.to_tokens(prompt)).shape[1]
    floor_s, rate = matmul_floor(
        model.cfg, exact.pairs(), tokens, exact.target_positions, args.chunk_size, device
    )
    print(
        f"matrix products of exact alone, at this {device.type.upper()}'s fp32 GEMM rate "
        f"({rate / 1e9:.0f} GFLOP/s): {floor_s:.2f} s, at most {reference_s / floor_s:.1f}x vs ref"
    )
    print(
        f"{'method':>24} {'seconds':>9} {'vs ref':>8} {'vs exact':>9} {'peak/weights':>13} "
        f"{'median err':>11} {'worst err':>10} {'worst pair':>11}"
    )
    worst_sketch: tuple[float, int, int] = (-1.0, 0, 0)
    for method, (atlas, seconds, grown) in results.items():
        rel = (atlas.singular_values - exact.singular_values).abs() / exact.singular_values
        worst = rel.nan_to_num(-1).amax(dim=-1)
        s_w, t_w = divmod(int(worst.argmax()), atlas.n_layers)
        flat = rel[~rel.isnan()]
        print(
            f"{method:>24} {seconds:9.1f} {reference_s / seconds:7.1f}x {exact_s / seconds:8.2f}x "
            f"{grown / weights_mb:13.2f} {flat.median().item():11.2e} {flat.max().item():10.2e} "
            f"{f'L{s_w} -> L{t_w}':>11}",
            flush=True,
        )
        if atlas.method == "sketch" and flat.max().item() > worst_sketch[0]:
            worst_sketch = (flat.max().item(), s_w, t_w)
    if worst_sketch[0] >= 0:
        _, s_w, t_w = worst_sketch
        widths = {
            BASIS_FACTOR * a.sketch_rank for a, _, _ in results.values() if a.method == "sketch"
        }
        ranks = sorted({args.k, *widths})
        print(f"spectrum of L{s_w} -> L{t_w}: {spectrum_tail(model, prompt, s_w, t_w, ranks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
