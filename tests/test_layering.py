"""The import arrows of DESIGN.md: each module imports only its own layer or below, no two modules import each
other (not even lazily inside a function, nor under TYPE_CHECKING), and serving never imports training.

The import graph is read from the source (the AST of every file), so an import hidden in a function body counts
as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ursa"

# lower number = lower layer; a module may import its own layer and below. Keys are module names below `ursa`;
# the longest key that prefixes a module decides its layer.
LEVELS = {
    "errors": 0, "config": 0, "_io": 0, "imageio": 0, "_malloc": 0, "journal": 0,
    "trust": 0,  # numpy only: calibration, open-set scores and heat maps, fitted in train and applied in export
    "lessons": 0,  # stands alone: imports nothing from the rest of ursa (checked below); the CLI runs them
    # every layer draws through it (train's recorder and lr_find, data's show_batch), so it is a leaf
    "interpret.plots": 0,
    "collect": 1, "verify": 1, "data": 1, "models": 1,
    "train": 2,
    "interpret": 3,
    "interpret.active": 3, "interpret.suggest": 3, "interpret.plan": 3,  # what to label next (`ursa next`): embeddings and the run's head, below review
    "review": 3,  # interpret's ImageCleaner writes through review's journal, so review sits on interpret's layer
    "export": 4,
    "web": 5, "report": 5, "notebook": 5,  # notebook: the lesson's names, composing every stage below
    "cli": 6, "__main__": 6, "tasks": 6,
}  # fmt: skip
TOP = 7  # the `ursa` package itself: the notebook API, re-exported lazily from every layer
LEAVES = {"interpret.plots": {"errors", "config"}}  # module -> the only ursa modules it may import


def _name(path: Path) -> str:
    """src/ursa/train/learner.py -> ursa.train.learner; a package's __init__.py is the package."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = sorted(SRC.rglob("*.py"))
MODULES = {_name(p): p for p in FILES}


def _resolve(name: str) -> str:
    """The module an import of `name` runs last: `name` itself, else its longest prefix that is a module."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _edges(path: Path) -> list[tuple[str, int]]:
    """(ursa module imported, line) for every import in the file `path`."""
    return _edges_in(path.read_text(encoding="utf-8"), _name(path), is_package=path.name == "__init__.py")


def _edges_in(source: str, me: str, *, is_package: bool) -> list[tuple[str, int]]:
    """(ursa module imported, line) for every import in `source` (module `me`): top level, in functions, under
    TYPE_CHECKING.

    `from ursa.train import distributed` imports the module ursa.train.distributed; `from ursa.train import
    Learner` imports the package ursa.train (whose __init__ holds or re-exports the name). A module that calls
    importlib.import_module imports every ursa module named by a string in it (the lazy re-export tables).
    """
    package = me if is_package else me.rpartition(".")[0]
    tree = ast.parse(source)
    out: list[tuple[str, int]] = []
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
        elif (isinstance(node, ast.Attribute) and node.attr == "import_module") or (isinstance(node, ast.Name) and node.id == "import_module"):
            dynamic = True
    if dynamic:
        out += [(n.value, n.lineno) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in MODULES]
    return [(_resolve(m), line) for m, line in out if m == "ursa" or m.startswith("ursa.")]


GRAPH = {me: _edges(p) for me, p in MODULES.items()}


def _level(mod: str) -> int | None:
    """Layer of module `mod` (a full name); None when LEVELS does not place it."""
    if mod == "ursa":
        return TOP
    rel = mod.removeprefix("ursa.")
    keys = [k for k in LEVELS if rel == k or rel.startswith(k + ".")]
    return LEVELS[max(keys, key=len)] if keys else None


@pytest.mark.parametrize("path", [p for p in FILES if p.parent != SRC or p.name != "__init__.py"], ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    me = _name(path)
    if me.startswith("ursa.lessons"):
        others = {m for m, _ in GRAPH[me] if not m.startswith("ursa.lessons")}
        assert not others, f"{me} must not import the rest of ursa: {others}"
        return
    mine = _level(me)
    assert mine is not None, f"{me} is not placed in a layer; add it to LEVELS in {Path(__file__).name}"
    for target, line in GRAPH[me]:
        lvl = _level(target)
        where = f"{path.relative_to(SRC.parent)}:{line}"
        assert lvl is not None and lvl <= mine, f"{where}: {me} (layer {mine}) imports {target} (layer {lvl}): an arrow pointing up"
        if me.startswith("ursa.web"):
            assert not target.startswith("ursa.train"), f"{where}: {me} serves models and must not import {target}"


def _cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted({m for m, _ in graph[root] if m in graph and m != root})))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted({m for m, _ in graph[child] if m in graph and m != child}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(component: list[str]) -> str:
    members = set(component)
    arrows = sorted({f"  {m} -> {t}  ({MODULES[m].relative_to(SRC.parent)}:{line})" for m in component for t, line in GRAPH[m] if t in members and t != m})
    return f"{' <-> '.join(component)}:\n" + "\n".join(arrows)


def test_no_import_cycles() -> None:
    found = _cycles(GRAPH)
    assert not found, "modules that import each other (directly or around a circle):\n" + "\n".join(_describe(c) for c in found)


def test_cycle_finder_sees_lazy_and_package_imports() -> None:
    """The finder itself: a lazy import closing a circle is a cycle; importing a sibling through the package is not."""
    graph = {
        "ursa.a": [("ursa.b", 1)],
        "ursa.b": [("ursa.a", 9)],  # say, inside a function
        "ursa.p": [("ursa.p.x", 1), ("ursa.p.y", 2)],  # a package re-exporting its modules
        "ursa.p.x": [("ursa.p.y", 1)],  # `from ursa.p import y`, y a module
        "ursa.p.y": [],
    }
    assert _cycles(graph) == [["ursa.a", "ursa.b"]]
    graph["ursa.p.y"] = [("ursa.p", 3)]  # `from ursa.p import x` where x is a name the package re-exports
    assert sorted(_cycles(graph)) == [["ursa.a", "ursa.b"], ["ursa.p", "ursa.p.x", "ursa.p.y"]]


def test_edges_resolve_submodules_names_and_lazy_imports() -> None:
    source = """
