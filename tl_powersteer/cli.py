"""The ``tl-powersteer`` command (also ``python -m tl_powersteer``).

Subcommands:

* ``vectors``: Power Steering vectors for one (source, target) pair; prints a table and
  saves them to a ``.safetensors`` file.
* ``atlas``: the sensitivity atlas of every layer pair, with its HTML browser.
* ``steer``: vectors from Power Steering, MELBO and (given contrast pairs) CAA for one
  pair, steered generations for both signs, and a table of measured effects.
* ``doctor``: versions and self-checks of the environment, for when something looks wrong.
* ``demo``: the main job on the embedded model (Gemma 3 270M) with a built-in prompt that
  has a decision fork: vectors, steered generations and effects, written to a folder it
  names at the end.

Every subcommand runs in-process through ``main``, which returns the exit code: bad
arguments print one line and return 2, before any model is loaded where possible, and
leave no output file behind.

>>> from tl_powersteer.cli import main
>>> main(["vectors", "--prompt", "hi", "--source", "3", "--target", "2"])
2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from .adapters import ModelAdapter
from .atlas import ATLAS_METHODS, sensitivity_atlas, token_effects, validate_atlas_arguments
from .compare import STEER_METHODS, check_method_options, find_vectors
from .doctor import TINY_MODEL, doctor
from .effects import effects_and_generations
from .io import atomic_folder
from .jacobian import JVP_METHODS
from .models import EMBEDDED_MODEL, KINDS, load_model
from .plotting import atlas_html
from .power_steering import PowerSteeringResult
from .scales import SCALE_MODES
from .vectors import SteeringVector

__all__ = ["DEMO_ANSWERS", "DEMO_PAIR", "DEMO_PROMPT", "main"]

PROG = "tl-powersteer"
# A sentiment fork: Gemma 3 270M continues it with " a bit of a letdown", and a few of
# the (8, 16) vectors at small scales turn it warm, while random directions do not.
DEMO_PROMPT = "I watched the film last night. Honestly, the movie was"
DEMO_PAIR = (8, 16)
DEMO_ANSWERS = (" great", " terrible")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
_MARKER = "summary.md"
SKETCH_MATMULS = ("auto", "full", "bfloat16")


class UsageError(Exception):
    """Bad command-line arguments: reported on one line with exit code 2."""


class _FormerName(argparse.Action):
    """A renamed option's former spelling: it still works, with a note on stderr."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(
            f"{PROG}: {option} is now {new} (the old name goes in the next release)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=EMBEDDED_MODEL,
        help=f"{EMBEDDED_MODEL!r} (embedded, works offline), a local HuggingFace directory, "
        f"or a hub name (default: %(default)s)",
    )
    group.add_argument(
        "--kind",
        choices=KINDS,
        default="bridge",
        help="TransformerBridge or HookedTransformer (3.x only) (default: %(default)s)",
    )
    group.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    group.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="float32", help="(default: %(default)s)"
    )


def _steer_options(
    parser: argparse.ArgumentParser, *, source: int | None, target: int | None
) -> None:
    group = parser.add_argument_group("Power Steering")
    for name, default in (("source", source), ("target", target)):
        group.add_argument(
            f"--{name}",
            type=int,
            required=default is None,
            default=default,
            help=f"{name} layer, a block index; negatives count from the end"
            + ("" if default is None else " (default: %(default)s)"),
        )
    _jacobian_options(group, k=8, k_help="number of vectors")
    group.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="stop when the top-k singular values change less than this, relative "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--max-iters", type=int, default=50, help="iteration cap (default: %(default)s)"
    )
    group.add_argument(
        "--jvp-method",
        choices=JVP_METHODS,
        default="reverse",
        help="how J V is computed; both are exact (default: %(default)s)",
    )


