"""Held-out steerability of Power Steering, its refinement, CAA, MELBO and random
directions on fork families of an embedded model, measured in one run.

For each family of ``tl_powersteer.forks`` (8 fit and 8 held-out prompts; the held-out
ones phrased differently, some with other answer words), ``tps.steerability`` finds every method's vectors for one layer
pair on the fit prompts and ``transfer`` measures them on the held-out prompts at five KL
budgets against 16 random directions. It prints each family's table at the budgets chosen
on the fit prompts, checks the targets below, and writes ``summary.md``, one figure per
family (``steerability-<family>.html``) and the results (``transfer-<family>.safetensors``,
which a rerun reads instead of measuring again) into ``--out``.

Targets, per family, for the best Power Steering-derived vector (plain or refined, the
one with the better ratio to random on the fit prompts) at its budget chosen on the fit
prompts, measured on the held-out prompts:

* at least 3x the random controls' mean |effect|;
* at least as far as CAA at the same budget;
* within reach of MELBO (at least 80% of its effect at the same budget) with at least 20x
  fewer passes.

A second, lean configuration is measured beside it on the same prompts and controls
(``transfer-<family>-lean.safetensors``): Power Steering stopped after ``--lean-iters``
block iterations with a block of k (2 iterations: 4k JVPs and VJPs), refined from the
surrogate's maximum alone (``starts="surrogate"``, no ascent rounds); and, as the control
that says whether Power Steering's subspace matters, the same refinement inside
``--subspaces`` random k-dimensional subspaces (``refined_random_subspace``, the one best
on the fit prompts). Its targets are checked against the first run's CAA and MELBO.

    python benchmarks/study_transfer.py --model gemma-3-270m --out study-gemma
    python benchmarks/study_transfer.py --model smollm2-135m-instruct --out study-smollm2
    python benchmarks/study_transfer.py --model path/to/tiny --families sentiment --quick
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import tl_powersteer as tps
from tl_powersteer.compare import MethodRun, find_vectors
from tl_powersteer.forks import ForkFamily, fork_families
from tl_powersteer.transfer import KL_BUDGETS

# Per embedded model: the layer pair (the demo's) and the target positions read.
SETTINGS: dict[str, dict[str, Any]] = {
    "gemma-3-270m": {"pair": (8, 16), "target_positions": 4},
    "smollm2-135m-instruct": {"pair": (6, 18), "target_positions": 1},
}
PS_METHODS = ("power_steering", "refined_power_steering")
SUBSPACE_CONTROL = "refined_random_subspace"


def targets(
    result: tps.TransferResult, baselines: tps.TransferResult | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The best Power Steering-derived row at its fit-chosen budget, and the target lines
    (CAA and MELBO read from ``baselines`` when given: the same prompts and controls)."""
    table = result.to_pandas()
    ours = table[table["method"].isin(PS_METHODS)]
    best = ours.loc[ours["fit_ratio"].idxmax()]
    others = table if baselines is None else baselines.to_pandas()
    at = others[others["budget"] == best["budget"]].set_index("method")
    lines = [
        f"best Power Steering-derived: {best['method']} ({best['vector']}, sign "
        f"{int(best['sign']):+d}) at KL {best['budget']:g} (chosen on the fit prompts)",
        f"  ratio to random {best['ratio']:.2f} [{best['ratio_low']:.2f}, "
        f"{best['ratio_high']:.2f}] (target >= 3: {best['ratio'] >= 3})",
    ]
    if "caa" in at.index:
        caa = at.loc["caa", "effect"]
        lines.append(
            f"  effect {best['effect']:.3f} vs CAA {caa:.3f} at the same KL "
            f"(target: at least as far: {best['effect'] >= caa})"
        )
    if "melbo" in at.index:
        melbo = at.loc["melbo"]
        fewer = melbo["passes"] / best["passes"]
        lines.append(
            f"  effect {best['effect']:.3f} vs MELBO {melbo['effect']:.3f} at the same KL "
            f"({best['effect'] / melbo['effect']:.0%} of it; target >= 80%: "
            f"{best['effect'] > 0 and best['effect'] >= 0.8 * melbo['effect']}), with {fewer:.1f}x fewer passes "
            f"({int(best['passes'])} vs {int(melbo['passes'])}; target >= 20x: {fewer >= 20})"
        )
    return best.to_dict(), lines


