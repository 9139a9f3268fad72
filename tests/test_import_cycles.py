"""Imports point one way: no cycle among the package's modules, counting imports inside functions (they hide a
cycle from Python, not from a reader); and the layers keep their direction: analysis knows nothing of search
or lowering, passes and cost nothing of the runtime."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {
    "galvatron_fx": "galvatron_fx",
    "galvatron_fx.passes": "passes",
    "galvatron_fx.cost": "cost",
    "galvatron_fx.runtime": "runtime",
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    edges = {}
    for name, path in modules.items():
        targets = set()
        if path.name != "__init__.py":  # a package's __init__ re-exports; it is not where a cycle lives
            base = name.rsplit(".", 1)[0]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    targets |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    module = node.module or ""
                    if node.level:
                        up = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                        module = ".".join(up + ([node.module] if node.module else []))
                    targets |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_imports(_modules())) == []


def test_imports_keep_the_direction_of_the_data_flow():
    edges = _imports(_modules())
    forbidden = {
        "galvatron_fx.passes.analysis": (
            "galvatron_fx.passes.search",
            "galvatron_fx.passes.lower",
            "galvatron_fx.runtime",
        ),
        "galvatron_fx.passes.search": ("galvatron_fx.passes.lower", "galvatron_fx.runtime"),
        "galvatron_fx.passes.lower": ("galvatron_fx.passes.search", "galvatron_fx.runtime"),
        "galvatron_fx.passes.lower.graph": (
            "galvatron_fx.passes.lower.pipeline",
            "galvatron_fx.passes.lower.stage",
            "galvatron_fx.passes.lower.layouts",
        ),
    }
    wrong = [
        (a, b)
        for a, targets in edges.items()
        for b in targets
        for owner, banned in forbidden.items()
        if a.startswith(owner + ".") and b.startswith(banned)
    ]
    assert wrong == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
