"""The package layout keeps the rules docs/architecture.md states: imports point down the pipeline (the layer
table there), no import circle, no module over 400 lines, no CLI command function over 40 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "abliterate"
DOC = ROOT / "docs" / "architecture.md"
MAX_MODULE_LINES = 400
MAX_COMMAND_LINES = 40


def layer_table(text: str) -> dict[str, int]:
    """package -> layer, from the table between the layer markers of docs/architecture.md."""
    m = re.search(r"<!-- layers: begin.*?-->(.*?)<!-- layers: end -->", text, re.S)
    assert m, f"{DOC} has no layer table between '<!-- layers: begin' and '<!-- layers: end -->'"
    layers = {}
    for row in re.finditer(r"^\|\s*(\d+)\s*\|(.*)\|\s*$", m.group(1), re.M):
        for name in re.findall(r"`([\w.]+)`", row.group(2)):
            assert name not in layers, f"{name} appears twice in the layer table"
            layers[name] = int(row.group(1))
    return layers


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def package_of(module: str) -> str:
    """The layer-table name of a module: its subpackage, or the top-level module's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "abliterate"


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported abliterate module, line) for every import in the file, deferred ones included;
    `from abliterate.x import name` counts as importing abliterate.x.name when that is a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "abliterate"]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: relative import; the package imports absolutely"
            if (node.module or "").split(".")[0] != "abliterate":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in known else node.module, node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    return {m: [(t, line) for t, line in imports(m, p, set(mods)) if t != m] for m, p in mods.items()}


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, []):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, list[tuple[str, int]]], layers: dict[str, int]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        source = package_of(module)
        for target, line in targets:
            dest = package_of(target)
            if dest != source and layers[dest] >= layers[source]:
                bad.append(f"{module}:{line} imports {target} ({dest}, layer {layers[dest]}; "
                           f"{source} is layer {layers[source]})")
    return bad


def command_functions(path: Path) -> list[ast.FunctionDef]:
    """Functions decorated as click commands or groups."""
    tree = ast.parse(path.read_text(), str(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and any(
        re.search(r"\.(command|group)\b", ast.unparse(d)) for d in node.decorator_list)]


def code_lines(fn: ast.FunctionDef) -> int:
    """Lines of a function's body, its docstring (the command's --help text) excluded."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]
    return fn.end_lineno - body[0].lineno + 1


def test_every_package_has_a_layer_in_the_documented_import_rule():
    layers = layer_table(DOC.read_text())
    missing = sorted({package_of(m) for m in modules()} - set(layers))
    assert not missing, f"add {missing} to the layer table of docs/architecture.md"


def test_imports_only_point_down_the_pipeline():
    bad = upward_imports(import_graph(), layer_table(DOC.read_text()))
    assert not bad, "imports that point up the pipeline (see docs/architecture.md, Import rule):\n" + "\n".join(bad)


def test_no_import_circle_between_modules():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_is_longer_than_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules (over {MAX_MODULE_LINES} lines): {long}"


def test_no_cli_command_function_is_longer_than_40_lines():
    long = {f"{p.name}:{fn.name}": code_lines(fn) for p in sorted((PACKAGE / "cli").glob("*.py"))
            for fn in command_functions(p) if code_lines(fn) > MAX_COMMAND_LINES}
    assert not long, f"move logic into the library (command bodies over {MAX_COMMAND_LINES} lines): {long}"


# ---------------------------------------------------------------- the checks themselves catch what they should


def test_the_checks_catch_an_upward_import_a_circle_and_a_long_command(tmp_path):
    layers = {"abliterate": 0, "edit": 3, "cli": 9}
    graph = {"abliterate.edit.a": [("abliterate.cli.main", 3), ("abliterate", 1)],
             "abliterate.cli.main": [("abliterate.edit.a", 2)]}
    assert upward_imports(graph, layers) == ["abliterate.edit.a:3 imports abliterate.cli.main (cli, layer 9; "
                                             "edit is layer 3)"]
    assert cycles(graph) == [["abliterate.cli.main", "abliterate.edit.a"]]
    source = tmp_path / "cmd.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(41))
    source.write_text(f'import click\n\n\n@click.command()\ndef long():\n    """Help."""\n{body}\n')
    (fn,) = command_functions(source)
    assert code_lines(fn) == 41


@pytest.mark.parametrize("row, expected", [("| 3 | `edit`, `measure` |", {"edit": 3, "measure": 3}),
                                           ("| 0 | `errors`, `abliterate` (the version) |",
                                            {"errors": 0, "abliterate": 0})])
def test_the_layer_table_is_read_from_the_doc(row, expected):
    text = f"<!-- layers: begin -->\n| layer | packages |\n|---|---|\n{row}\n<!-- layers: end -->"
    assert layer_table(text) == expected
