"""The house rules of docs/ARCHITECTURE.md, checked on the source: imports point down the lifecycle and never in
a circle (module-level and lazy imports alike), only cli/ prints, and `msov --help` loads no ML library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mistral_sov"

# Lower numbers sit lower in the lifecycle; an import may point to its own layer or below, never above.
LAYERS = {
    "mistral_sov": 0, "errors": 0, "events": 0, "sizes": 0,
    "guard": 1,
    "recipe": 2, "record": 2,
    "trust": 3,
    "data": 4, "model": 4,
    "evaluate": 5, "export": 5,
    "train": 6,
    "reproduce": 7, "tools": 7, "report": 7,
    "cli": 8, "__main__": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every mistral_sov module this file imports, at module level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mistral_sov"):
                continue
            for alias in node.names:  # `from . import x` names a module when x is one
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mistral_sov"))
    found.discard(name)
    return {m for m in found if m in MODULES}


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): imports_of(p) for p in FILES}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else parts[0]]


def test_every_module_has_a_layer():
    assert [m for m in MODULES if (m.split(".")[1] if "." in m else m) not in LAYERS] == []


def test_no_import_cycles():
    """Depth-first search over the module graph; a back edge is a cycle, reported as the path around it."""
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_point_down_the_lifecycle():
    upward = [f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_only_cli_prints():
    offenders = []
    for path in FILES:
        if module_name(path).startswith("mistral_sov.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: print()")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "rich" or n.startswith("rich.") for n in names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: imports rich")
    assert not offenders, "outside cli/:\n" + "\n".join(offenders)


@pytest.mark.parametrize("bad", ["cycle", "upward", "print"])
def test_the_checks_catch_what_they_are_for(bad, monkeypatch):
    """The checks above fail on a planted violation (so a passing run means something)."""
    if bad == "cycle":
        monkeypatch.setitem(GRAPH, "mistral_sov.errors", GRAPH["mistral_sov.errors"] | {"mistral_sov.recipe"})
        with pytest.raises(AssertionError, match="mistral_sov.errors -> mistral_sov.recipe -> mistral_sov.errors"):
            test_no_import_cycles()
    elif bad == "upward":
        monkeypatch.setitem(GRAPH, "mistral_sov.data.readers", {"mistral_sov.train.pipeline"})
        with pytest.raises(AssertionError, match="data.readers imports mistral_sov.train.pipeline"):
            test_imports_point_down_the_lifecycle()
    else:
        planted = PACKAGE / "trust" / "zz_planted_print.py"
        monkeypatch.setattr(sys.modules[__name__], "FILES", FILES + [planted])
        planted.write_text("def f():\n    print('x')\n")
        try:
            with pytest.raises(AssertionError, match="zz_planted_print.py:2: print"):
                test_only_cli_prints()
        finally:
            planted.unlink()


def test_help_imports_no_ml_library():
    code = ("import sys\nfrom mistral_sov.cli import app\n"
            "try:\n    app(['--help'], prog_name='msov')\nexcept SystemExit:\n    pass\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'datasets',"
            " 'accelerate', 'numpy', 'safetensors', 'mistral_common'})\nsys.stderr.write(repr(heavy))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip().splitlines()[-1] == "[]"
