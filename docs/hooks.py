"""MkDocs hook: the command-line reference is the parser's own help, so it cannot go stale.

A line ``<!-- cli-help: SUBCOMMAND -->`` in a page becomes ``tl-powersteer SUBCOMMAND
--help`` as a code block (an empty SUBCOMMAND gives the top-level help).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

MARKER = re.compile(r"^<!-- cli-help:\s*(\S*)\s*-->$", re.MULTILINE)


def _help(subcommand: str) -> str:
    from tl_powersteer.cli import build_parser

    out = io.StringIO()
    width = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal; fix the width
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            build_parser().parse_args([*([subcommand] if subcommand else []), "--help"])
    finally:
        if width is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = width
    return out.getvalue().rstrip()


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return MARKER.sub(lambda m: f"```text\n{_help(m.group(1))}\n```", markdown)
