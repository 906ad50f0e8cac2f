"""Cost of one block of Jacobian products: forward-mode JVP vs reverse-over-reverse vs VJP.

Times ``LayerJacobian.matvec`` with ``jvp_method="forward"`` (``torch.func.jvp``, vmapped)
and ``"reverse"`` (VJP of the linear pullback), and ``rmatvec``, on a block of 12 vectors,
and prints each as a ratio to one plain forward pass of the same segment, measured in the
same run. Both matvec methods are checked to agree before timing. The reverse matvec is
timed again with the model's weights frozen (``requires_grad_(False)``, common in
analysis notebooks): it should cost the same.

    python benchmarks/bench_products.py
    python benchmarks/bench_products.py --d-model 640 --layers 8
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable

import torch
from bench_power import tiny_gpt2

import tl_powersteer as tps


def per_call(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=20)
    parser.add_argument("--block", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    model = tiny_gpt2(args.d_model, args.layers)
    prompt = torch.randint(0, 1000, (1, args.seq), generator=torch.Generator().manual_seed(0))
    source, target = 1, args.layers - 2
    forward = tps.LayerJacobian(model, prompt, source, target, jvp_method="forward")
    reverse = tps.LayerJacobian(model, prompt, source, target, jvp_method="reverse")
    V = torch.randn(args.d_model, args.block)
    U = torch.randn(forward.shape[0], args.block)
    gap = (forward.matvec(V) - reverse.matvec(V)).abs().max().item()
    zero = torch.zeros(args.d_model)
    with torch.no_grad():
        base = per_call(lambda: forward.readout(zero), args.repeats)
    times = {
        "matvec forward (jvp)": per_call(lambda: forward.matvec(V), args.repeats),
        "matvec reverse (vjp of vjp)": per_call(lambda: reverse.matvec(V), args.repeats),
        "rmatvec (vjp)": per_call(lambda: reverse.rmatvec(U), args.repeats),
    }
    model.requires_grad_(False)
    times["matvec reverse, frozen weights"] = per_call(lambda: reverse.matvec(V), args.repeats)
    print(
        f"random GPT-2 d_model={args.d_model}, {args.layers} layers, {args.seq} tokens, "
        f"pair L{source} -> L{target}, block of {args.block}; methods agree to {gap:.1e}"
    )
    print(f"{'one forward pass of the segment':>32}: {base * 1e3:8.2f} ms  (1.00x)")
    for name, t in times.items():
        print(f"{name:>32}: {t * 1e3:8.2f} ms  ({t / base:5.2f}x forward)")
    ratio = times["matvec forward (jvp)"] / times["matvec reverse (vjp of vjp)"]
    print(f"forward-mode / reverse-over-reverse matvec: {ratio:.2f}x")
    frozen = times["matvec reverse, frozen weights"] / times["matvec reverse (vjp of vjp)"]
    print(f"reverse matvec, frozen / trainable weights: {frozen:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
