"""The house rules of the source tree, checked against the tree so the README's
architecture section cannot go stale.

The README's module table is the single statement of the layout: every module
under ``src/cimfs`` is named in it (a package row covers the modules inside
unless a row of their own says otherwise), with its floor.  Imports flow down
the floors, there are no import circles (function-local imports included:
they may defer an import, never hide a circle), every module says what it
owns in a docstring, and no module outgrows the size limit.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "cimfs"
MAX_LINES = 800
# Modules allowed past MAX_LINES, each with the reason (also stated in the README).
OVERSIZE: dict[str, str] = {}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _readme_floors() -> dict[str, int]:
    """README table rows: | `cimfs/a.py`, `cimfs/pkg/` | floor | what it owns |"""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layout of the code", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[1].isdigit():
            continue
        for path in re.findall(r"`(cimfs/[^`]*)`", cells[0]):
            rows[path] = int(cells[1])
    return rows


ROWS = _readme_floors()


def _floor(module: str) -> int:
    """The floor of the most specific README row naming the module."""
    rel = module.replace(".", "/")
    p = MODULES[module]
    candidates = [rel + ".py"] if p.name != "__init__.py" else [rel + "/__init__.py", rel + "/"]
    parts = rel.split("/")
    for i in range(len(parts) - 1, 0, -1):
        candidates.append("/".join(parts[:i]) + "/")
    for c in candidates:
        if c in ROWS:
            return ROWS[c]
    raise KeyError(module)


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported cimfs module, line, at module level) for every import in the module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    typing_only = set()
    for n in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            typing_only.update(id(c) for c in ast.walk(n))
    top_level = {id(n) for n in tree.body}
    for n in tree.body:  # imports under module-level if/try still run at import time
        if isinstance(n, (ast.If, ast.Try)):
            top_level.update(id(c) for c in ast.walk(n))
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for name in (target + "." + a.name for a in node.names):
                # "from pkg import sub" imports a module; "from mod import NAME" the module itself
                mod = name if name in MODULES else target
                if mod in MODULES:
                    found.append((mod, node.lineno, id(node) in top_level))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    found.append((a.name, node.lineno, id(node) in top_level))
    return found


def test_every_module_is_in_the_readme_table_and_every_row_exists():
    missing = [m for m in MODULES if not _covered(m)]
    assert not missing, f"modules not in the README's module table: {missing}"
    stale = [r for r in ROWS if not (SRC / r).exists()]
    assert not stale, f"README rows naming nothing in the tree: {stale}"


def _covered(module: str) -> bool:
    try:
        _floor(module)
    except KeyError:
        return False
    return True


def test_imports_flow_down_the_floors():
    up = []
    for m in MODULES:
        for target, line, _ in _imports(m):
            if target != m and _floor(target) > _floor(m) and not m.startswith(target + "."):
                up.append(f"{m}:{line} (floor {_floor(m)}) imports {target} (floor {_floor(target)})")
    assert not up, "imports running up the floors:\n" + "\n".join(up)


def test_no_import_circles():
    graph = {m: sorted({t for t, _, _ in _imports(m) if t != m}) for m in MODULES}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)
    # A package's __init__ re-exporting its submodules, which import the
    # package's siblings through it, is the one loop Python resolves by design;
    # anything else is a circle.
    real = [c for c in cycles if not _reexport_loop(c)]
    assert not real, "import circles:\n" + "\n".join(real)


def _reexport_loop(cycle: str) -> bool:
    mods = cycle.split(" -> ")
    pkg = mods[0] if all(x == mods[0] or x.startswith(mods[0] + ".") for x in mods) else None
    if pkg is None:
        return False
    # the package __init__ holds no code of its own: only imports and __all__
    tree = ast.parse(MODULES[pkg].read_text(encoding="utf-8"))
    return all(isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign, ast.AnnAssign)) for n in tree.body)


def test_function_local_imports_say_why():
    """A function-local import defers work (start-up time) or an optional dependency: the line (or the one
    above) says which, or the module states its rule once in a line starting ``# Function-local imports``."""
    silent = []
    for m, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        if any(line.startswith("# Function-local imports") for line in lines):
            continue
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    end = node.end_lineno or node.lineno
                    text = " ".join(lines[max(node.lineno - 2, 0) : end])  # the statement and the line above
                    if "#" not in text:
                        silent.append(f"{m}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not silent, "function-local imports without a comment saying why:\n" + "\n".join(silent)


def test_every_module_says_what_it_owns():
    bare = [m for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not bare, f"modules without a docstring: {bare}"


def test_no_module_outgrows_the_limit():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    unexplained = {m: n for m, n in big.items() if m not in OVERSIZE}
    assert not unexplained, f"modules over {MAX_LINES} lines: {unexplained}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith(".__main__")))  # __main__ runs
def test_each_module_imports_on_its_own(module):
    p = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
