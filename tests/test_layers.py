"""Imports point down the layers of the package (README "Layout"), and no modules import each other in a circle.

The layers, lowest first. A module may import from its own layer or any lower one; within a layer the cycle
check keeps the graph a tree. Imports inside functions count as well: a lazy import is still a dependency.
"""
import ast
from pathlib import Path

from tests.helpers import ROOT

LAYERS = [
    ["errors", "argtypes"],
    ["system"],  # stop signals, fail-fast, disk, run lock: the process and its host
    ["dist"],  # processes and collectives, synchronised and per-view norms: no method, no data
    ["data", "trunks", "losses", "schedules"],  # pure blocks: images, backbones, losses, curves
    ["methods"],
    ["engine", "checkpoint"],  # the runtime every loop shares, and checkpoint I/O
    ["trunk_weights", "cli"],
    ["eval"],
    ["train"],
    ["export", "demo", "submit", "requeue"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_imports(sources: dict[str, str]) -> dict[str, set[str]]:
    """``{module: source}`` -> ``{module: the w2ssl modules it imports}`` (``from pkg import mod`` is ``pkg.mod``)."""
    graph: dict[str, set[str]] = {}
    for module, text in sources.items():
        targets = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("w2ssl.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("w2ssl"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in sources else node.module)
        graph[module] = targets - {module}
    return graph


def part(module: str) -> str:
    """``w2ssl.engine.step`` -> ``engine``; ``w2ssl.errors`` -> ``errors``."""
    return module.split(".")[1]


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, ts in graph.items() if m.count(".") >= 1
                  for t in ts if t.count(".") >= 1 and LAYER[part(t)] > LAYER[part(m)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the modules along it (package ``__init__`` files left out)."""
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def package_sources() -> dict[str, str]:
    sources = {}
    for path in (ROOT / "w2ssl").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            continue  # the packages' own files import nothing but their lazily exported names
        sources[".".join(parts)] = path.read_text()
    return sources


def test_every_part_of_the_package_has_a_layer():
    parts = {part(m) for m in package_sources()}
    assert parts == set(LAYER), f"unplaced: {parts - set(LAYER)}; gone: {set(LAYER) - parts}"


def test_imports_point_down_the_layers():
    assert upward(module_imports(package_sources())) == []


def test_no_import_cycles():
    assert cycles(module_imports(package_sources())) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    graph = module_imports({"w2ssl.dist.a": "from w2ssl.methods import b\n",
                            "w2ssl.methods.b": "import w2ssl.dist.a\n",
                            "w2ssl.engine.c": "def f():\n    from w2ssl.train.d import x\n",
                            "w2ssl.train.d": "x = 1\n"})
    assert upward(graph) == ["w2ssl.dist.a imports w2ssl.methods.b", "w2ssl.engine.c imports w2ssl.train.d"]
    assert cycles(graph) == [["w2ssl.dist.a", "w2ssl.methods.b", "w2ssl.dist.a"]]


def test_the_package_and_its_leaves_import_without_torch():
    import subprocess
    import sys
    code = "import sys, w2ssl, w2ssl.errors, w2ssl.system.disk, w2ssl.system.runlock; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(ROOT), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def sys_path_uses(text: str) -> list[int]:
    """Lines of ``text`` that touch ``sys.path`` (read it or change it)."""
    return [node.lineno for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Attribute)
            and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys"]


def test_no_file_touches_sys_path():
    """The tools run as modules from the repository root (``python -m bench.step``), the entry scripts from
    their own folder: no file puts a folder on ``sys.path``."""
    files = [*ROOT.glob("*.py"), *(p for folder in ("w2ssl", "bench", "transfer", "tests", "scripts")
                                   for p in (ROOT / folder).rglob("*.py"))]
    found = {str(p.relative_to(ROOT)): lines for p in files if (lines := sys_path_uses(p.read_text()))}
    assert found == {}
    assert sys_path_uses("import sys\nsys.path.insert(0, 'x')\n") == [2]
