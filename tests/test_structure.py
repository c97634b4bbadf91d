"""dvc.yaml kept true: every stage lists the library modules it really imports.

A stage re-runs when one of its ``deps`` changes. A module the stage imports
but does not list would let a code change go unnoticed (stale outputs); this
test derives each stage's ``pipeline/`` imports transitively from the code and
fails when dvc.yaml omits one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every ``pipeline``/``stages`` module a file imports, at any depth of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pipeline.extract import decode` imports a module by that name too.
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("pipeline", "stages") and _module_file(m)}


def closure(module: str) -> set[Path]:
    """The files of ``module`` and of everything in the project it imports, transitively."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        for k in range(1, len(parts) + 1):
            f = _module_file(".".join(parts[:k]))
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(_imports(f))
    return {f.relative_to(ROOT) for f in seen}


def _stages():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        body = stage.get("do", stage)
        yield name, body["cmd"], [str(d) for d in body.get("deps", [])]


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


@pytest.mark.parametrize("name,cmd,deps", list(_stages()), ids=[s[0] for s in _stages()])
def test_stage_deps_list_every_module_it_imports(name, cmd, deps):
    words = cmd.split()
    module = words[words.index("-m") + 1]
    # Package __init__ files hold no code here (a docstring, the version).
    needed = sorted(str(f) for f in closure(module) if f.name != "__init__.py")
    missing = [f for f in needed if not _covered(Path(f), deps)]
    assert not missing, f"dvc.yaml stage {name} imports but does not list: {missing}"


def test_the_closure_finds_nested_imports():
    # The check above is only as good as this walk: extract's stage reaches the
    # per-image store through the local engine, two imports away.
    files = closure("stages.extract")
    assert Path("pipeline/extract/store.py") in files
    assert Path("pipeline/data/images.py") in files
    assert Path("pipeline/visualize/optvis.py") not in files


def test_no_import_cycles():
    graph = {}
    for f in (ROOT / "pipeline").rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {m for m in _imports(f) if m.startswith("pipeline") and m != name}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_accepted_values_in_config_match_their_implementations():
    from pipeline import config
    from pipeline.visualize import optvis

    assert set(config.PARAMETERISATIONS) == set(optvis.PARAMETERISATIONS)


@pytest.mark.parametrize("stage,unneeded", [
    # The extract stage's start-up counts against its first batch; scikit-learn
    # and SciPy cost about a second of it and it needs neither.
    ("stages.extract", ("sklearn", "scipy")),
    # A new C re-runs these two: torch, timm and torchvision would cost them
    # about four seconds each, and a head on cached features needs none.
    ("stages.train_heads", ("torch", "timm", "torchvision")),
    ("stages.evaluate", ("torch", "timm", "torchvision")),
])
def test_stages_start_without_what_they_do_not_use(stage, unneeded):
    import subprocess
    import sys

    code = f"import sys, {stage}; print(sorted(m for m in {unneeded!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
