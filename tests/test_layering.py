"""The import arrows of DESIGN.md: each module imports only its own level or below; serving never imports training."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ursa"

# lower number = lower layer; a module may import its own layer and below
LEVELS = {
    "errors": 0, "config": 0, "_io": 0,
    "collect": 1, "verify": 1, "data": 1, "models": 1,
    "train": 2, "interpret": 2,
    "review": 3, "export": 3,
    "web": 4, "report": 4, "cli": 5, "__main__": 5,
}  # fmt: skip


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    pkg = _module_name(path).split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level] if path.name != "__init__.py" else pkg[: len(pkg) - node.level + 1]
                out.add("ursa." + ".".join([*base, node.module or ""]).strip("."))
            elif node.module:
                out.add(node.module)
    return out


def _level(mod: str) -> int | None:
    return LEVELS.get(mod.split(".")[0])


MODULES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    me = _module_name(path)
    if me.startswith("lessons"):
        others = {i for i in _imports(path) if i.startswith("ursa") and not i.startswith("ursa.lessons")}
        assert not others, f"{me} must not import the rest of ursa: {others}"
        return
    mine = _level(me)
    assert mine is not None, f"{me} is not placed in a layer; add it to LEVELS"
    for imp in _imports(path):
        if not imp.startswith("ursa.") or imp.startswith("ursa.lessons"):
            continue
        target = imp.removeprefix("ursa.")
        lvl = _level(target)
        assert lvl is not None and lvl <= mine, f"{me} (layer {mine}) imports {imp} (layer {lvl}): an arrow pointing up"
        if me.startswith("web"):
            assert not target.startswith("train"), f"{me} serves models and must not import {imp}"


def test_matplotlib_lives_in_plots_and_lessons() -> None:
    users = {_module_name(p) for p in MODULES if any(i.split(".")[0] == "matplotlib" for i in _imports(p))}
    assert users <= {"interpret.plots"} | {m for m in users if m.startswith("lessons")}, users