from typing import TYPE_CHECKING
from ursa.train import distributed
from ursa.train import Learner
from . import schedule
from ..errors import UrsaError
import ursa.data.split as split
if TYPE_CHECKING:
    from ursa.models import Head
def f():
    from ursa.export import load_model
    return importlib.import_module(name)
TABLE = {"load": "ursa.review", "other": "not.a.module"}
"""
    got = {m for m, _ in _edges_in(source, "ursa.train.learner", is_package=False)}
    assert got == {"ursa.train.distributed", "ursa.train", "ursa.train.schedule", "ursa.errors", "ursa.data.split", "ursa.models", "ursa.export", "ursa.review"}
    assert {m for m, _ in _edges_in("from . import learner, VERSION", "ursa.train", is_package=True)} == {"ursa.train.learner", "ursa.train"}


def test_leaves_import_only_the_bottom() -> None:
    for leaf, allowed in LEAVES.items():
        got = {m.removeprefix("ursa.") for m, _ in GRAPH[f"ursa.{leaf}"]}
        assert got <= allowed, f"ursa.{leaf} must stay a leaf (every layer draws through it); it imports {got - allowed}"


def test_plots_imports_without_the_rest_of_interpret() -> None:
    """Importing ursa.interpret.plots runs interpret/__init__.py: it must not pull in analysis or issues (torch, cleanlab)."""
    code = "import sys, ursa.interpret.plots; print(' '.join(sorted(m for m in sys.modules if m.startswith('ursa'))))"
    got = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert got <= {"ursa", "ursa.interpret", "ursa.interpret.plots", "ursa.errors", "ursa.config"}, got


def test_matplotlib_lives_in_plots_and_lessons() -> None:
    def imports_matplotlib(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "matplotlib" for n in names):
                return True
        return False

    users = {_name(p) for p in FILES if imports_matplotlib(p)}
    assert users <= {"ursa.interpret.plots"} | {m for m in users if m.startswith("ursa.lessons")}, users