def _jacobian_options(group: Any, *, k: int, k_help: str) -> None:
    """Options shared by every subcommand that forms layer Jacobians."""
    group.add_argument("--k", type=int, default=k, help=f"{k_help} (default: %(default)s)")
    group.add_argument(
        "--target-positions",
        type=int,
        default=4,
        help="final tokens of each prompt read at the target (default: %(default)s)",
    )
    # The former name, for one release.
    group.add_argument(
        "--positions", type=int, dest="target_positions", action=_FormerName,
        help=argparse.SUPPRESS,
    )  # fmt: skip
    group.add_argument(
        "--source-site",
        default="hook_mlp_out",
        help="hook suffix in the source block where vectors are added (default: %(default)s)",
    )
    group.add_argument(
        "--target-site",
        default="hook_mlp_out",
        help="hook suffix in the target block that is read (default: %(default)s)",
    )
    group.add_argument("--seed", type=int, default=0, help="random start (default: %(default)s)")


def _steering_options(
    parser: argparse.ArgumentParser, *, answers: list[str] | None, scales: list[float]
) -> None:
    """Options of the steered generations and the effect table (``steer`` and ``demo``)."""
    group = parser.add_argument_group("steering and effects")
    group.add_argument(
        "--scales",
        type=_number_list,
        default=scales,
        help="comma list of scales, in --scale-mode units (default: "
        + ",".join(f"{x:g}" for x in scales)
        + ")",
    )
    group.add_argument(
        "--scale-mode",
        choices=SCALE_MODES,
        default="kl",
        help="kl: next-token KL in nats; relative: times the activation's typical norm; "
        "absolute (default: %(default)s)",
    )
    group.add_argument(
        "--answers",
        nargs=2,
        default=answers,
        metavar=("A", "B"),
        help="two single-token answers of a decision fork; effects are logit(A) - logit(B)"
        + (" (default: %(default)s)" if answers else ", else the next-token KL"),
    )
    group.add_argument(
        "--max-new-tokens", type=int, default=30, help="tokens generated (default: %(default)s)"
    )
    group.add_argument(
        "--controls",
        type=int,
        default=2,
        help="random directions measured beside the vectors (default: %(default)s)",
    )


