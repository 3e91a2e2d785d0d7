"""The layering contracts of DESIGN.md, read from the source (``ast``) and checked by importing.

- runtimes never import exporters (not even inside a function);
- the NumPy core and the bundle runtimes load no PyTorch;
- no import cycle among the package's modules (module-level imports: the ones that run at import);
- the library never imports the research code (``sun_edge.pocket``), except the ``eval``
  subcommand's import inside its ``cmd_eval`` (in ``sun_edge/cli.py`` or a ``sun_edge/cli_*.py``).

Each failure names the file, the line and the import statement.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir mapping)
PACKAGES = {"sun_edge": "sun_edge", "export": "sun_edge.export", "runtimes": "sun_edge.runtimes"}
RESEARCH = "sun_edge.pocket"
RESEARCH_ENTRY = "cmd_eval"  # the one function that may import it, in a CLI module
HEAVY = ("torch", "diffusers", "transformers")
TORCH_FREE = ["sun_edge.pipeline", "sun_edge.components", "sun_edge.runtimes.onnxruntime"]


@dataclass(frozen=True)
class Import:
    """One import statement's target module, where it is, and whether it runs at import time."""

    module: str  # the importing module
    path: Path
    line: int
    target: str  # the imported module (``from a import b``: ``a.b`` when that is a module, else ``a``)
    statement: str
    module_level: bool  # not inside a function (class bodies run at import) nor under ``if TYPE_CHECKING``
    function: str | None  # the innermost function around it

    def __str__(self) -> str:
        lazy = "" if self.module_level else f" (inside {self.function})" if self.function else " (under TYPE_CHECKING)"
        where = f"{self.path.relative_to(ROOT)}:{self.line}"
        return f"{where}: {self.module} imports {self.target}{lazy}: {self.statement}"


def _module_files() -> dict[str, Path]:
    files = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


MODULES = _module_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute module of a (possibly relative) ``from ... import`` base."""
    if level == 0:
        return name or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{name}" if name else package


def _targets(module: str, path: Path, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _resolve(module, path, node.level, node.module)
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    # importlib.import_module("literal")
    if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)) and node.args:
        name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        if name in ("import_module", "__import__") and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every import in ``module``'s source, marked module-level or not."""
    path = MODULES[module]
    source = path.read_text()
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool, function: str | None) -> None:
        for target in dict.fromkeys(_targets(module, path, node)):
            segment = ast.get_source_segment(source, node) or ast.unparse(node)
            found.append(Import(module, path, node.lineno, target, " ".join(segment.split()), module_level, function))
        inner_function = node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
        for child in ast.iter_child_nodes(node):
            inner = module_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                inner = False  # never runs
            visit(child, inner, inner_function)

    visit(ast.parse(source, str(path)), True, None)
    return tuple(found)


def _importers(prefix: str) -> list[Import]:
    return [i for m in MODULES for i in imports_of(m) if i.target == prefix or i.target.startswith(prefix + ".")]


def test_the_source_tree_is_what_the_test_reads():
    assert {"sun_edge.pipeline", "sun_edge.export.onnx", "sun_edge.runtimes.onnxruntime", "sun_edge.train.loop"} \
        <= MODULES.keys()
    assert any(i.target == "sun_edge.errors" for i in imports_of("sun_edge.pipeline"))


def test_runtimes_never_import_exporters():
    offending = [str(i) for i in _importers("sun_edge.export") if i.module.startswith("sun_edge.runtimes")]
    assert not offending, "runtimes must not import exporters:\n" + "\n".join(offending)


def test_the_library_never_imports_the_research_code():
    def allowed(i: Import) -> bool:
        cli = i.module == "sun_edge.cli" or i.module.startswith("sun_edge.cli_")
        return cli and i.function == RESEARCH_ENTRY

    offending = [str(i) for i in _importers(RESEARCH) if not i.module.startswith(RESEARCH) and not allowed(i)]
    assert not offending, f"the library must not import {RESEARCH} (only the CLI's {RESEARCH_ENTRY}, inside it):\n" + \
        "\n".join(offending)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` in a directed graph, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def import_graph(*, module_level_only: bool, within: str = "sun_edge") -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES if m == within or m.startswith(within + ".")}
    for module in graph:
        for i in imports_of(module):
            if i.target in graph and i.target != module and (i.module_level or not module_level_only):
                graph[module].add(i.target)
    return graph


def _explain(cycle: list[str], module_level_only: bool) -> str:
    lines = []
    for a, b in zip(cycle, cycle[1:]):
        first = next(i for i in imports_of(a) if i.target == b and (i.module_level or not module_level_only))
        lines.append(f"  {first}")
    return " -> ".join(cycle) + "\n" + "\n".join(lines)


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b", "c"}, "c": set()}) == ["b", "b"]


def test_no_import_cycle_at_import_time():
    cycle = find_cycle(import_graph(module_level_only=True))
    assert cycle is None, "import cycle among module-level imports: " + _explain(cycle, True)


def test_training_has_no_import_cycle_even_inside_functions():
    """The training modules form a stack (config, losses, data, ... < step < session < loop), lazy imports included."""
    cycle = find_cycle(import_graph(module_level_only=False, within="sun_edge.train"))
    assert cycle is None, "import cycle in sun_edge.train: " + _explain(cycle, False)


NO_TORCH_PROBE = """
import importlib, importlib.abc, json, sys, traceback

HEAVY = {heavy!r}
first = {{}}

class Record(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in HEAVY and top not in first:
            frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            first[top] = [f"{{f.filename}}:{{f.lineno}}: {{(f.line or '').strip()}}" for f in frames][-4:]
        return None

sys.meta_path.insert(0, Record())
importlib.import_module({module!r})
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(HEAVY))
print(json.dumps({{"loaded": loaded, "first": first}}))
"""


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_numpy_core_and_bundle_runtimes_load_no_torch(module):
    if module not in MODULES:
        pytest.skip(f"{module} does not exist yet")
    if module == "sun_edge.runtimes.onnxruntime":
        pytest.importorskip("onnxruntime")
    run = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE.format(heavy=HEAVY, module=module)],
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert run.returncode == 0, f"import {module} failed:\n{run.stderr[-3000:]}"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    how = "\n".join(f"{name}, first imported from:\n    " + "\n    ".join(report["first"].get(name, []))
                    for name in report["loaded"])
    assert not report["loaded"], f"import {module} loads {', '.join(report['loaded'])}:\n{how}"
