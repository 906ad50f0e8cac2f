"""Batched greedy generation (``batch_generations``, as the effect map makes its texts)
against one row at a time (``generate_steered``), in one run.

Steers one prompt with ``--rows`` random directions at one source hook, each at
``--relative`` times the hook's typical norm, and generates ``--tokens`` new tokens for
every row twice or three times:

* ``batch_generations`` with up to 256 rows per batch (the default) and with 64;
* ``generate_steered`` on the first ``--reference-rows`` rows, one row at a time (it also
  generates the unsteered text once).

It prints seconds per row for each and the ratios, and whether every reference row's text
equals the batched one (both are checked against the model's cache-free pass as they go).

    python benchmarks/bench_generation.py                     # Gemma 3 270M, 144 rows
    python benchmarks/bench_generation.py --rows 32 --tokens 10
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import tl_powersteer as tps
from tl_powersteer.adapters import ModelAdapter
from tl_powersteer.steering import batch_generations

DEMO_PROMPT = "I watched the film last night. Honestly, the movie was"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m", help="a name for tps.load_model")
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--source", type=int, default=9)
    parser.add_argument("--site", default="hook_mlp_out")
    parser.add_argument("--rows", type=int, default=144)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--relative", type=float, default=0.1)
    parser.add_argument("--reference-rows", type=int, default=16)
    args = parser.parse_args(argv)
    if not 1 <= args.reference_rows <= args.rows:
        parser.error("--reference-rows must be between 1 and --rows")
    warnings.filterwarnings("ignore")

    model = tps.load_model(args.model, device="cpu", progress=True)
    adapter = ModelAdapter.of(model)
    tokens = adapter.tokenize([args.prompt]).tokens
    hook = adapter.hook_name(args.source, args.site)
    scale = args.relative * tps.typical_norm(model, args.prompt, args.source, args.site)
    vectors = tps.random_vectors(adapter.d_model, args.source, args.site, args.rows, seed=0)
    deltas = torch.stack([scale * v.direction.double() for v in vectors])
    print(f"model: {args.model}, {tokens.shape[1]} prompt tokens, {args.rows} rows at {hook}, "
          f"{args.tokens} new tokens, CPU threads: {torch.get_num_threads()}")  # fmt: skip

    seconds = {}
    texts = {}
    for chunk in (256, 64):
        start = time.perf_counter()
        texts[chunk] = batch_generations(
            adapter, tokens, hook, deltas, max_new_tokens=args.tokens, chunk=chunk
        )
        seconds[chunk] = time.perf_counter() - start
        print(f"batch_generations, up to {chunk} rows a batch: {seconds[chunk]:.1f} s, "
              f"{seconds[chunk] / args.rows * 1e3:.0f} ms per row")  # fmt: skip

    chosen = vectors[: args.reference_rows]
    start = time.perf_counter()
    table = tps.generate_steered(model, args.prompt, chosen, [scale], signs=(1,),
                                 max_new_tokens=args.tokens, progress=False)  # fmt: skip
    one_by_one = time.perf_counter() - start
    per_row = one_by_one / (len(chosen) + 1)  # and the unsteered row
    print(f"generate_steered, one row at a time: {one_by_one:.1f} s for {len(chosen)} rows "
          f"and the unsteered one, {per_row * 1e3:.0f} ms per row")  # fmt: skip
    for chunk in (256, 64):
        print(
            f"speed-up per row, {chunk} rows a batch: {per_row / (seconds[chunk] / args.rows):.1f}x"
        )
    steered = table[table["vector"] != "baseline"]["text"].tolist()
    same = steered == texts[256][: len(chosen)] and texts[256] == texts[64]
    print(f"same texts (reference rows, and both batch sizes): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
