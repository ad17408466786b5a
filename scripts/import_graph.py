"""Print the import graph of the `circuits` package: each module's floor and any loop between folders.

A module's floor is 1 + the highest floor among the `circuits` modules it imports (anywhere in the
file, including imports inside functions, but not those under `if TYPE_CHECKING:`, which never run);
a module that imports none is on floor 1. The folder
graph has one node per subpackage (`circuits/attribution/`, ...) and one per module at the package's
top (`circuits/cli.py`, ...: the root is the package itself, not a stage); a loop between folders is
a cycle in that graph. Exit status 1 when there is a loop or more floors than `--max-floors`.

    python scripts/import_graph.py [--max-floors 7]
"""

from __future__ import annotations

import argparse
import ast
import sys
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "circuits"


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its `__init__`)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that `path` (module `name`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {_owner(m, known) for m in found if _owner(m, known)} - {name}


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
            yield from (n for orelse in child.orelse for n in [orelse, *_runtime_nodes(orelse)])
            continue
        yield child
        yield from _runtime_nodes(child)


def _owner(dotted: str, known: set[str]) -> str | None:
    while dotted and dotted not in known:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def folder(module: str, modules: dict[str, Path]) -> str:
    """The folder node of a module: its subpackage, or the module itself at the package's top."""
    parts = module.split(".")
    if len(parts) == 1:
        return module
    if len(parts) == 2 and modules[module].name != "__init__.py":
        return module  # a top-level module
    return ".".join(parts[:2])


def folder_loops(edges: dict[str, set[str]], modules: dict[str, Path]) -> list[list[str]]:
    """Cycles of the folder graph (its strongly connected components of more than one node)."""
    graph: dict[str, set[str]] = {}
    for src, dsts in edges.items():
        for dst in dsts:
            a, b = folder(src, modules), folder(dst, modules)
            if a != b and b != "circuits":
                graph.setdefault(a, set()).add(b)
    return [sorted(c) for c in _components(graph) if len(c) > 1]


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-floors", type=int, default=7)
    args = parser.parse_args()
    modules = module_names()
    edges = {name: imports(path, name, set(modules)) for name, path in modules.items()}
    # The lazy package root re-exports every stage by name: it is the API, not a floor of the flow.
    edges["circuits"] = set()

    @cache
    def floor(name: str, seen: tuple[str, ...] = ()) -> int:
        if name in seen:  # a module-level loop: counted once
            return 0
        return 1 + max((floor(dep, (*seen, name)) for dep in edges[name]), default=0)

    floors = {name: floor(name) for name in modules}
    for name in sorted(modules, key=lambda n: (floors[n], n)):
        deps = ", ".join(sorted(edges[name]))
        print(f"{floors[name]:>2}  {name}" + (f"  <- {deps}" if deps else ""))
    loops = folder_loops(edges, modules)
    highest = max(floors.values())
    print(f"\n{len(modules)} modules, {highest} floors")
    for loop in loops:
        print("loop between folders: " + " <-> ".join(loop))
    if not loops:
        print("no loop between folders")
    return 1 if loops or highest > args.max_floors else 0


if __name__ == "__main__":
    sys.exit(main())