def lean_run(
    model: Any,
    family: ForkFamily,
    size: int,
    pair: tuple[int, int],
    *,
    k: int,
    iters: int,
    subspaces: int,
    refine_kl: float,
    target_positions: int,
) -> list[MethodRun]:
    """Power Steering after ``iters`` block iterations, its surrogate refinement, and the
    same refinement inside ``subspaces`` random k-dimensional subspaces."""
    source, target = pair
    fit = family.fit[:size]
    (ps,) = find_vectors(
        model, fit, source, target, methods=["power_steering"], k=k, max_iters=iters,
        block_size=k, target_positions=target_positions, progress=False,
    )  # fmt: skip
    options = dict(answers=family.answers, kl=refine_kl, starts="surrogate", rounds=0)
    refined = tps.refine_in_subspace(model, fit, ps.vectors, **options)  # type: ignore[arg-type]
    meta = refined.metadata
    runs = [
        ps,
        MethodRun(
            "refined_power_steering", [refined], ps.passes + meta["passes"],
            ps.seconds + meta["seconds"], "refined in the span of the lean vectors",
        ),
    ]  # fmt: skip
    controls, passes, seconds = [], [], []
    d_model = ps.vectors[0].direction.shape[0]
    for i in range(subspaces):
        basis = tps.random_vectors(d_model, source, "hook_mlp_out", k, seed=1000 + i)
        found = tps.refine_in_subspace(model, fit, basis, **options)  # type: ignore[arg-type]
        found.metadata["name"] = f"refined random subspace {i}"
        controls.append(found)
        passes.append(found.metadata["passes"])
        seconds.append(found.metadata["seconds"])
    runs.append(
        MethodRun(
            SUBSPACE_CONTROL,
            controls,
            round(sum(passes) / subspaces),
            sum(seconds) / subspaces,
            f"{subspaces} random {k}-dimensional subspaces, each refined",
        )
    )
    return runs


def spread(result: tps.TransferResult, method: str) -> str:
    """Each of a method's vectors on the held-out prompts, at the method's fit-chosen budget,
    in the direction it moved the fit prompts further, as a ratio to random."""
    row = result.summary().set_index("method").loc[method]
    table = result.candidates_table()
    mine = table[(table["method"] == method) & (table["budget"] == row["budget"])]
    ratios = []
    for _, rows in mine.groupby("vector", sort=False):
        pick = rows.loc[rows["fit_effect"].abs().idxmax()]
        way = 1 if pick["fit_effect"] >= 0 else -1
        ratios.append(way * pick["effect"] / row["random_mean"])
    return ", ".join(f"{r:.2f}" for r in ratios)


