"""Checks the layers of a source tree in a process of its own: `python -m tests.unit.layering_probe
ROOT contracts|circles`. ROOT holds the source roots (api/, operator/, cli/, trainer/, demo/); only
they are searched for the project's packages, so a test can point it at a changed copy of the tree.

- `contracts`: import-linter with the contracts in pyproject.toml; exit 0 when all are kept.
- `circles`: every import circle among the project's modules (imports inside functions count),
  one per line as `a -> b -> a`; exit 1 when there is any.
"""

from __future__ import annotations

import sys
from pathlib import Path

SOURCE_ROOTS = ("api", "operator", "cli", "trainer", "demo")
PACKAGES = ("kubetune", "kubetune_trainer", "kubetune_demo")


def _use_roots(root: Path) -> None:
    """Put ROOT's source roots first and drop every other copy of them (the editable install's)."""
    ours = {str(root / name) for name in SOURCE_ROOTS}
    theirs = {p for p in sys.path if Path(p).name in SOURCE_ROOTS and p not in ours}
    sys.path[:] = [*ours, *(p for p in sys.path if p not in theirs and p not in ours)]


def circles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a closed path."""
    import grimp

    graph = grimp.build_graph(*PACKAGES)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in edges.get(module, ()):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for module in edges:
        if module not in index:
            visit(module)
    return [_closed_path(graph, component) for component in found]


def _closed_path(graph, component: list[str]) -> list[str]:
    """One circle through the component's first module, for the message."""
    start = component[0]
    for other in component[1:]:
        there = graph.find_shortest_chain(importer=start, imported=other)
        back = graph.find_shortest_chain(importer=other, imported=start)
        if there and back:
            return [*there, *back[1:]]
    return component


def main(argv: list[str]) -> int:
    root, what = Path(argv[0]).resolve(), argv[1]
    _use_roots(root)
    if what == "circles":
        for circle in circles():
            print(" -> ".join(circle))
        return 1 if circles() else 0
    from importlinter.cli import lint_imports

    return lint_imports(config_filename=str(root / "pyproject.toml"), no_cache=True, no_logo=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
