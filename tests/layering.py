"""The package's layers, and a checker that reads every import between mmlora modules.

Layers run one way, bottom to top (the README's architecture section draws them). A module may import
modules of its own layer or of a layer below it; no two modules may import each other in a loop; and
imports between mmlora modules sit at module top, so that the dependencies are the ones a reader sees
at the head of a file. The one exception is the command layer: ``mmlora --help`` builds every
subcommand's parser, so a command module imports the library inside ``run`` (heavy libraries stay out
of ``--help``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: Bottom to top. A module belongs to the longest prefix that names it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("mmlora", "mmlora.errors", "mmlora.cache", "mmlora.optional")),
    ("config", ("mmlora.config",)),
    ("models", ("mmlora.models",)),
    ("adapters", ("mmlora.adapters",)),
    ("placement", ("mmlora.placement",)),
    ("data", ("mmlora.data",)),
    ("generation", ("mmlora.generate",)),
    ("runs", ("mmlora.runs",)),
    ("objectives", ("mmlora.objectives",)),
    ("train", ("mmlora.train",)),
    ("eval", ("mmlora.eval",)),
    ("serve", ("mmlora.serve",)),
    ("showcase", ("mmlora.showcase",)),
    ("commands", ("mmlora.commands", "mmlora.cli", "mmlora.__main__")),
)
LAZY_ALLOWED = ("commands",)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    top: bool


def layer_of(module: str) -> tuple[int, str]:
    best: tuple[int, int, str] | None = None
    for rank, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank, name)
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to tests/layering.py")
    return best[1], best[2]


def module_sources(root: Path) -> dict[str, str]:
    """``{dotted module name: source}`` for every ``.py`` file under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text(encoding="utf-8")
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def edges(module: str, source: str, known: Iterable[str], is_package: bool = False) -> list[Edge]:
    """Imports of mmlora modules in ``source`` (function-level ones included), resolved to modules
    (``from mmlora.x import y`` is an edge to ``mmlora.x.y`` when that is a module, else to ``mmlora.x``)."""
    known = set(known)
    tree = ast.parse(source)
    top_nodes = set()
    for node in tree.body:
        top_nodes.add(node)
        if isinstance(node, ast.If) and _is_type_checking(node):
            top_nodes.update(node.body)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target == "mmlora" or target.startswith("mmlora."):
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != module:
                    out.append(Edge(module, target, node.lineno, node in top_nodes))
    return out


def violations(sources: Mapping[str, str], packages: Iterable[str] = ()) -> list[str]:
    """Every import against the layers, every function-level import outside the command layer, and
    every cycle, each as one line naming the modules."""
    packages = set(packages)
    all_edges = [e for m, s in sources.items() for e in edges(m, s, sources, m in packages)]
    problems = []
    for e in all_edges:
        (src_rank, src_layer), (dst_rank, dst_layer) = layer_of(e.source), layer_of(e.target)
        if dst_rank > src_rank:
            problems.append(f"{e.source} ({src_layer}) imports {e.target} ({dst_layer}), a layer above it (line {e.line})")
        if not e.top and src_layer not in LAZY_ALLOWED:
            problems.append(f"{e.source} imports {e.target} inside a function (line {e.line}): import it at module top")
    graph: dict[str, set[str]] = {}
    for e in all_edges:
        graph.setdefault(e.source, set()).add(e.target)
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    loops = []
    for comp in components:
        members, start = set(comp), min(comp)
        path, seen = [start], {start}
        while True:  # walk inside the component until the path closes
            nxt = sorted(w for w in graph[path[-1]] if w in members)
            back = [w for w in nxt if w in seen]
            if back:
                path.append(back[0])
                break
            path.append(nxt[0])
            seen.add(nxt[0])
        loops.append(path[path.index(path[-1]):])
    return loops
