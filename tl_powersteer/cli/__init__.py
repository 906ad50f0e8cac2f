"""The ``tl-powersteer`` command (also ``python -m tl_powersteer``): ``parser`` parses,
``commands`` does each subcommand's work through the library.

Subcommands:

* ``vectors``: Power Steering vectors for one (source, target) pair; prints a table and
  saves them to a ``.safetensors`` file.
* ``atlas``: the sensitivity atlas of every layer pair, with its HTML browser.
* ``browse``: the atlas page served live, generating from any vector on a click.
* ``merge``: one atlas from shards of it (``atlas --sources a:b``) computed as separate
  jobs.
* ``steer``: vectors from Power Steering, MELBO and (given contrast pairs) CAA for one
  pair, steered generations for both signs, and a table of measured effects.
* ``doctor``: versions and self-checks of the environment, for when something looks wrong.
* ``demo``: the main job on an embedded model with a decision fork of its own: on
  Gemma 3 270M (the default) a sentiment fork, on SmolLM2-135M-Instruct
  (``--model smollm2-135m-instruct``) yes/no questions under a system prompt, through its
  chat template. Vectors, steered generations and effects against random directions are
  written to a folder it names at the end.

Every subcommand runs in-process through ``main``, which returns the exit code: bad
arguments print one line and return 2, before any model is loaded where possible, and
leave no output file behind.

>>> from tl_powersteer.cli import main
>>> main(["vectors", "--prompt", "hi", "--source", "3", "--target", "2"])
2
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .commands import COMMANDS
from .parser import DEMO_ANSWERS, DEMO_PAIR, DEMO_PROMPT, PROG, UsageError, build_parser

__all__ = ["DEMO_ANSWERS", "DEMO_PAIR", "DEMO_PROMPT", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        code: int = COMMANDS[args.command](args)
        return code
    except (UsageError, ValueError, TypeError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
