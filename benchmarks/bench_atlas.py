"""Sensitivity atlas methods compared in one run: wall time, peak memory, error vs exact.

Runs ``sensitivity_atlas`` with the exact, sketch and (optionally) power methods on the
same pairs and prints, for each, seconds, ratio to the exact method's time, peak resident
memory growth, and the error of its top-k singular values against the exact ones (median
and max relative error over pairs and ranks).

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
from bench_power import REAL_PROMPT, tiny_gpt2

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
    print(
        f"{'method':>8} {'seconds':>9} {'vs exact':>9} {'peak +MB':>9} {'median err':>11} {'max err':>9}"
    )
    for method, (atlas, seconds, grown) in results.items():
        rel = (
            (atlas.singular_values - exact.singular_values).abs() / exact.singular_values
        ).flatten()
        rel = rel[~rel.isnan()]
        print(
            f"{method:>8} {seconds:9.1f} {exact_s / seconds:8.2f}x {grown:9.0f} "
            f"{rel.median().item():11.2e} {rel.max().item():9.2e}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
