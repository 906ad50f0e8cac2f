"""The command line's parser: subcommands, options, and their types.

Parsing only: each subcommand's work is in ``tl_powersteer.cli.commands``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from ..atlas import ATLAS_METHODS
from ..compare import STEER_METHODS
from ..doctor import TINY_MODEL
from ..jacobian import JVP_METHODS
from ..models import EMBEDDED_MODEL, EMBEDDED_MODELS, KINDS
from ..scales import SCALE_MODES

__all__ = [
    "DEMO_ANSWERS",
    "DEMO_OPTIONS",
    "DEMO_PAIR",
    "DEMO_PROMPT",
    "DEMOS",
    "DTYPES",
    "Demo",
    "PROG",
    "SKETCH_MATMULS",
    "UsageError",
    "build_parser",
]

PROG = "tl-powersteer"
# A sentiment fork: Gemma 3 270M continues it with " a bit of a letdown", and a few of
# the (8, 16) vectors at small scales turn it warm, while random directions do not.
DEMO_PROMPT = "I watched the film last night. Honestly, the movie was"
DEMO_PAIR = (8, 16)
DEMO_ANSWERS = (" great", " terrible")


@dataclass(frozen=True)
class Demo:
    """What ``demo`` runs on one embedded model: its fork, pair and scales."""

    prompts: tuple[str, ...]
    source: int
    target: int
    answers: tuple[str, str]
    scales: tuple[float, ...]
    target_positions: int = 4
    system: str | None = None  # rendered through the chat template when set


DEMOS = {
    EMBEDDED_MODEL: Demo((DEMO_PROMPT,), *DEMO_PAIR, DEMO_ANSWERS, (1.0,)),
    # A yes/no fork under a system prompt: SmolLM2 mostly hedges ("While ...", "The ...");
    # on held-out questions, vector #2 of (6, 18) moves logit(Yes) - logit(No) about twice
    # as far as random directions at the same KL.
    "smollm2-135m-instruct": Demo(
        (
            "Should I learn to swim?",
            "Should I drink more water?",
            "Is it a good idea to save money?",
            "Should I adopt a cat?",
        ),
        6,
        18,
        ("Yes", "No"),
        (0.5,),
        target_positions=1,
        system="Answer with yes or no first.",
    ),
}
# Per-model options of ``demo``: left unset by the parser, filled from DEMOS.
DEMO_OPTIONS = ("source", "target", "answers", "scales", "target_positions", "system")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
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


def _model_options(parser: argparse.ArgumentParser, *, prompts: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=EMBEDDED_MODEL,
        help=f"an embedded model, offline ({', '.join(EMBEDDED_MODELS)}), a local "
        "HuggingFace directory, or a hub name (default: %(default)s)",
    )
    group.add_argument(
        "--kind",
        choices=KINDS,
        default="bridge",
        help="TransformerBridge or HookedTransformer (3.x only) (default: %(default)s)",
    )
    if not prompts:  # nothing to render through a chat template
        parser.set_defaults(chat=False, system=None, assistant_prefix="")
    else:
        group.add_argument(
            "--chat",
            action="store_true",
            help="render each prompt as a user message through the model's chat template",
        )
        group.add_argument(
            "--system",
            default=None,
            help="a system message before each chat prompt (implies --chat)",
        )
        group.add_argument(
            "--assistant-prefix",
            default="",
            help="text that starts the assistant's answer in each chat prompt (implies --chat)",
        )
    group.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    group.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="(default: %(default)s)"
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
        help="relative accuracy of the singular values: stop once their error bounds are "
        "below this (default: %(default)s)",
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


def _effect_map_options(parser: argparse.ArgumentParser) -> None:
    """Options of the page's effects (``atlas`` and ``merge``)."""
    group = parser.add_argument_group(
        "effects on the page (with --answers: the effect map against random directions)"
    )
    group.add_argument(
        "--answers",
        nargs=2,
        default=None,
        metavar=("A", "B"),
        help="two single-token answers of a decision fork: every pair's top vectors, both "
        "signs, and random directions at each source are scaled to --kl nats and their "
        "change of logit(A) - logit(B) is mapped (effects.safetensors, effects.csv)",
    )
    group.add_argument(
        "--kl",
        type=float,
        default=0.5,
        help="the next-token KL budget, in nats, every vector is scaled to on the page "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--top",
        type=int,
        default=None,
        help="vectors per pair in the effect map (default: 4, or --k if smaller)",
    )
    group.add_argument(
        "--controls",
        type=int,
        default=4,
        help="random directions per source layer in the effect map (default: %(default)s)",
    )
    group.add_argument(
        "--generate-tokens",
        type=int,
        default=20,
        help="tokens of greedy generation per vector, sign and control, shown on a click; "
        "0 for none (default: %(default)s)",
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

    atlas = sub.add_parser(
        "atlas",
        help="map every (source, target) layer pair into a sensitivity atlas",
        description="Compute the top-k singular values and vectors of every layer pair and "
        "write atlas.safetensors, atlas.csv and atlas.html (an offline heatmap browser) to "
        "--out; with --answers, also the effect map of every pair against random directions "
        "(effects.safetensors, effects.csv), shown on the page with generations. Finished "
        "source layers are kept in --out as they complete; rerunning the same command "
        "resumes.",
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
    _effect_map_options(atlas)
    _model_options(atlas)

    merge = sub.add_parser(
        "merge",
        help="merge atlas shards computed as separate jobs into one atlas",
        description="Combine atlases of different source layers (each from `atlas --sources "
        "a:b`, with every other argument the same) into one, and write atlas.safetensors, "
        "atlas.csv and atlas.html to --out, as `atlas` does. Shards that differ in anything "
        "but their sources, unfinished shards, and source layers computed by two shards "
        "with different results are refused. The model is loaded for the page's next-token "
        "effects and must be the one the shards were computed on.",
    )
    merge.add_argument(
        "shards",
        nargs="+",
        metavar="SHARD",
        help="an atlas .safetensors file, or an `atlas --out` folder holding one",
    )
    merge.add_argument(
        "--out",
        default="atlas",
        help="output folder; must be new, empty, or a previous atlas output (default: %(default)s)",
    )
    _effect_map_options(merge)
    _model_options(merge, prompts=False)

    browse = sub.add_parser(
        "browse",
        help="serve the atlas page live: generate from any vector and sign on a click",
        description="Serve the atlas page on this machine and open it in a browser. On it, "
        "a click on a pair and then on a vector's row generates from the prompt, KL budget "
        "and number of tokens set on the page, beside the unsteered text, up to three runs "
        "side by side. The server binds to 127.0.0.1, needs the token in the URL it prints, "
        "refuses requests to other host names, and runs one computation at a time. Ctrl-C "
        "stops it.",
    )
    browse.add_argument(
        "atlas",
        metavar="ATLAS",
        help="an atlas .safetensors file, or an `atlas --out` folder holding one",
    )
    browse.add_argument(
        "--effects",
        default=None,
        help="an effect map (.safetensors, from `atlas --answers`) for the page's effect views "
        "(default: effects.safetensors beside the atlas, if it is there)",
    )
    browse.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; another than loopback lets the network reach the model, "
        "guarded by the token only (default: %(default)s)",
    )
    browse.add_argument(
        "--port", type=int, default=0, help="port to listen on (default: a free one)"
    )
    browse.add_argument(
        "--no-browser", action="store_true", help="print the URL without opening a browser"
    )
    _model_options(browse, prompts=False)

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

    demo = sub.add_parser(
        "demo",
        help="run the main job on the embedded model",
        description="Compute Power Steering vectors on a built-in decision fork of the "
        "embedded model, steer generations with them (both signs, at matched KL), measure "
        "how they move the fork's logit difference against random directions, and write it "
        "all, with a summary, to a folder. Each embedded model has its own fork: "
        + "; ".join(
            f"{name}: {demo.prompts[0]!r}"
            + (f" as a chat under the system prompt {demo.system!r}" if demo.system else "")
            + f", pair {demo.source} -> {demo.target}, answers {list(demo.answers)}, "
            f"scales {list(demo.scales)}, --target-positions {demo.target_positions}"
            for name, demo in DEMOS.items()
        )
        + f". Other models get the {EMBEDDED_MODEL} demo's settings. Any option given "
        "overrides the demo's.",
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
    demo.set_defaults(**dict.fromkeys(DEMO_OPTIONS))
    for action in demo._actions:
        if action.dest in DEMO_OPTIONS and action.help:
            action.help = action.help.split(" (default")[0] + " (default: the model's demo)"

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
