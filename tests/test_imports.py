"""The package's layers point one way: no module of aotlib imports itself back in a circle.

Circles "work" in Python only while every import happens to run in the right order
(the lazy imports inside functions in `aotlib.models.build_model` and `aotlib.ssd.ssd`
hid two of them). Here the imports are read with `ast`, at module level and inside
functions alike, and any strongly connected group of modules is a failure naming it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "aotlib"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the aotlib modules it imports anywhere in its body (functions included)."""
    modules = {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = name.split(".") if is_package else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                # `from aotlib.bench import ssd` imports the submodule aotlib.bench.ssd.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for target in targets:
                while target and target not in modules:  # `import aotlib.x.y` -> the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_aotlib() -> None:
    graph = import_graph()
    assert "aotlib.ssd" in graph and "aotlib.models" in graph
    # The graph sees function-level imports: the two lazy dispatches are edges.
    assert "aotlib.ssd_triton" in graph["aotlib.ssd"]
    assert {"aotlib.gpt", "aotlib.rnn", "aotlib.mamba2"} <= graph["aotlib.models"]
    found = circles(graph)
    assert not found, "import circles (each group imports itself back): " + "; ".join(
        " <-> ".join(group) for group in found
    )


def test_circle_finder_can_fail(tmp_path: Path) -> None:
    # The circles this module guards against, written as a throwaway package.
    pkg = tmp_path / "aotlib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text("def build():\n    from aotlib.gpt import GPT\n")
    (pkg / "gpt.py").write_text("from aotlib.models import Dropout\n")
    (pkg / "ssd.py").write_text("def ssd():\n    from . import ssd_triton\n")
    (pkg / "ssd_triton.py").write_text("import aotlib.ssd\n")
    (pkg / "paths.py").write_text("import os\n")
    assert circles(import_graph(pkg)) == [
        ["aotlib.gpt", "aotlib.models"],
        ["aotlib.ssd", "aotlib.ssd_triton"],
    ]
