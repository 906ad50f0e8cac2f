"""Sensitivity atlas methods compared in one run: wall time, peak memory, error vs exact.

Runs ``sensitivity_atlas`` with the exact, sketch and (optionally) power methods on the
same pairs and prints, for each, seconds, speed-up over the reference, peak resident memory
growth as a multiple of the model's fp32 weights, and the error of its top-k singular values
against the exact ones (median and worst relative error over pairs and ranks, and the worst
pair). The reference is the original Power Steering algorithm run pair by pair
(double-backward JᵀJ w, block 12; ``bench_power.py``), each pair iterated until its top-k
singular values are within 1e-3 of the exact ones.

    python benchmarks/bench_atlas.py                          # tiny random GPT-2, offline
    python benchmarks/bench_atlas.py --model gemma-3-270m     # all 153 pairs of Gemma 3 270M
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from typing import Any

import torch
from bench_power import REAL_PROMPT, time_reference, tiny_gpt2

import tl_powersteer as tps


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.model is None:
        model = tiny_gpt2(args.d_model, args.layers)
        prompt: Any = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(0))
    else:
        model = tps.load_model(args.model, device="cpu")
        prompt = REAL_PROMPT
    n = model.cfg.n_layers
    print(f"model {args.model or 'tiny GPT-2'}: {n} layers, d_model {model.cfg.d_model}, "
          f"{n * (n - 1) // 2} pairs, top-{args.k}, CPU threads {torch.get_num_threads()}")  # fmt: skip
    results = {}
    for method in ["exact", *[m for m in args.methods if m != "exact"]]:
        before = peak_rss_mb()
        start = time.perf_counter()
        atlas = tps.sensitivity_atlas(model, prompt, k=args.k, method=method, progress=False)
        results[method] = (atlas, time.perf_counter() - start, peak_rss_mb() - before)
    exact, exact_s, _ = results["exact"]
    reference_s = float("nan")
    if not args.no_reference:
        reference_s = 0.0
        for s, t in exact.pairs():
            start = time.perf_counter()
            op = tps.LayerJacobian(model, prompt, s, t)
            setup = time.perf_counter() - start
            target = (exact.singular_values[s, t].double(), exact.vectors(s, t).double())
            seconds, _, _ = time_reference(op, target, 1e-3, float("inf"), k=args.k)
            reference_s += setup + seconds
    weights_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    print(
        f"reference (pair by pair, to 1e-3): {reference_s:.1f} s; fp32 weights {weights_mb:.0f} MB"
    )
    print(
        f"{'method':>8} {'seconds':>9} {'vs ref':>8} {'vs exact':>9} {'peak/weights':>13} "
        f"{'median err':>11} {'worst err':>10} {'worst pair':>11}"
    )
    for method, (atlas, seconds, grown) in results.items():
        rel = (atlas.singular_values - exact.singular_values).abs() / exact.singular_values
        worst = rel.nan_to_num(-1).amax(dim=-1)
        s_w, t_w = divmod(int(worst.argmax()), atlas.n_layers)
        flat = rel[~rel.isnan()]
        print(
            f"{method:>8} {seconds:9.1f} {reference_s / seconds:7.1f}x {exact_s / seconds:8.2f}x "
            f"{grown / weights_mb:13.2f} {flat.median().item():11.2e} {flat.max().item():10.2e} "
            f"{f'L{s_w} -> L{t_w}':>11}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
