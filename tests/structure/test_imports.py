"""The package's import graph has no circle, and the IM layer imports nothing of the runtime.

Every module under ``zim/`` is read as text, never imported: each ``import`` and
``from ... import`` at any depth counts (inside functions and under
``TYPE_CHECKING`` too, since a circle there is still a tangle a reader must hold
in mind), relative imports resolved; ``.pyx``/``.pxd`` files count by their
``import``, ``cimport`` and ``from ... (c)import`` lines.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.support import REPO_ROOT

PACKAGE_DIR = REPO_ROOT / "zim"

# The IM rules sit on the framework; the runtime (what assembles and runs a server) sits
# above them. An arrow from the IM layer up into these would tie the rules to one runtime.
IM_LAYER = ("zim.im",)
RUNTIME = ("zim.server", "zim.router", "zim.worker", "zim.cli", "zim.app", "zim.nodes.node")

_CYTHON_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\b|c?import\s+([\w., ]+))", re.MULTILINE)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every zim module (``.py``, ``.pyx``, ``.pxd``) by dotted name."""
    modules: dict[str, Path] = {}
    for pattern in ("*.py", "*.pyx", "*.pxd"):
        for path in sorted(PACKAGE_DIR.rglob(pattern)):
            modules.setdefault(module_name(path), path)
    return modules


def _python_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # ``from zim import im`` imports the module zim.im, ``from zim import App`` zim itself
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return found


def _cython_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for source, names in _CYTHON_IMPORT.findall(path.read_text()):
        if source:
            found.add(source)
        else:
            found.update(item.split(" as ")[0].strip() for item in names.split(","))
    return found


def import_graph() -> dict[str, set[str]]:
    """zim module -> the zim modules it imports (a module names its package's
    ``__init__`` only by importing the package itself: ``import zim``)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        raw = _python_imports(path, name, modules) if path.suffix == ".py" else _cython_imports(path)
        graph[name] = {target for target in raw if target in modules and target != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as a path ``[a, b, ..., a]``, else None (depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for target in sorted(graph[node]):
            if colour[target] == GREY:
                return stack[stack.index(target):] + [target]
            if colour[target] == WHITE:
                circle = visit(target)
                if circle:
                    return circle
        stack.pop()
        colour[node] = BLACK
        return None

    for start in sorted(graph):
        if colour[start] == WHITE:
            circle = visit(start)
            if circle:
                return circle
    return None


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected parts of more than one module (Tarjan): every circle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    parts: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            part = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                part.add(member)
                if member == node:
                    break
            if len(part) > 1:
                parts.append(part)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return parts


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"zim", "zim.app", "zim.im", "zim._core", "zim.storage.store", "zim.nodes.node"} <= set(graph)
    assert "zim.app" in graph["zim"]            # __init__ re-exports the framework


def test_no_import_circle():
    graph = import_graph()
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(
        f"  {len(part)} modules ({', '.join(sorted(part))}), for example "
        f"{' -> '.join(find_circle({m: graph[m] & part for m in part}))}"
        for part in found)


def test_the_im_layer_imports_nothing_of_the_runtime():
    graph = import_graph()
    for module in IM_LAYER:
        above = sorted(reachable(graph, module) & set(RUNTIME))
        assert not above, f"{module} reaches the runtime: {', '.join(above)}"


def test_a_circle_is_found_and_named():
    """The test's own check: a made-up graph with a circle through a function-level import."""
    graph = {"zim.a": {"zim.b"}, "zim.b": {"zim.c"}, "zim.c": {"zim.a"}, "zim.d": {"zim.a"}}
    assert find_circle(graph) == ["zim.a", "zim.b", "zim.c", "zim.a"]
    assert circles(graph) == [{"zim.a", "zim.b", "zim.c"}]
    assert find_circle({"zim.a": {"zim.b"}, "zim.b": set()}) is None
