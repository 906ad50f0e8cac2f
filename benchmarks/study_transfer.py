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

A third part, the control for the default configuration
(``transfer-<family>-control.safetensors``), refines the same random subspaces the full way
(every start, 6 ascent rounds, as ``refined_power_steering`` is refined in the converged
subspace): it says how much of the refined vector's transfer the unsupervised subspace
adds over a random one. ``--parts`` measures only some of the three; every part whose file
is in ``--out`` and complete is read and reported too, and the lean and control parts
compare with the default part's result when there is one.

    python benchmarks/study_transfer.py --model gemma-3-270m --out study-gemma
    python benchmarks/study_transfer.py --model smollm2-135m-instruct --out study-smollm2
    python benchmarks/study_transfer.py --model gemma-3-270m --out study-gemma --parts control
    python benchmarks/study_transfer.py --model path/to/tiny --families sentiment --quick
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
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
PARTS = ("default", "lean", "control")
# The refinement's budget, in every part: matched KL at 0.25 nats on the fit prompts.
REFINE_KL = 0.25


@dataclass
class Study:
    """What every part of one run shares."""

    model: Any
    args: argparse.Namespace
    out: Path
    source: int
    target: int
    size: int  # fit and held-out prompts per family
    budgets: tuple[float, ...]
    controls: int
    subspaces: int
    target_positions: int


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
    options = dict(answers=family.answers, kl=REFINE_KL, starts="surrogate", rounds=0)
    refined = tps.refine_in_subspace(model, fit, ps.vectors, **options)  # type: ignore[arg-type]
    meta = refined.metadata
    runs = [
        ps,
        MethodRun(
            "refined_power_steering", [refined], ps.passes + meta["passes"],
            ps.seconds + meta["seconds"], "refined in the span of the lean vectors",
        ),
    ]  # fmt: skip
    d_model = ps.vectors[0].direction.shape[0]
    return [*runs, random_subspaces(model, fit, source, d_model, k, subspaces, options)]


def random_subspaces(
    model: Any,
    fit: list[str],
    source: int,
    d_model: int,
    k: int,
    subspaces: int,
    options: dict[str, Any],
) -> MethodRun:
    """``refine_in_subspace`` with ``options`` inside ``subspaces`` random k-dimensional
    subspaces at the source's MLP output; the same subspaces in every part (seeds 1000...),
    so that the lean and the full refinement are compared inside the same ones."""
    controls, passes, seconds = [], [], []
    for i in range(subspaces):
        basis = tps.random_vectors(d_model, source, "hook_mlp_out", k, seed=1000 + i)
        found = tps.refine_in_subspace(model, fit, basis, **options)
        found.metadata["name"] = f"refined random subspace {i}"
        controls.append(found)
        passes.append(found.metadata["passes"])
        seconds.append(found.metadata["seconds"])
    how = "surrogate start" if options.get("starts") == "surrogate" else "full refinement"
    return MethodRun(
        SUBSPACE_CONTROL,
        controls,
        round(sum(passes) / subspaces),
        sum(seconds) / subspaces,
        f"{subspaces} random {k}-dimensional subspaces, each refined ({how})",
    )


def ratios(result: tps.TransferResult, method: str) -> list[float]:
    """Each of a method's vectors on the held-out prompts, at the method's fit-chosen budget,
    in the direction it moved the fit prompts further, as a ratio to random."""
    row = result.summary().set_index("method").loc[method]
    table = result.candidates_table()
    mine = table[(table["method"] == method) & (table["budget"] == row["budget"])]
    found = []
    for _, rows in mine.groupby("vector", sort=False):
        pick = rows.loc[rows["fit_effect"].abs().idxmax()]
        way = 1 if pick["fit_effect"] >= 0 else -1
        found.append(way * pick["effect"] / row["random_mean"])
    return found


def spread(result: tps.TransferResult, method: str) -> str:
    return ", ".join(f"{r:.2f}" for r in ratios(result, method))


def measured(study: Study, family: ForkFamily, path: Path, runs: Any) -> tps.TransferResult:
    """The result in ``path``, measured (or finished) first unless it is complete there;
    ``runs`` is called only then."""
    result = tps.load(path) if path.exists() else None
    if result is None or not result.complete:
        result = tps.transfer(
            study.model, family.fit[: study.size], family.eval[: study.size], runs(),
            answers=family.answers, eval_answers=family.eval_answers,
            kl_budgets=study.budgets, controls=study.controls, checkpoint=str(path),
        )  # fmt: skip
    return result


def table_text(result: tps.TransferResult) -> str:
    columns = ["method", "budget", "vector", "sign", "fit_effect", "effect", "effect_low",
               "effect_high", "random_mean", "ratio", "ratio_low", "ratio_high", "passes"]  # fmt: skip
    return result.summary()[columns].to_string(index=False, float_format=lambda x: f"{x:.3g}")


def section(heading: str, result: tps.TransferResult, lines: list[str]) -> list[str]:
    curve = result.to_pandas().pivot(index="budget", columns="method", values="ratio")
    return [
        heading, "", "```", table_text(result), "```", "", "```",
        curve.to_string(float_format=lambda x: f"{x:.2f}"), "```", "",
        *[line.strip() for line in lines], "",
    ]  # fmt: skip


