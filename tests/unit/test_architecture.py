"""The package's import graph, read with ``ast``: layers import only downward.

* no import cycle among the package's modules (imports under ``if TYPE_CHECKING:`` are
  for annotations only and do not count);
* no import of the package's own modules inside a function, where it would hide a cycle;
* no ``_private`` name imported from another module: what another module needs is public
  in its home module;
* the tests use the public API or ``tests/helpers.py``, never ``conftest`` imports or a
  ``_private`` name of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tl_powersteer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name an ``ImportFrom`` reads from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class Imports(ast.NodeVisitor):
    """Every import of a module: (imported module, names, inside a function, for types)."""

    def __init__(self, module: str, is_package: bool, modules: set[str]):
        self.module, self.is_package, self.modules = module, is_package, modules
        self.found: list[tuple[str, list[str], bool, bool, int]] = []
        self.depth = 0
        self.typing = 0

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_If(self, node: ast.If) -> None:
        typing = is_type_checking(node)
        self.typing += typing
        for child in node.body:
            self.visit(child)
        self.typing -= typing
        for child in node.orelse:
            self.visit(child)

    def add(self, target: str, names: list[str], line: int) -> None:
        self.found.append((target, names, self.depth > 0, self.typing > 0, line))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, [], node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = absolute(self.module, self.is_package, node)
        names = [alias.name for alias in node.names]
        # ``from . import x`` imports the module ``x`` when there is one.
        submodules = [n for n in names if f"{source}.{n}" in self.modules]
        for name in submodules:
            self.add(f"{source}.{name}", [], node.lineno)
        rest = [n for n in names if n not in submodules]
        if rest or not submodules:
            self.add(source, rest, node.lineno)


def package_imports() -> dict[str, list[tuple[str, list[str], bool, bool, int]]]:
    modules = all_modules()
    out = {}
    for name, path in modules.items():
        visitor = Imports(name, path.name == "__init__.py", set(modules))
        visitor.visit(ast.parse(path.read_text(), str(path)))
        out[name] = [
            item
            for item in visitor.found
            if item[0] == "tl_powersteer" or item[0].startswith("tl_powersteer.")
        ]
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, as the list of its modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    imports = package_imports()
    graph = {
        module: {target for target, _, _, typing, _ in found if not typing and target != module}
        for module, found in imports.items()
    }
    assert set(graph) >= {"tl_powersteer.adapters", "tl_powersteer.atlas.run"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_package_import_inside_a_function() -> None:
    hidden = [
        f"{module}:{line} imports {target}"
        for module, found in package_imports().items()
        for target, _, inside, _, line in found
        if inside
    ]
    assert not hidden, hidden


def test_no_private_name_crosses_a_module_boundary() -> None:
    crossing = [
        f"{module}:{line} imports {name} from {target}"
        for module, found in package_imports().items()
        for target, names, _, _, line in found
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert not crossing, crossing


@pytest.mark.parametrize("where", ["tests", "benchmarks", "docs", "notebooks"])
def test_tests_and_examples_use_the_public_api(where: str) -> None:
    """Tests, benchmarks and examples import public names only, and share helpers through
    ``tests/helpers.py`` rather than ``conftest``."""
    found = []
    for path in sorted((ROOT / where).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.module is None:
                continue
            shown = f"{path.relative_to(ROOT)}:{node.lineno}"
            if node.module.split(".")[-1] == "conftest":
                found.append(f"{shown} imports from conftest")
            if node.module.startswith("tl_powersteer"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                private = [n for n in private if not n.startswith("__")]
                if private or any(part.startswith("_") for part in node.module.split(".")):
                    found.append(f"{shown} imports {private or node.module}")
    assert not found, found


def readme_layers() -> dict[str, int]:
    """Each module or subpackage named in the README's "Where things live" table, with
    its row: the table lists them bottom layer first."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    layers = {}
    for row, line in enumerate(rows):
        for name in line.split("|")[1].replace("`", "").split(","):
            layers[name.strip().removesuffix(".py").removesuffix("/")] = row
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int:
    parts = module.split(".")[1:]
    assert parts and parts[0] in layers, f"{module} is not in README.md's Where things live"
    return layers[parts[0]]


def test_imports_go_down_the_readme_layers() -> None:
    """The README's table is the layer order: a module imports only from its own row or
    the rows above, and every module is in the table."""
    layers = readme_layers()
    assert layers["linalg"] < layers["io"] < layers["adapters"] < layers["cli"]
    upward = []
    for module, found in package_imports().items():
        if module in ("tl_powersteer", "tl_powersteer.__main__"):
            continue  # the package's front door imports everything
        mine = layer_of(module, layers)
        for target, _, _, _, line in found:
            if target != "tl_powersteer" and layer_of(target, layers) > mine:
                upward.append(f"{module}:{line} imports {target}, which sits above it")
    assert not upward, upward