def _prompts_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="prompt text; repeat for several prompts (their Jacobians are stacked)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Power Steering: steering vectors from layer-to-layer Jacobians of "
        "TransformerLens models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    vectors = sub.add_parser(
        "vectors",
        help="compute Power Steering vectors for one layer pair",
        description="Compute the top-k Power Steering vectors of one (source, target) pair, "
        "print a table (singular values, residuals, passes) and save them.",
    )
    _prompts_option(vectors)
    _steer_options(vectors, source=None, target=None)
    vectors.add_argument(
        "--out",
        default=None,
        help="output .safetensors file (default: powersteer_L{source}_L{target}.safetensors)",
    )
    _model_options(vectors)
    vectors.set_defaults(run=_run_vectors)

    atlas = sub.add_parser(
        "atlas",
        help="map every (source, target) layer pair into a sensitivity atlas",
        description="Compute the top-k singular values and vectors of every layer pair and "
        "write atlas.safetensors, atlas.csv and atlas.html (an offline heatmap browser) to "
        "--out. Finished source layers are kept in --out/atlas.safetensors as they complete; "
        "rerunning the same command resumes.",
    )
    _prompts_option(atlas)
    atlas.add_argument(
        "--sources",
        type=_layer_range,
        default=None,
        help="source layers as start:stop (Python slice) or a comma list (default: all)",
    )
    atlas.add_argument(
        "--targets",
        type=_layer_range,
        default=None,
        help="target layers as start:stop (Python slice) or a comma list (default: all)",
    )
    atlas.add_argument(
        "--method",
        choices=ATLAS_METHODS,
        default="auto",
        help="exact, power, sketch, or auto by model size (default: %(default)s)",
    )
    _jacobian_options(atlas, k=4, k_help="singular values kept per pair")
    sketch = atlas.add_argument_group("sketch method (--method sketch, or auto where it picks it)")
    sketch.add_argument(
        "--sketch-rank",
        type=int,
        default=None,
        metavar="R",
        help="r, the sketch's width: larger is slower and more accurate, d_model is exact "
        "(default: the larger of 3k + 2 and d_model / 48)",
    )
    sketch.add_argument(
        "--sketch-matmuls",
        choices=SKETCH_MATMULS,
        default="auto",
        help="precision of the sketch's matrix products: bfloat16 factors (faster on a CPU "
        "with AVX512-BF16 or AMX, about 0.5%% error per product), full (the model's dtype: "
        "every machine agrees to rounding), or auto: bfloat16 for a float32 model on such "
        "a CPU, else full (default: %(default)s)",
    )
    atlas.add_argument("--out", required=True, help="output folder (created if missing)")
    _model_options(atlas)
    atlas.set_defaults(run=_run_atlas)

    steer = sub.add_parser(
        "steer",
        help="find vectors for one pair with several methods, steer, and measure",
        description="Find steering vectors for one (source, target) pair with Power Steering, "
        "MELBO and, given --positive/--negative pairs, CAA; generate from the first prompt "
        "with each vector at each scale and both signs; measure each vector's effect on every "
        "prompt (the logit difference of --answers, else the next-token KL), with random "
        "directions as control. Writes vectors/, generations.csv, effects.csv and summary.md "
        "to --out.",
    )
    _prompts_option(steer)
    _steer_options(steer, source=None, target=None)
    group = steer.add_argument_group("methods and steering")
    group.add_argument(
        "--methods",
        type=_method_list,
        default=None,
        help=f"comma list from {', '.join(STEER_METHODS)} (default: power_steering,melbo, "
        "and caa when --positive/--negative are given)",
    )
    group.add_argument(
        "--positive", action="append", default=None, help="CAA positive prompt; repeat"
    )
    group.add_argument(
        "--negative", action="append", default=None, help="CAA negative prompt, paired; repeat"
    )
    group.add_argument(
        "--melbo-radius",
        type=float,
        default=None,
        help="MELBO vector norm (default: the source activation's robust typical norm)",
    )
    group.add_argument(
        "--melbo-steps", type=int, default=200, help="MELBO steps per vector (default: %(default)s)"
    )
    _steering_options(steer, answers=None, scales=[0.5, 2.0])
    steer.add_argument(
        "--out",
        required=True,
        help="output folder; must be new, empty, or a previous output of this command",
    )
    _model_options(steer)
    steer.set_defaults(run=_run_steer)

    demo = sub.add_parser(
        "demo",
        help="run the main job on the embedded model",
        description=f"Compute Power Steering vectors of Gemma 3 270M for the pair "
        f"{DEMO_PAIR[0]} -> {DEMO_PAIR[1]} on a built-in decision-fork prompt "
        f"({DEMO_PROMPT!r}), steer generations with them (both signs, at matched KL), "
        f"measure how they move logit({DEMO_ANSWERS[0]!r}) - logit({DEMO_ANSWERS[1]!r}) "
        "against random directions, and write it all, with a summary, to a folder.",
    )
    demo.add_argument(
        "--out",
        default="powersteer-demo",
        help="output folder; a previous demo folder there is replaced (default: %(default)s)",
    )
    demo.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt; repeat for several (default: the built-in one)",
    )
    _steer_options(demo, source=DEMO_PAIR[0], target=DEMO_PAIR[1])
    _steering_options(demo, answers=list(DEMO_ANSWERS), scales=[1.0])
    _model_options(demo)
    demo.set_defaults(run=_run_demo)

    doctor = sub.add_parser(
        "doctor",
        help="print versions and check that this environment computes what it should",
        description="Print the versions of Python, torch, transformers, TransformerLens, this "
        "package and the embedded model, and where the model cache is; then run quick "
        "self-checks (KV-cache generation against cache-free generation, hook removal, "
        "JVP/VJP adjointness, the model cache's digests), each PASS or FAIL with a fix. "
        "Exits 1 if any check fails.",
    )
    doctor.add_argument(
        "--model",
        default=None,
        help=f"model whose generation is checked: {EMBEDDED_MODEL!r}, {TINY_MODEL!r} (a tiny "
        "random Gemma 3) or a local HuggingFace directory (default: the embedded model if "
        "it is converted, else the tiny one)",
    )
    doctor.add_argument(
        "--kind", choices=KINDS, default="bridge", help="model class (default: %(default)s)"
    )
    doctor.set_defaults(run=_run_doctor)
    return parser


