"""Print the import graph between this project's modules, its cycles, and which entry modules
load torch at import time.

    python tools/import_graph.py            # summary: edges per package pair, cycles, torch check
    python tools/import_graph.py --edges    # every module -> module edge (lazy ones marked)

An edge A -> B means module A imports module B (or a name from it). Imports inside functions are
"lazy": they do not run at import time but still couple the two modules, so cycles are reported
over all edges and over import-time edges separately.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("diffusion_core", "flows", "serving", "infra")
# Modules that must stay light: the HTTP front end of the Serve app.
TORCH_FREE = ("serving.ingress",)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The project module that `target` (a dotted import) names: the longest matching prefix."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in modules:
            return name
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, bool]:
    """{imported project module: lazy?} for one module (lazy = only inside functions)."""
    tree = ast.parse(path.read_text())
    found: dict[str, bool] = {}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in child.names] or [base]
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # typing-only imports do not couple modules at run time
            for target in targets:
                resolved = resolve(target, modules)
                if resolved and resolved != name:
                    found[resolved] = found.get(resolved, True) and inner
            visit(child, inner)

    visit(tree, False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
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

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def loads_torch(module: str) -> bool:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print every module edge")
    args = parser.parse_args()
    modules = project_modules()
    edges = {name: imports_of(name, path, modules) for name, path in modules.items()}
    all_graph = {a: set(targets) for a, targets in edges.items()}
    eager_graph = {a: {b for b, lazy in targets.items() if not lazy} for a, targets in edges.items()}
    print(f"modules: {len(modules)}; edges: {sum(map(len, all_graph.values()))} "
          f"({sum(map(len, eager_graph.values()))} at import time)")
    by_package: dict[tuple[str, str], int] = defaultdict(int)
    for a, targets in all_graph.items():
        for b in targets:
            by_package[(a.split(".")[0], b.split(".")[0])] += 1
    for (a, b), count in sorted(by_package.items()):
        print(f"  {a:15s} -> {b:15s} {count}")
    if args.edges:
        for a in sorted(edges):
            for b, lazy in sorted(edges[a].items()):
                print(f"  {a} -> {b}{'  (lazy)' if lazy else ''}")
    for label, graph in (("cycles (all imports)", all_graph), ("cycles (import time)", eager_graph)):
        found = cycles(graph)
        print(f"{label}: {len(found)}")
        for component in found:
            print("  " + " <-> ".join(component))
    for module in TORCH_FREE:
        print(f"{module} loads torch at import: {loads_torch(module)}")


if __name__ == "__main__":
    main()
