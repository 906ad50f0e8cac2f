"""What each subcommand does, with the library doing the work: checks that need no model
first (so that bad input fails before a slow load), then the library calls, then the
outputs, written atomically."""

from __future__ import annotations

import argparse
import signal
import time
import webbrowser
from pathlib import Path
from typing import Any

import torch

from ..adapters import ModelAdapter
from ..atlas import (
    SensitivityAtlas,
    merge_atlases,
    sensitivity_atlas,
    token_effects,
    validate_atlas_arguments,
)
from ..browse import AtlasServer
from ..chat import chat_prompt
from ..compare import check_method_options, find_vectors
from ..doctor import doctor
from ..effect_map import AtlasEffects, atlas_effects
from ..effects import check_metric, effects_and_generations
from ..io import atomic_file, atomic_folder, check_destination, check_output_folder, load
from ..models import EMBEDDED_MODEL, load_model
from ..plotting import atlas_html
from ..power_steering import PowerSteeringResult
from ..scales import check_scales
from ..vectors import SteeringVector
from .parser import DEMO_OPTIONS, DEMOS, DTYPES, UsageError

__all__ = [
    "COMMANDS",
    "demo_settings",
    "run_atlas",
    "run_browse",
    "run_demo",
    "run_doctor",
    "run_merge",
    "run_steer",
    "run_vectors",
]

# A folder holding this file is an earlier output of ``steer`` or ``demo``: it may be replaced.
_MARKER = "summary.md"
# What each command writes into its --out folder (a previous output holds only these).
ATLAS_FILES = ("atlas.safetensors", "atlas.csv", "atlas.html", "effects.safetensors", "effects.csv")
OUTPUT_FILES = (
    _MARKER,
    "vectors",
    "vectors.safetensors",
    "vectors.csv",
    "effects.csv",
    "generations.csv",
)