def _layer_range(text: str) -> list[int] | slice:
    """``"2:10"`` as a slice (resolved against the model later) or ``"1,3,5"`` as a list."""
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            return slice(int(start) if start else None, int(stop) if stop else None)
        return [int(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected start:stop or a comma list of layers, got {text!r}"
        ) from err


def _method_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _number_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from err
    if any(not v == v or v in (float("inf"), float("-inf")) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be finite and non-negative, got {text!r}")
    return values


def _resolve_layers(value: list[int] | slice | None, n_layers: int) -> list[int] | None:
    if isinstance(value, slice):
        layers = list(range(n_layers))[value]
        if not layers:
            raise UsageError(f"the layer range selects no layer of the {n_layers}")
        return layers
    return value


def _run_atlas(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    if args.target_positions < 1:
        raise UsageError(f"--target-positions must be at least 1, got {args.target_positions}")
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    sketch_options = args.sketch_rank is not None or args.sketch_matmuls != "auto"
    if sketch_options and args.method not in ("sketch", "auto"):
        raise UsageError(
            f"--sketch-rank and --sketch-matmuls apply to --method sketch (or auto), not "
            f"{args.method}; drop them or choose --method sketch"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a folder")
    if not out.parent.is_dir():
        raise UsageError(f"the folder of --out does not exist: {str(out.parent)!r}")
    model = _load(args)
    n_layers = int(model.cfg.n_layers)
    options = {
        "sources": _resolve_layers(args.sources, n_layers),
        "targets": _resolve_layers(args.targets, n_layers),
        "k": args.k,
        "method": args.method,
        "source_site": args.source_site,
        "target_site": args.target_site,
        "target_positions": args.target_positions,
        "seed": args.seed,
        "sketch_rank": args.sketch_rank,
        "sketch_matmul_dtype": {
            "auto": None, "full": ModelAdapter(model).dtype, "bfloat16": torch.bfloat16
        }[args.sketch_matmuls],
    }  # fmt: skip
    # A dry run of the checks: bad layers or sites fail here, before the folder exists.
    validate_atlas_arguments(model, args.prompt, **options)
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    result = sensitivity_atlas(model, args.prompt, checkpoint=out / "atlas.safetensors", **options)
    seconds = time.perf_counter() - start
    result.to_pandas().to_csv(out / "atlas.csv", index=False)
    atlas_html(result, out / "atlas.html", effects=token_effects(model, result))
    print(
        f"atlas of {len(result.pairs())} pairs ({result.method_label}) in {seconds:.1f} s; "
        f"open {(out / 'atlas.html').resolve()}"
    )
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """Checks that need no model, so that they fail before a slow load."""
    if args.k < 1:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    if args.target_positions < 1:
        raise UsageError(f"--target-positions must be at least 1, got {args.target_positions}")
    if args.max_iters < 1:
        raise UsageError(f"--max-iters must be at least 1, got {args.max_iters}")
    if not args.tol > 0:
        raise UsageError(f"--tol must be positive, got {args.tol}")
    if (args.source >= 0) == (args.target >= 0) and args.target <= args.source:
        raise UsageError(f"--target ({args.target}) must come after --source ({args.source})")


def _load(args: argparse.Namespace) -> Any:
    return load_model(args.model, kind=args.kind, device=args.device, dtype=_DTYPES[args.dtype])


def _compute(
    model: Any, prompts: list[str], args: argparse.Namespace
) -> tuple[PowerSteeringResult, float]:
    (run,) = find_vectors(model, prompts, args.source, args.target, methods=["power_steering"],
                          **_power_steering_options(args))  # fmt: skip
    assert isinstance(run.result, PowerSteeringResult)
    return run.result, run.seconds


def _power_steering_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "k": args.k, "source_site": args.source_site, "target_site": args.target_site,
        "target_positions": args.target_positions, "jvp_method": args.jvp_method,
        "tol": args.tol, "max_iters": args.max_iters, "seed": args.seed,
    }  # fmt: skip


def _report(res: PowerSteeringResult, seconds: float) -> str:
    table = res.to_pandas().drop(columns=["source", "target"])
    status = "converged" if res.converged else "NOT converged (raise --max-iters)"
    lines = [
        f"model {res.model_name}: L{res.source} {res.source_site} -> L{res.target} "
        f"{res.target_site}, last {res.target_positions} tokens of {len(res.prompts or [])} prompt(s)",
        f"{res.iterations} iterations, {status}; {res.n_jvp} JVPs + {res.n_vjp} VJPs "
        f"in {seconds:.1f} s",
        table.to_string(
            index=False, formatters={"singular_value": "{:.4f}".format, "residual": "{:.1e}".format}
        ),
    ]
    return "\n".join(lines)


def _run_vectors(args: argparse.Namespace) -> int:
    _check_numbers(args)
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    out = Path(args.out or f"powersteer_L{args.source}_L{args.target}.safetensors")
    if out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors, got {str(out)!r}")
    if not out.parent.is_dir():
        raise UsageError(f"the folder of --out does not exist: {str(out.parent)!r}")
    model = _load(args)
    res, seconds = _compute(model, args.prompt, args)
    print(_report(res, seconds))
    res.save(out)
    print(f"saved {out}")
    return 0


def _summary(res: PowerSteeringResult, seconds: float, prompt: str, steering: list[str]) -> str:
    return "\n".join(
        [
            "# Power Steering demo",
            "",
            f"Prompt: {prompt!r}",
            "",
            "```",
            _report(res, seconds),
            "```",
            "",
            *steering,
            "Files:",
            "- `vectors.safetensors`: the vectors and their metadata; load with "
            "`tl_powersteer.load(path)`.",
            "- `vectors.csv`: the table of singular values above.",
            "- `effects.csv`, `generations.csv`: the steering tables above, per prompt.",
            "",
            "Each vector is a unit direction at the source hook, added times a scale during "
            "generation; both signs are tried, since singular vectors have none of their own. "
            "Random directions at the same KL are the control.",
            "",
        ]
    )


def _check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that holds anything but a previous output of this program."""
    if out.exists() and not (
        out.is_dir() and ((out / _MARKER).is_file() or not any(out.iterdir()))
    ):
        raise UsageError(
            f"--out {str(out)!r} exists and is not a previous output folder; choose another --out"
        )
    if not out.parent.is_dir():
        raise UsageError(f"the folder of --out does not exist: {str(out.parent)!r}")


def _write_folder(out: Path, write: Any) -> None:
    with atomic_folder(out) as tmp:
        write(tmp)


def _steering_methods(args: argparse.Namespace) -> list[str]:
    return check_method_options(
        args.methods, args.positive, args.negative, melbo_radius=args.melbo_radius,
        melbo_steps=args.melbo_steps, spell=lambda name: "--" + name.replace("_", "-"),
    )  # fmt: skip


def _check_steering(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.controls < 0:
        raise UsageError(f"--controls must be non-negative, got {args.controls}")


def _check_answers(model: Any, args: argparse.Namespace) -> None:
    """Answers must be single tokens of this model: checked before any computation."""
    for answer in args.answers or []:
        ModelAdapter(model).single_token(answer, "--answers")


def _steering_stage(
    model: Any, args: argparse.Namespace, vectors: list[SteeringVector]
) -> tuple[Any, Any, list[str]]:
    """Effects on every prompt and generations from the first, with their summary lines."""
    effects, texts = effects_and_generations(
        model, args.prompt, vectors, args.scales, answers=args.answers,
        scale_mode=args.scale_mode, controls=args.controls, max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )  # fmt: skip
    means = (
        effects.groupby(["vector", "method", "sign", "scale"], sort=False)[
            ["absolute_scale", "kl", "delta"]
        ]
        .mean()
        .reset_index()
    )
    measured = (
        f"logit({args.answers[0]!r}) - logit({args.answers[1]!r})" if args.answers else "the KL"
    )
    lines = [
        f"## Effects: change of {measured}, mean over prompts "
        f"(scales {args.scales} in {args.scale_mode} units)",
        "",
        "```",
        means.to_string(index=False, float_format="{:.4g}".format),
        "```",
        "",
        f"## Generations from {args.prompt[0]!r}",
        "",
        "Greedy, with the KV cache; every row was checked token by token against the "
        "model's own forward passes without it.",
        "",
        "```",
        texts.drop(columns=["site", "layer"]).to_string(index=False, max_colwidth=90),
        "```",
        "",
    ]
    return effects, texts, lines


def _run_steer(args: argparse.Namespace) -> int:
    _check_numbers(args)
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    methods = _steering_methods(args)
    _check_steering(args)
    out = Path(args.out)
    _check_out_folder(out)
    model = _load(args)
    _check_answers(model, args)
    runs = find_vectors(
        model, args.prompt, args.source, args.target, methods=methods,
        positive=args.positive, negative=args.negative, melbo_radius=args.melbo_radius,
        melbo_steps=args.melbo_steps, **_power_steering_options(args),
    )  # fmt: skip
    vectors = [v for run in runs for v in run.vectors]
    found = [run.summary for run in runs]
    for line in found:
        print(line)
    effects, texts, lines = _steering_stage(model, args, vectors)
    summary = "\n".join(
        [
            "# Steering",
            "",
            f"Prompts: {args.prompt!r}; pair L{args.source} {args.source_site} -> "
            f"L{args.target} {args.target_site}.",
            "",
            *[f"- {line}" for line in found],
            "",
            *lines,
            "Files: `vectors/*.safetensors` (load with `tl_powersteer.load`), "
            "`effects.csv` (per prompt), `generations.csv`.",
            "",
        ]
    )

    def write(folder: Path) -> None:
        (folder / "vectors").mkdir()
        for i, v in enumerate(vectors):
            v.save(folder / "vectors" / f"{i:02d}_{v.method}.safetensors")
        effects.to_csv(folder / "effects.csv", index=False)
        texts.to_csv(folder / "generations.csv", index=False)
        (folder / _MARKER).write_text(summary)

    _write_folder(out, write)
    print(summary)
    print(f"outputs written to {out.resolve()}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    _check_numbers(args)
    args.prompt = args.prompt or [DEMO_PROMPT]
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    _check_steering(args)
    out = Path(args.out)
    _check_out_folder(out)
    model = _load(args)
    _check_answers(model, args)
    res, seconds = _compute(model, args.prompt, args)
    print(_report(res, seconds))
    effects, texts, lines = _steering_stage(model, args, res.steering_vectors())
    summary = _summary(res, seconds, args.prompt[0], lines)
    print("\n".join(lines))

    def write(folder: Path) -> None:
        res.save(folder / "vectors.safetensors")
        res.to_pandas().to_csv(folder / "vectors.csv", index=False)
        effects.to_csv(folder / "effects.csv", index=False)
        texts.to_csv(folder / "generations.csv", index=False)
        (folder / _MARKER).write_text(summary)

    _write_folder(out, write)
    print(f"demo outputs written to {out.resolve()}")
    return 0


def _run_doctor(args: argparse.Namespace) -> int:
    report = doctor(model=args.model, kind=args.kind)
    print(report.to_text())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        code: int = args.run(args)
        return code
    except (UsageError, ValueError, TypeError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
