"""The ``tl-powersteer`` command (also ``python -m tl_powersteer``).

Subcommands:

* ``vectors``: Power Steering vectors for one (source, target) pair; prints a table and
  saves them to a ``.safetensors`` file.
* ``atlas``: the sensitivity atlas of every layer pair, with its HTML browser.
* ``demo``: the main job on the embedded model (Gemma 3 270M) with a built-in prompt that
  has a decision fork, writing its outputs to a folder it names at the end.

Every subcommand runs in-process through :func:`main`, which returns the exit code: bad
arguments print one line and return 2, before any model is loaded where possible, and
leave no output file behind.

>>> from tl_powersteer.cli import main
>>> main(["vectors", "--prompt", "hi", "--source", "3", "--target", "2"])
2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from .atlas import ATLAS_METHODS, sensitivity_atlas, validate_atlas_arguments
from .jacobian import JVP_METHODS
from .models import EMBEDDED_MODEL, KINDS, load_model
from .power_steering import PowerSteeringResult, power_steer

__all__ = ["DEMO_PAIR", "DEMO_PROMPT", "main"]

PROG = "tl-powersteer"
# A sentiment fork: Gemma 3 270M continues it with " a bit of a letdown", and a few of
# the (8, 16) vectors at small scales turn it warm, while random directions do not.
DEMO_PROMPT = "I watched the film last night. Honestly, the movie was"
DEMO_PAIR = (8, 16)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
_DEMO_MARKER = "summary.md"


class UsageError(Exception):
    """Bad command-line arguments: reported on one line with exit code 2."""


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
        "--positions",
        type=int,
        default=4,
        help="final tokens of each prompt read at the target (default: %(default)s)",
    )
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
    atlas.add_argument("--out", required=True, help="output folder (created if missing)")
    _model_options(atlas)
    atlas.set_defaults(run=_run_atlas)

    demo = sub.add_parser(
        "demo",
        help="run the main job on the embedded model",
        description=f"Compute Power Steering vectors of Gemma 3 270M for the pair "
        f"{DEMO_PAIR[0]} -> {DEMO_PAIR[1]} on a built-in decision-fork prompt "
        f"({DEMO_PROMPT!r}) and write them, with a table and a summary, to a folder.",
    )
    demo.add_argument(
        "--out",
        default="powersteer-demo",
        help="output folder; a previous demo folder there is replaced (default: %(default)s)",
    )
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="prompt (default: the built-in one)")
    _steer_options(demo, source=DEMO_PAIR[0], target=DEMO_PAIR[1])
    _model_options(demo)
    demo.set_defaults(run=_run_demo)
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
    if args.positions < 1:
        raise UsageError(f"--positions must be at least 1, got {args.positions}")
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
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
        "positions": args.positions,
        "seed": args.seed,
    }
    # A dry run of the checks: bad layers or sites fail here, before the folder exists.
    validate_atlas_arguments(model, args.prompt, **options)
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    result = sensitivity_atlas(model, args.prompt, checkpoint=out / "atlas.safetensors", **options)
    seconds = time.perf_counter() - start
    result.to_pandas().to_csv(out / "atlas.csv", index=False)
    result.to_html(out / "atlas.html", model=model)
    print(
        f"atlas of {len(result.pairs())} pairs ({result.method}) in {seconds:.1f} s; "
        f"open {(out / 'atlas.html').resolve()}"
    )
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """Checks that need no model, so that they fail before a slow load."""
    if args.k < 1:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    if args.positions < 1:
        raise UsageError(f"--positions must be at least 1, got {args.positions}")
    if args.max_iters < 1:
        raise UsageError(f"--max-iters must be at least 1, got {args.max_iters}")
    if not args.tol > 0:
        raise UsageError(f"--tol must be positive, got {args.tol}")
    if (args.source >= 0) == (args.target >= 0) and args.target <= args.source:
        raise UsageError(f"--target ({args.target}) must come after --source ({args.source})")


def _load(args: argparse.Namespace) -> Any:
    from transformers.utils import logging as hf_logging

    # Per-shard weight-loading bars drown the command's own output.
    hf_logging.disable_progress_bar()
    return load_model(args.model, kind=args.kind, device=args.device, dtype=_DTYPES[args.dtype])


def _compute(
    model: Any, prompts: list[str], args: argparse.Namespace
) -> tuple[PowerSteeringResult, float]:
    start = time.perf_counter()
    res = power_steer(
        model,
        prompts,
        args.source,
        args.target,
        k=args.k,
        source_site=args.source_site,
        target_site=args.target_site,
        positions=args.positions,
        jvp_method=args.jvp_method,
        tol=args.tol,
        max_iters=args.max_iters,
        seed=args.seed,
    )
    return res, time.perf_counter() - start


def _report(res: PowerSteeringResult, seconds: float) -> str:
    table = res.to_pandas().drop(columns=["source", "target"])
    status = "converged" if res.converged else "NOT converged (raise --max-iters)"
    lines = [
        f"model {res.model_name}: L{res.source} {res.source_site} -> L{res.target} "
        f"{res.target_site}, last {res.positions} tokens of {len(res.prompts or [])} prompt(s)",
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


def _summary(res: PowerSteeringResult, seconds: float, prompt: str) -> str:
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
            "Files:",
            "- `vectors.safetensors`: the vectors and their metadata; load with "
            "`tl_powersteer.load(path)`.",
            "- `vectors.csv`: the table above.",
            "",
            "Each row of `vectors` is a unit direction at the source hook. Add it, times a "
            "scale, to that hook during generation and compare with the unsteered text; "
            "try both signs, since singular vectors have none of their own.",
            "",
        ]
    )


def _run_demo(args: argparse.Namespace) -> int:
    _check_numbers(args)
    out = Path(args.out)
    if out.exists() and not (out.is_dir() and (out / _DEMO_MARKER).is_file()):
        raise UsageError(
            f"--out {str(out)!r} exists and is not a previous demo folder; choose another --out"
        )
    if not out.parent.is_dir():
        raise UsageError(f"the folder of --out does not exist: {str(out.parent)!r}")
    model = _load(args)
    res, seconds = _compute(model, [args.prompt], args)
    print(_report(res, seconds))
    # Written beside the destination and renamed at the end: no half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        res.save(tmp / "vectors.safetensors")
        res.to_pandas().to_csv(tmp / "vectors.csv", index=False)
        (tmp / _DEMO_MARKER).write_text(_summary(res, seconds, args.prompt))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"demo outputs written to {out.resolve()}")
    return 0


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
