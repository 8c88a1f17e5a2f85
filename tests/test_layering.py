"""The house rule of the design, checked on every import statement (top-level or inside a function):

floor 4  entry          actsparse/cli.py
floor 3  orchestration  actsparse/sweep, tracking, report
floor 2  core           actsparse/models, data, calibration, sparsifiers, eval, engine (+ errors, artifacts, __init__)
floor 1  kernels        kernels/ (the package actsparse.kernels, actsparse/kernels.py)

Imports point down only; floors 1-2 import no orchestration package (the GPU machine has none of them);
kernels import nothing from actsparse outside actsparse.kernels.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"hydra", "omegaconf", "ray", "mlflow", "pandas", "matplotlib"}
FLOOR3 = {"sweep", "tracking", "report"}


def _module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["actsparse", "kernels", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor(module: str) -> int:
    """The floor of an actsparse module (0 for anything outside actsparse)."""
    parts = module.split(".")
    if parts[0] != "actsparse":
        return 0
    if len(parts) == 1:
        return 2
    if parts[1] == "kernels":
        return 1
    if parts[1] == "cli":
        return 4
    return 3 if parts[1] in FLOOR3 else 2


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py" or module == "actsparse.kernels"
    package = module if is_pkg else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # `from actsparse import kernels` / `from .. import sweep`: the imported names may be modules
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names if name in ("actsparse",)]
    return out


def _sources() -> list[Path]:
    return sorted([*(REPO / "actsparse").rglob("*.py"), *(REPO / "kernels").glob("*.py")])


def test_the_sources_are_all_found():
    mods = {_module_of(p) for p in _sources()}
    assert {"actsparse.cli", "actsparse.sweep.runner", "actsparse.kernels", "actsparse.kernels.ref",
            "actsparse.sparsifiers.teal", "actsparse.engine.engine"} <= mods


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down_and_core_imports_no_orchestration(path):
    module = _module_of(path)
    f = floor(module)
    bad = []
    for line, name in _imports(path, module):
        top = name.split(".")[0]
        if f <= 2 and top in ORCHESTRATION:
            bad.append(f"line {line}: floor {f} imports {name} (orchestration packages live on floor 3)")
        if top == "actsparse" and floor(name) > f:
            bad.append(f"line {line}: floor {f} imports {name} (floor {floor(name)}): imports point down only")
        if f == 1 and top == "actsparse" and not (name == "actsparse.kernels" or name.startswith("actsparse.kernels.")):
            bad.append(f"line {line}: a kernel imports {name}: kernels import nothing from actsparse but themselves")
        if top == "kernels":
            bad.append(f"line {line}: imports a top-level `kernels`; the package is actsparse.kernels")
    assert not bad, f"{path.relative_to(REPO)}:\n" + "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The rule itself: a core module that imports ray, or reaches up into the sweep, is caught."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    import ray\n    from ..sweep import runner\n")
    names = [n for _, n in _imports(src, "actsparse.eval.x")]
    assert names == ["ray", "actsparse.sweep"]
    assert floor("actsparse.sweep") == 3 and floor("actsparse.eval.x") == 2 and floor("actsparse.kernels.ref") == 1


def _graph() -> dict[str, set[str]]:
    """module -> the actsparse modules (not packages) it imports anywhere in its file, TYPE_CHECKING included."""
    paths = {_module_of(p): p for p in _sources()}
    packages = {m for m, p in paths.items() if p.name == "__init__.py"}
    graph = {}
    for m, p in paths.items():
        tree = ast.parse(p.read_text(), str(p))
        named = {f"{base}.{a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for base in [_resolve(node, m, p)] for a in node.names}
        targets = {n for _, n in _imports(p, m)} | named
        graph[m] = {t for t in targets if t in paths and t not in packages and t != m}
    return graph


def _resolve(node: ast.ImportFrom, module: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = path.name == "__init__.py" or module == "actsparse.kernels"
    base = (module if is_pkg else module.rsplit(".", 1)[0]).split(".")
    return ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle among the modules, as a path that ends where it starts; [] when there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        stack.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_two_modules_import_each_other():
    """No import cycle, lazy imports included: each module can be read knowing only what it imports."""
    cycle = _cycle(_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
