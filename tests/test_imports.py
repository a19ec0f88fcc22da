"""Importing the library is cheap, and its imports keep one direction: the floors of docs/architecture.md.

The graph is read from the source (no imports executed): every `import pipeline.X` and
`from pipeline.X import Y`, at module level or inside a function, is an edge.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

# Libraries whose import costs seconds or starts machinery: a pipeline module that pulls one in at
# import may be imported lazily by a module that does not.
HEAVY = {"ray", "deepspeed", "transformers", "mlflow", "datasets", "matplotlib", "optuna", "tokenizers",
         "gguf", "vaderSentiment", "pyarrow", "safetensors", "peft", "trl", "tqdm"}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module
    line: int
    lazy: bool  # inside a function


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in (REPO / "pipeline").rglob("*.py")}


def imports(module: str) -> tuple[list[Edge], set[str]]:
    """The module's pipeline edges, and the third-party top-level packages it imports at module level."""
    edges: list[Edge] = []
    third: set[str] = set()

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "pipeline":
                        edges.append(Edge(module, alias.name, child.lineno, lazy))
                    elif not lazy:
                        third.add(alias.name.split(".")[0])
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module.split(".")[0] == "pipeline":
                    for alias in child.names:
                        sub = f"{child.module}.{alias.name}"
                        edges.append(Edge(module, sub if sub in MODULES else child.module, child.lineno, lazy))
                elif not lazy:
                    third.add(child.module.split(".")[0])
            visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")), False)
    return edges, third


GRAPH = {m: imports(m) for m in MODULES}


def floors() -> list[str]:
    """The floors of docs/architecture.md, bottom first."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    return [line.split()[0] for line in block[1].splitlines() if line.strip()][::-1]


def floor_of(module: str, order: list[str]) -> int:
    """Index of the deepest floor that contains ``module`` (pipeline.train.worker -> pipeline.train)."""
    return max(i for i, f in enumerate(order) if module == f or module.startswith(f + "."))


def heavy_at_import(module: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """Heavy libraries importing ``module`` loads, through its module-level pipeline imports."""
    if module in seen or module not in GRAPH:
        return set()
    edges, third = GRAPH[module]
    found = third & HEAVY
    for edge in edges:
        if not edge.lazy:
            found |= heavy_at_import(edge.target, seen | {module})
    return found


def test_every_module_is_on_a_documented_floor():
    order = floors()
    assert order[0] == "pipeline"
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py" and m != "pipeline"}
    assert packages == set(order[1:]), "a package of pipeline/ is missing from docs/architecture.md, or gone"


def test_no_import_runs_against_the_floors():
    order = floors()
    upward = [f"{e.source}:{e.line} imports {e.target}" for edges, _ in GRAPH.values() for e in edges
              if floor_of(e.target, order) > floor_of(e.source, order)]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    successors = {m: {e.target for e in edges if e.target in MODULES and e.target != m}
                  for m, (edges, _) in GRAPH.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(successors[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def test_a_function_level_pipeline_import_is_only_for_a_heavy_library():
    """Lazy only when the imported module loads a heavy library the importer does not load itself;
    never to dodge a circle (the cycle test sees lazy edges too)."""
    unjustified = []
    lazy = []
    for module, (edges, _) in GRAPH.items():
        for e in edges:
            if e.lazy:
                lazy.append(e)
                if not heavy_at_import(e.target) - heavy_at_import(module):
                    unjustified.append(f"{module}:{e.line} imports {e.target} inside a function")
    assert unjustified == []
    assert len(lazy) <= 1, [f"{e.source}:{e.line} -> {e.target}" for e in lazy]  # docs/architecture.md names it


def test_the_graph_sees_real_imports():
    """The test's own parser: it finds the edges a reader sees in two known modules."""
    edges, third = GRAPH["pipeline.train.step"]
    assert {"pipeline.losses", "pipeline.models.forward", "pipeline.tokenstats"} <= {e.target for e in edges}
    assert "torch" in third
    lazy = [e for e in GRAPH["pipeline.tune.sweep"][0] if e.lazy]
    assert [e.target for e in lazy] == ["pipeline.tune.callbacks"] and heavy_at_import(lazy[0].target) == {"ray"}


def test_core_modules_import_without_heavy_dependencies():
    code = (
        "import sys, pipeline, pipeline.losses, pipeline.tokenstats, pipeline.config, pipeline.errors\n"
        "heavy = [m for m in ('ray', 'deepspeed', 'transformers', 'datasets', 'mlflow') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
