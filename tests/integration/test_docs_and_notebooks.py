"""The notebooks and the documentation site stay complete and in step with the package.

The notebooks themselves are executed by ``scripts/test.sh`` (nbmake, on a tiny model) and
the site is built there with warnings as errors; these tests check what those runs cannot:
that stored notebooks carry no outputs, that the teaching notebook's exercises are wired up,
and that every public name and every subcommand has its place in the docs.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

import tl_powersteer as tps
from tl_powersteer.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_sensitivity_atlas", "03_teaching_jacobians", "04_compare_methods"]


def cells(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())["cells"])


def source(cell: dict[str, Any]) -> str:
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def test_every_notebook_is_there() -> None:
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    for cell in cells(path):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: clear outputs before committing"
            assert cell["execution_count"] is None, f"{path.name}: clear execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_takes_its_model_from_a_parameter_cell(path: Path) -> None:
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    first = code[0]
    assert "parameters" in first.get("metadata", {}).get("tags", [])
    assert "TL_POWERSTEER_NOTEBOOK_MODEL" in source(first)
    assert "MODEL =" in source(first)
    # Models are loaded from parameters read from the environment, never from a
    # hard-coded name, so that the test suite can point each at a tiny model.
    loads = [name for c in code for name in re.findall(r"load_model\((.*?)\)", source(c))]
    assert "MODEL" in loads
    for name in loads:
        assert re.search(rf"^{name} = os\.environ\.get\(\"TL_POWERSTEER_NOTEBOOK_\w*MODEL\"",
                         source(first), re.MULTILINE), name  # fmt: skip


def test_teaching_exercises_have_hidden_solutions_and_checks() -> None:
    path = ROOT / "notebooks" / "03_teaching_jacobians.ipynb"
    all_cells = cells(path)
    exercises = [
        i
        for i, c in enumerate(all_cells)
        if c["cell_type"] == "markdown" and source(c).lstrip().startswith("### Exercise")
    ]
    assert len(exercises) == 4
    for i in exercises:
        solution, check = all_cells[i + 1], all_cells[i + 2]
        assert solution["cell_type"] == "code"
        assert solution["metadata"].get("jupyter", {}).get("source_hidden") is True
        assert "solution" in solution["metadata"].get("tags", [])
        assert check["cell_type"] == "code" and "assert " in source(check)


def api_names() -> set[str]:
    found = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        found |= {m.split(".")[-1] for m in re.findall(r"^::: (\S+)", page.read_text(), re.M)}
    return found


def test_every_public_name_is_in_the_api_reference() -> None:
    missing = set(tps.__all__) - api_names() - {"__version__"}
    assert not missing, f"add to docs/api/: {sorted(missing)}"


def test_cli_reference_covers_every_subcommand() -> None:
    parser = build_parser()
    (subparsers,) = [a.choices for a in parser._actions if isinstance(a.choices, dict)]
    subcommands = set(subparsers)
    assert {"vectors", "atlas", "steer", "demo", "doctor"} <= subcommands
    page = (ROOT / "docs" / "cli.md").read_text()
    markers = set(re.findall(r"<!-- cli-help:\s*(\S*)\s*-->", page))
    assert subcommands | {""} == markers


def test_docs_hook_inserts_the_parsers_help() -> None:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    out = hooks.on_page_markdown("before\n<!-- cli-help: atlas -->\nafter")
    assert out.startswith("before\n```text\nusage: tl-powersteer atlas")
    assert "--method {auto,exact,power,sketch}" in out and out.endswith("```\nafter")


def test_nav_lists_every_page() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", config, re.M))
    assert pages == listed


PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_in_the_docs_parse(page: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    for block in blocks:
        compile(block, str(page), "exec")  # a SyntaxError names the page and line
