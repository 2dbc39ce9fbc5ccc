"""The four floors: every import points down and no module cycle exists (docs/architecture.md).

    opsd.cli  →  opsd.flows  →  opsd.stages  →  opsd (library)  →  opsd.storage

The check parses every module's source (function-local imports included: a cycle hidden inside a
function is still a cycle) and maps each import to the module it names.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"opsd": "opsd", "flows": "opsd.flows", "stages": "opsd.stages", "storage": "opsd.storage"}
# floor of a module → rank; an import may go to a lower rank or stay on its own floor
RANKS = {"cli": 4, "flows": 3, "stages": 2, "library": 1, "storage": 0}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def floor(module: str) -> str:
    if module == "opsd.cli":
        return "cli"
    for name in ("flows", "stages", "storage"):
        if module == f"opsd.{name}" or module.startswith(f"opsd.{name}."):
            return name
    return "library"


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports (``from a import b`` names ``a.b`` when it is a module)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            # the longest known prefix: ``import opsd.data.rows`` names opsd.data.rows
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def test_imports_point_down():
    upward = []
    for src, targets in graph().items():
        for dst in targets:
            if dst == "opsd":  # the package root holds only the floor mapping
                continue
            if RANKS[floor(dst)] > RANKS[floor(src)]:
                upward.append(f"{src} ({floor(src)}) imports {dst} ({floor(dst)})")
    assert not upward, "imports pointing up:\n" + "\n".join(sorted(upward))


def test_only_the_cli_imports_flows():
    g = graph()
    offenders = [m for m, ts in g.items() if floor(m) not in ("flows", "cli")
                 and any(floor(t) == "flows" for t in ts)]
    assert offenders == []
    assert any(floor(t) == "flows" for t in g["opsd.cli"])


def test_no_import_cycles():
    g = graph()
    # A package's __init__ importing its own submodules is how packages re-export: those edges
    # run parent → child only and cannot close a cycle with the child's own imports unless the
    # child imports the package back, which is exactly what we want to catch.
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_checker_sees_an_upward_and_a_cyclic_import(tmp_path):
    """The check itself: an upward import and a two-module cycle are both found."""
    known = {"opsd.stages.a", "opsd.flows.b", "opsd.x", "opsd.y"}
    up = tmp_path / "a.py"
    up.write_text("def f():\n    from opsd.flows import b\n")
    assert imports("opsd.stages.a", up, known) == {"opsd.flows.b"}
    assert RANKS[floor("opsd.flows.b")] > RANKS[floor("opsd.stages.a")]
    x = tmp_path / "x.py"
    x.write_text("import opsd.y\n")
    assert imports("opsd.x", x, known) == {"opsd.y"}


def test_installed_packages_are_the_tree():
    """Every folder with an __init__.py installs under opsd.* and nothing claims a generic
    top-level name (flows, stages, storage) in a user's environment."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    tree = {m for m, p in modules().items() if p.name == "__init__.py"}
    assert declared == tree
    assert all(p == "opsd" or p.startswith("opsd.") for p in declared)
    assert cfg["package-dir"] == {"opsd": "opsd", **{v: k for k, v in FOLDERS.items() if k != "opsd"}}
