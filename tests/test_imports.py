"""The package has no import cycle between its modules.

Every module under ``fastdiff/`` is parsed (``ast``, nothing is imported) and each ``import
fastdiff.x`` / ``from fastdiff[.x] import y`` / relative import becomes an edge of the module graph
of ``fastdiff.*`` -- at module level AND inside functions and methods (a deferred import is still
a dependency: it only hides the cycle from import time, the modules still cannot be understood
or split apart one without the other).  Imports under ``if TYPE_CHECKING:`` are skipped (they do
not run).  ``from fastdiff import x`` is an edge to ``fastdiff.x`` when ``x`` is a submodule.

Edges *to a package* (an ``__init__.py``: ``fastdiff``, ``fastdiff.sweeps``, ...) are left out:
a package's ``__init__`` only re-exports / registers its submodules, and Python runs it before
any of its submodules anyway, so an edge to it would make every submodule of a package that
re-exports them "cyclic".  (The one such function-level import today is
``fastdiff.sweeps.runner``'s ``import fastdiff.sweeps`` in a fresh Ray worker, which loads the
experiment modules so that they register themselves.)  Edges *from* a package are kept.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parent.parent / "fastdiff"
PKG = "fastdiff"


def _modules() -> Dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        if p.is_symlink() or any(part.startswith(".") for part in p.parts):
            continue
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _type_checking_nodes(tree) -> Set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def _resolve(name: str, mods) -> Optional[str]:
    """The longest prefix of ``name`` that is a module of the package (None: outside it)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in mods:
            return cand
        parts.pop()
    return None


def _edges(mod: str, path: Path, mods) -> Set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            targets = [f"{src}.{a.name}" for a in node.names] + [src]
        for t in targets:
            if t == PKG or t.startswith(PKG + "."):
                r = _resolve(t, mods)
                if r is not None:
                    out.add(r)
    out.discard(mod)
    return {m for m in out if mods[m].name != "__init__.py"}


def _graph():
    mods = _modules()
    return {m: _edges(m, p, mods) for m, p in mods.items()}


def _find_cycle(graph) -> Optional[List[str]]:
    color = {m: 0 for m in graph}  # 0 new, 1 on the stack, 2 done
    stack: List[str] = []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in color:
                continue
            if color[n] == 1:
                return stack[stack.index(n):] + [n]
            if color[n] == 0:
                c = visit(n)
                if c:
                    return c
        stack.pop()
        color[m] = 2
        return None

    for m in sorted(graph):
        if color[m] == 0:
            c = visit(m)
            if c:
                return c
    return None


def test_graph_sees_the_package():
    g = _graph()
    assert "fastdiff.sampling" in g and "fastdiff.steps" in g
    assert "fastdiff.steps" in g["fastdiff.sampling"]  # module-level "from fastdiff import steps as S"
    assert "fastdiff.dispatch" in g["fastdiff.steps"]  # "from fastdiff import dispatch": a submodule
    assert "fastdiff.ops.fused_step" in g["fastdiff.steps"]  # "from fastdiff.ops.fused_step import _fused_step"


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle (function-level imports included): " + " -> ".join(cycle)