def run_atlas(args: argparse.Namespace) -> int:
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
    _check_effect_map_options(args)
    out = check_output_folder(args.out, ATLAS_FILES, "--out", marker=ATLAS_FILES[0])
    model = _load(args)
    _check_answers(model, args)
    options = {
        "sources": args.sources,
        "targets": args.targets,
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
    effect_map = _effect_map(args, model, result, out)
    _write_atlas_page(result, out, token_effects(model, result, kl=args.kl), effect_map)
    print(
        f"atlas of {len(result.pairs())} pairs ({result.method_label}) in {seconds:.1f} s"
        + _effect_map_line(effect_map)
        + f"; open {(out / 'atlas.html').resolve()}"
    )
    return 0


def _check_effect_map_options(args: argparse.Namespace) -> None:
    """The page's options, checked before the model loads."""
    if not args.kl > 0 or args.kl == float("inf"):
        raise UsageError(f"--kl must be a positive number of nats, got {args.kl}")
    if args.answers is None:
        given = [f"--{name}" for name, default in
                 (("top", None), ("controls", 4), ("generate-tokens", 20))
                 if getattr(args, name.replace("-", "_")) != default]  # fmt: skip
        if given:
            raise UsageError(
                f"{', '.join(given)} apply to the effect map, which --answers A B asks for; "
                "add --answers or drop them"
            )
        return
    k = getattr(args, "k", None)
    if args.top is not None and (args.top < 1 or (k is not None and args.top > k)):
        raise UsageError(f"--top must be between 1 and --k ({k}), got {args.top}")
    if args.controls < 1:
        raise UsageError(f"--controls must be at least 1, got {args.controls}")
    if args.generate_tokens < 0:
        raise UsageError(f"--generate-tokens must be 0 or more, got {args.generate_tokens}")


def _effect_map(
    args: argparse.Namespace, model: Any, result: SensitivityAtlas, out: Path
) -> AtlasEffects | None:
    """The effect map of ``--answers``, kept in ``out`` as it goes (a rerun resumes)."""
    if args.answers is None:
        # A previous output's map belongs to another page: it would contradict this one.
        for name in ("effects.safetensors", "effects.csv"):
            (out / name).unlink(missing_ok=True)
        return None
    found = atlas_effects(
        model, result, answers=args.answers, kl=args.kl, top=args.top, controls=args.controls,
        generate=args.generate_tokens, checkpoint=out / "effects.safetensors",
    )  # fmt: skip
    with atomic_file(out / "effects.csv") as tmp:
        found.to_pandas().to_csv(tmp, index=False)
    return found


def _effect_map_line(found: AtlasEffects | None) -> str:
    if found is None:
        return ""
    table = found.to_pandas()
    return (
        f"; {int(table['beats_random'].sum())} of {len(table)} pairs beat random directions "
        f"at {found.kl:g} nats"
    )


def _write_atlas_page(
    result: SensitivityAtlas,
    out: Path,
    effects: dict[str, Any],
    effect_map: AtlasEffects | None = None,
) -> None:
    """atlas.csv and atlas.html beside the atlas's file in ``out``."""
    with atomic_file(out / "atlas.csv") as tmp:
        result.to_pandas().to_csv(tmp, index=False)
    atlas_html(result, out / "atlas.html", effects=effects, effect_map=effect_map)


def _atlas_file(given: str, what: str = "") -> Path:
    """An atlas file, given as itself or as the ``atlas --out`` folder that holds it."""
    path = Path(given)
    if path.is_dir():
        path = path / ATLAS_FILES[0]
    if not path.is_file():
        raise UsageError(f"{what}{given!r} is neither an atlas file nor a folder holding "
                         f"{ATLAS_FILES[0]}")  # fmt: skip
    return path


def run_merge(args: argparse.Namespace) -> int:
    out = check_output_folder(args.out, ATLAS_FILES, "--out", marker=ATLAS_FILES[0])
    paths = []
    for shard in args.shards:
        path = _atlas_file(shard, "shard ")
        if path.resolve().parent == out.resolve():
            raise UsageError(
                f"--out {args.out!r} holds the shard {shard!r}, which the merge would replace; "
                "choose another folder"
            )
        paths.append(path)
    _check_effect_map_options(args)
    # Before the model loads: shards that do not belong together fail fast.
    result = merge_atlases(paths)
    model = _load(args)
    _check_answers(model, args)
    # The page's effects refuse a model other than the shards' before anything is written.
    effects = token_effects(model, result, kl=args.kl)
    out.mkdir(exist_ok=True)
    result.save(out / ATLAS_FILES[0])
    effect_map = _effect_map(args, model, result, out)
    _write_atlas_page(result, out, effects, effect_map)
    print(
        f"merged {len(paths)} shards into an atlas of {len(result.pairs())} pairs "
        f"({result.method_label}, sources {result.sources[0]}..{result.sources[-1]})"
        + _effect_map_line(effect_map)
        + f"; open {(out / 'atlas.html').resolve()}"
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
    """The model, with ``--chat`` prompts rendered through its template."""
    model = load_model(args.model, kind=args.kind, device=args.device, dtype=DTYPES[args.dtype])
    if args.chat or args.system is not None or args.assistant_prefix:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]

        def render(text: str) -> str:
            messages = [*system, {"role": "user", "content": text}]
            return chat_prompt(model, messages, assistant_prefix=args.assistant_prefix)

        for option in ("prompt", "positive", "negative"):
            if getattr(args, option, None):
                setattr(args, option, [render(text) for text in getattr(args, option)])
    return model


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


def run_vectors(args: argparse.Namespace) -> int:
    _check_numbers(args)
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    out = check_destination(
        args.out or f"powersteer_L{args.source}_L{args.target}.safetensors", ".safetensors", "--out"
    )
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
    check_output_folder(out, OUTPUT_FILES, "--out", marker=_MARKER)


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
    check_scales(args.scales)


def _check_answers(model: Any, args: argparse.Namespace) -> None:
    """Answers must be single tokens of this model: checked before any computation."""
    for answer in args.answers or []:
        ModelAdapter(model).single_token(answer, "--answers")
    if args.answers:
        # atlas and merge generate no continuation the metric would read
        new_tokens = getattr(args, "max_new_tokens", 1)
        check_metric(ModelAdapter(model), "logit_diff", args.answers, None, new_tokens)


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


def run_steer(args: argparse.Namespace) -> int:
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


def demo_settings(args: argparse.Namespace) -> None:
    """Fill the options left unset from the model's demo (the default model's for others)."""
    demo = DEMOS.get(args.model) or DEMOS[EMBEDDED_MODEL]
    if args.prompt is None:
        args.prompt = list(demo.prompts)
    for option in DEMO_OPTIONS:
        if getattr(args, option) is None:
            value = getattr(demo, option)
            setattr(args, option, list(value) if isinstance(value, tuple) else value)
    if args.system is not None:
        args.chat = True


def run_demo(args: argparse.Namespace) -> int:
    demo_settings(args)
    _check_numbers(args)
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


def run_browse(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0 (a free port) to 65535, got {args.port}")
    path = _atlas_file(args.atlas)
    atlas = load(path)
    if not isinstance(atlas, SensitivityAtlas):
        raise UsageError(f"{str(path)!r} is no atlas (it holds {type(atlas).__name__})")
    effects_path = Path(args.effects) if args.effects else path.parent / "effects.safetensors"
    if args.effects and not effects_path.is_file():
        raise UsageError(f"--effects {args.effects!r} is no file")
    effect_map = load(effects_path) if effects_path.is_file() else None
    if effect_map is not None and not isinstance(effect_map, AtlasEffects):
        raise UsageError(f"{str(effects_path)!r} is no effect map (it holds "
                         f"{type(effect_map).__name__})")  # fmt: skip
    model = _load(args)
    server = AtlasServer(model, atlas, effect_map=effect_map, host=args.host, port=args.port)
    print(f"serving the atlas of {len(atlas.pairs())} pairs at {server.url} (Ctrl-C stops)",
          flush=True)  # fmt: skip
    if not args.no_browser:
        webbrowser.open(server.url)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # a scheduler's or kill's SIGTERM stops it as Ctrl-C does

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    report = doctor(model=args.model, kind=args.kind)
    print(report.to_text())
    return 0 if report.ok else 1


COMMANDS = {
    "vectors": run_vectors,
    "atlas": run_atlas,
    "merge": run_merge,
    "browse": run_browse,
    "steer": run_steer,
    "demo": run_demo,
    "doctor": run_doctor,
}
