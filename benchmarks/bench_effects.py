"""The effect map against ``rank_vectors`` on the same vectors and controls, in one run.

Computes (or reads, with ``--atlas``) the sensitivity atlas of one prompt, then measures
every pair's top vectors, both signs, and ``--controls`` random directions per source at
``--kl`` nats of next-token KL twice:

* ``atlas_effects``: every row of a source layer searched together, the blocks before the
  source run once per source layer;
* ``rank_vectors(model, [prompt], vectors, holdout=None)``: the same vectors and controls,
  screened as a list (``--reference-sources`` limits it, and a second map run for the
  comparison, to some source layers: on the full atlas it takes far longer than the map).

It prints both wall times and their ratio, whether the two top-10 rankings (vector and
sign) agree, and the largest difference of an effect between them (``rank_vectors``
searches the scale to 1e-4 in log KL, the map to ``--tol``). The targets, for the full
Gemma 3 270M atlas on 2 CPU cores: the map within 120 s and at least 4x faster.

    python benchmarks/bench_effects.py                           # Gemma 3 270M, 153 pairs
    python benchmarks/bench_effects.py --atlas atlas.safetensors # computed once, then read
    python benchmarks/bench_effects.py --reference-sources 12:17 # reference on sources 12-16
    python benchmarks/bench_effects.py --no-reference            # the map alone
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings
from typing import Any

import torch

import tl_powersteer as tps

DEMO_PROMPT = "I watched the film last night. Honestly, the movie was"
TARGET_SECONDS, TARGET_RATIO = 120.0, 4.0


def top_rows(table: Any, n: int) -> list[tuple[str, int]]:
    return list(zip(table["vector"][:n], table["sign"][:n], strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m", help="a name for tps.load_model")
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--answers", nargs=2, default=[" great", " terrible"])
    parser.add_argument(
        "--atlas", default=None, help="read the atlas from this file, or write it there first"
    )
    parser.add_argument("--kl", type=float, default=0.5)
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--controls", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--no-reference", action="store_true", help="skip rank_vectors")
    parser.add_argument(
        "--reference-sources",
        default=None,
        help="start:stop: compare with rank_vectors on these source layers only (default all)",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    model = tps.load_model(args.model, device="cpu", progress=True)
    n_tokens = model.to_tokens(args.prompt).shape[1]
    print(f"model: {args.model}, {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{n_tokens} tokens, CPU threads: {torch.get_num_threads()}")  # fmt: skip
    if args.atlas is not None and os.path.exists(args.atlas):
        atlas = tps.load(args.atlas)
    else:
        start = time.perf_counter()
        atlas = tps.sensitivity_atlas(model, args.prompt, k=args.top, method="exact")
        print(f"atlas (exact, k={args.top}): {time.perf_counter() - start:.1f} s")
        if args.atlas is not None:
            atlas.save(args.atlas)
    pairs = [(s, t) for s, t in atlas.pairs() if s in atlas.completed_sources]
    n_rows = len(pairs) * args.top + len(atlas.completed_sources) * args.controls
    print(f"{len(pairs)} pairs x top {args.top} + {args.controls} random controls per source "
          f"= {n_rows} vectors, both signs, KL {args.kl} nats, answers {args.answers}")  # fmt: skip

    start = time.perf_counter()
    found = tps.atlas_effects(model, atlas, [args.prompt], answers=args.answers, kl=args.kl,
                              top=args.top, controls=args.controls, tol=args.tol)  # fmt: skip
    mine = time.perf_counter() - start
    ranking = found.ranking()
    pairs_table = found.to_pandas()
    print(f"atlas_effects: {mine:.1f} s (target <= {TARGET_SECONDS:.0f} s: "
          f"{mine <= TARGET_SECONDS}); {int(ranking['matched'].sum())}/{len(ranking)} rows at "
          f"the budget; {int(pairs_table['beats_random'].sum())}/{len(pairs_table)} pairs beat "
          "the random controls")  # fmt: skip
    print("best pairs:")
    best = pairs_table.reindex(pairs_table["best_effect"].abs().sort_values(ascending=False).index)
    print(best.head(5).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    if args.no_reference:
        return 0

    if args.reference_sources is not None:
        start_layer, stop_layer = (int(x) for x in args.reference_sources.split(":"))
        chosen = [s for s in atlas.completed_sources if start_layer <= s < stop_layer]
        atlas = dataclasses.replace(atlas, completed_sources=chosen)
        pairs = [(s, t) for s, t in pairs if s in chosen]
        start = time.perf_counter()
        found = tps.atlas_effects(model, atlas, [args.prompt], answers=args.answers, kl=args.kl,
                                  top=args.top, controls=args.controls, tol=args.tol)  # fmt: skip
        mine = time.perf_counter() - start
        ranking = found.ranking()
        print(f"source layers {chosen}: {len(pairs)} pairs; atlas_effects on them: {mine:.1f} s")
    vectors = atlas.steering_vectors(pairs, top=args.top)
    start = time.perf_counter()
    ranked = tps.rank_vectors(model, [args.prompt], vectors, kl=args.kl, answers=args.answers,
                              controls=args.controls, holdout=None)  # fmt: skip
    theirs = time.perf_counter() - start
    ratio = theirs / mine
    print(f"rank_vectors: {theirs:.1f} s; speed-up of the map: {ratio:.2f}x "
          f"(target >= {TARGET_RATIO:.0f}x: {ratio >= TARGET_RATIO})")  # fmt: skip
    same = top_rows(ranking, 10) == top_rows(ranked, 10)
    print(f"same top-10 (vector and sign): {same}")
    joined = ranking.set_index("vector").join(ranked.set_index("vector"), rsuffix="_reference")
    gap = (joined["effect"] - joined["effect_reference"]).abs()
    print(f"largest effect difference: {gap.max():.2e} (largest |effect| "
          f"{joined['abs_effect_reference'].max():.3g}); signs differ on "
          f"{int((joined['sign'] != joined['sign_reference']).sum())} of {len(joined)}")  # fmt: skip
    if not same:
        print("top-10 of the map:      ", top_rows(ranking, 10))
        print("top-10 of rank_vectors: ", top_rows(ranked, 10))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