def wanted(args: argparse.Namespace, part: str, path: Path) -> bool:
    """A part is measured when asked for, and reported too when its file is complete."""
    return part in args.parts or (path.exists() and tps.load(path).complete)


def default_report(
    study: Study, family: ForkFamily, name: str
) -> tuple[tps.TransferResult, list[str]]:
    """Every method found by ``tps.steerability`` and measured, with its figure."""
    args, out, size = study.args, study.out, study.size
    path = out / f"transfer-{name}.safetensors"
    began = time.perf_counter()
    result = tps.load(path) if path.exists() else None
    if result is None or not result.complete:
        result = tps.steerability(
            study.model, family.fit[:size], family.eval[:size], study.source, study.target,
            answers=family.answers, eval_answers=family.eval_answers, k=args.k,
            melbo_vectors=args.melbo_vectors, melbo_steps=args.melbo_steps,
            kl_budgets=study.budgets, controls=study.controls,
            target_positions=study.target_positions, checkpoint=str(path),
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
    return result, [
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


def lean_report(
    study: Study, family: ForkFamily, name: str, baselines: tps.TransferResult | None
) -> list[str]:
    """The lean configuration and the random-subspace control, measured like the others."""
    began = time.perf_counter()
    args = study.args
    result = measured(
        study, family, study.out / f"transfer-{name}-lean.safetensors",
        lambda: lean_run(
            study.model, family, study.size, (study.source, study.target), k=args.k,
            iters=args.lean_iters, subspaces=study.subspaces,
            target_positions=study.target_positions,
        ),
    )  # fmt: skip
    _, lines = targets(result, baselines)
    each = spread(result, SUBSPACE_CONTROL)
    lines.append(f"  {SUBSPACE_CONTROL}: each subspace's vector on the held-out prompts: {each}")
    seconds = time.perf_counter() - began
    print(f"\n== {name}, lean ({seconds:.0f} s)", table_text(result), *lines, sep="\n", flush=True)
    heading = (
        f"### {name}: lean Power Steering ({args.lean_iters} block iterations, block "
        f"{args.k}), surrogate refinement, random-subspace control"
    )
    return section(heading, result, lines)


def control_report(
    study: Study, family: ForkFamily, name: str, baselines: tps.TransferResult | None
) -> list[str]:
    """The full refinement inside random subspaces: the control for the default part's
    refined vector, measured on the same prompts against the same random directions."""
    began = time.perf_counter()
    fit = family.fit[: study.size]
    d_model = study.model.cfg.d_model
    options = dict(answers=family.answers, kl=REFINE_KL)
    result = measured(
        study, family, study.out / f"transfer-{name}-control.safetensors",
        lambda: [random_subspaces(
            study.model, fit, study.source, d_model, study.args.k, study.subspaces, options
        )],
    )  # fmt: skip
    row = result.summary().set_index("method").loc[SUBSPACE_CONTROL]
    lines = [
        f"{SUBSPACE_CONTROL} (full refinement): pick at KL {row['budget']:g} (chosen on the fit "
        f"prompts), ratio to random {row['ratio']:.2f} [{row['ratio_low']:.2f}, "
        f"{row['ratio_high']:.2f}], {int(row['passes'])} passes per subspace",
        f"  each subspace's vector on the held-out prompts: {spread(result, SUBSPACE_CONTROL)}",
    ]
    if baselines is not None and "refined_power_steering" in baselines.methods:
        ours = baselines.summary().set_index("method").loc["refined_power_steering"]
        lines.append(
            f"  refined_power_steering (the converged subspace, refined the same way): ratio "
            f"{ours['ratio']:.2f} [{ours['ratio_low']:.2f}, {ours['ratio_high']:.2f}] at KL "
            f"{ours['budget']:g}; above the random subspaces' pick: "
            f"{bool(ours['ratio'] > row['ratio'])}, above each: "
            f"{bool(ours['ratio'] > max(ratios(result, SUBSPACE_CONTROL)))}"
        )
    seconds = time.perf_counter() - began
    print(
        f"\n== {name}, control ({seconds:.0f} s)", table_text(result), *lines, sep="\n", flush=True
    )
    heading = f"### {name}: the full refinement inside random subspaces (control)"
    return section(heading, result, lines)


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
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="the parts to measure (default: all three); those already in --out are reported",
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
    study = Study(
        model, args, out, source, target, size=4 if args.quick else 8,
        budgets=(0.1, 0.5) if args.quick else KL_BUDGETS,
        controls=4 if args.quick else args.controls,
        subspaces=2 if args.quick else args.subspaces,
        target_positions=setting["target_positions"],
    )  # fmt: skip
    print(f"model {args.model}: L{source} -> L{target}, families {chosen}, budgets {study.budgets}")
    report = [f"# Held-out steerability on {args.model}, L{source} -> L{target}", ""]
    for name in chosen:
        family = families[name]
        result = None
        if wanted(args, "default", out / f"transfer-{name}.safetensors"):
            result, lines = default_report(study, family, name)
            report += lines
        if wanted(args, "lean", out / f"transfer-{name}-lean.safetensors"):
            report += lean_report(study, family, name, result)
        if wanted(args, "control", out / f"transfer-{name}-control.safetensors"):
            report += control_report(study, family, name, result)
    (out / "summary.md").write_text("\n".join(report))
    print(f"\nwritten: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