def lean_report(
    model: Any,
    family: ForkFamily,
    name: str,
    baselines: tps.TransferResult,
    args: argparse.Namespace,
    out: Path,
    size: int,
    pair: tuple[int, int],
) -> list[str]:
    """The lean configuration and the random-subspace control, measured like the others."""
    path = out / f"transfer-{name}-lean.safetensors"
    began = time.perf_counter()
    result = tps.load(path) if path.exists() else None
    if result is None or not result.complete:
        setting = SETTINGS.get(args.model, {"target_positions": 4})
        runs = lean_run(
            model, family, size, pair, k=args.k, iters=args.lean_iters,
            subspaces=2 if args.quick else args.subspaces, refine_kl=0.25,
            target_positions=setting["target_positions"],
        )  # fmt: skip
        result = tps.transfer(
            model, family.fit[:size], family.eval[:size], runs, answers=family.answers,
            eval_answers=family.eval_answers, kl_budgets=baselines.kl_budgets,
            controls=len(baselines.control_layers), checkpoint=str(path),
        )  # fmt: skip
    summary = result.summary()
    columns = ["method", "budget", "vector", "sign", "fit_effect", "effect", "effect_low",
               "effect_high", "random_mean", "ratio", "ratio_low", "ratio_high", "passes"]  # fmt: skip
    text = summary[columns].to_string(index=False, float_format=lambda x: f"{x:.3g}")
    _, lines = targets(result, baselines)
    each = spread(result, SUBSPACE_CONTROL)
    lines.append(f"  {SUBSPACE_CONTROL}: each subspace's vector on the held-out prompts: {each}")
    seconds = time.perf_counter() - began
    print(f"\n== {name}, lean ({seconds:.0f} s)\n{text}\n" + "\n".join(lines), flush=True)
    curve = result.to_pandas().pivot(index="budget", columns="method", values="ratio")
    return [
        f"### {name}: lean Power Steering ({args.lean_iters} block iterations, block {args.k}), "
        "surrogate refinement, random-subspace control",
        "",
        "```",
        text,
        "```",
        "",
        "```",
        curve.to_string(float_format=lambda x: f"{x:.2f}"),
        "```",
        "",
        *[line.strip() for line in lines],
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m", help="a name for tps.load_model")
    parser.add_argument("--out", default="study", help="folder for summary.md, figures, results")
    parser.add_argument("--families", nargs="+", default=None, help="default: all three")
    parser.add_argument(
        "--pair", default=None, help="source:target (default: the model's demo pair)"
    )
    parser.add_argument("--k", type=int, default=8, help="Power Steering vectors")
    parser.add_argument("--melbo-vectors", type=int, default=4)
    parser.add_argument("--melbo-steps", type=int, default=150)
    parser.add_argument("--controls", type=int, default=16)
    parser.add_argument(
        "--lean-iters", type=int, default=2, help="block iterations of the lean configuration"
    )
    parser.add_argument(
        "--subspaces", type=int, default=4, help="random subspaces refined as the control"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small run (4+4 prompts, 2 budgets, 4 controls)"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    model = tps.load_model(args.model)
    families = fork_families(model)
    chosen = args.families or list(families)
    unknown = [f for f in chosen if f not in families]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(families)}")
    setting = SETTINGS.get(args.model, {"pair": None, "target_positions": 4})
    if args.pair is not None:
        source, target = (int(x) for x in args.pair.split(":"))
    elif setting["pair"] is not None:
        source, target = setting["pair"]
    else:
        n = model.cfg.n_layers
        source, target = round(n * 4 / 9), round(n * 8 / 9)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = (0.1, 0.5) if args.quick else KL_BUDGETS
    size = 4 if args.quick else 8
    controls = 4 if args.quick else args.controls
    print(f"model {args.model}: L{source} -> L{target}, families {chosen}, budgets {budgets}")
    report = [f"# Held-out steerability on {args.model}, L{source} -> L{target}", ""]
    for name in chosen:
        family = families[name]
        path = out / f"transfer-{name}.safetensors"
        began = time.perf_counter()
        result = tps.load(path) if path.exists() else None
        if result is None or not result.complete:
            result = tps.steerability(
                model, family.fit[:size], family.eval[:size], source, target,
                answers=family.answers, eval_answers=family.eval_answers, k=args.k,
                melbo_vectors=args.melbo_vectors, melbo_steps=args.melbo_steps,
                kl_budgets=budgets, controls=controls,
                target_positions=setting["target_positions"], checkpoint=str(path),
            )  # fmt: skip
        tps.plot_steerability(result).write_html(out / f"steerability-{name}.html")
        summary = result.summary()
        columns = ["method", "budget", "vector", "sign", "fit_effect", "effect", "effect_low",
                   "effect_high", "random_mean", "random_q90", "ratio", "passes"]  # fmt: skip
        text = summary[columns].to_string(index=False, float_format=lambda x: f"{x:.3g}")
        _, lines = targets(result)
        seconds = time.perf_counter() - began
        print(f"\n== {name} ({seconds:.0f} s)\n{text}\n" + "\n".join(lines), flush=True)
        curve = result.to_pandas().pivot(index="budget", columns="method", values="ratio")
        report += [
            f"## {name}",
            "",
            f"Fit answers {result.fit_answers[0] if result.fit_answers else None}, held-out "
            f"answers {result.eval_answers[0] if result.eval_answers else None}; "
            f"{len(result.fit_prompts)} fit and {len(result.eval_prompts)} held-out prompts.",
            "",
            "Each method at its budget chosen on the fit prompts (held-out effect, bootstrap "
            "95% interval, random controls' mean and 90th percentile |effect|):",
            "",
            "```",
            text,
            "```",
            "",
            "Held-out ratio to random at every budget:",
            "",
            "```",
            curve.to_string(float_format=lambda x: f"{x:.2f}"),
            "```",
            "",
            *[line.strip() for line in lines],
            "",
        ]
        report += lean_report(model, family, name, result, args, out, size, (source, target))
    (out / "summary.md").write_text("\n".join(report))
    print(f"\nwritten: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
