"""dvc.yaml tells the truth: each stage declares exactly the code and params it reads.

DVC can only be as right as these lists. A module a stage imports but does
not list lets a code change go unnoticed; a params key it reads but does not
list serves another configuration's results as fresh. Listing what it does
not read re-runs it for nothing. Both directions are checked here:

- code: the project modules each stage's script imports (the transitive
  closure, read from the code's import statements at any depth) against the
  ``.py`` files its ``deps`` cover, both ways;
- params: the keys each stage reads at run time, recorded by the config
  sections themselves (``TL_RECORD_PARAMS``, see :mod:`pipeline.config.reads`)
  during a real ``dvc repro``, against its ``params``, both ways. Keys marked
  ``runtime`` in pipeline/config (where and how fast, never what) may be read
  unlisted.

The stages are DVC's own resolution of dvc.yaml (foreach expanded, ``${...}``
filled in from params.yaml), not the YAML text.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the stages, as DVC resolves them


def resolved_stages(root: Path = ROOT) -> dict:
    """``{stage name: {"module", "args", "code", "data", "params"}}`` of the dvc.yaml in ``root``."""
    from dvc.repo import Repo

    out = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            words = stage.cmd.split()
            i = words.index("-m")
            code, data, params = [], [], []
            for dep in stage.deps:
                if hasattr(dep, "params") and type(dep).__name__ == "ParamsDependency":
                    params += list(dep.params)
                    continue
                path = Path(dep.def_path)
                (code if path.parts[0] in ("pipeline", "stages") else data).append(path)
            out[stage.name] = {"module": words[i + 1], "args": words[i + 2:], "code": code, "data": data,
                                     "params": params}
    return out


# ------------------------------------------------------------------ imports


def _module_file(name: str, root: Path = ROOT) -> Path | None:
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every ``pipeline``/``stages`` module a file imports, at any depth of the file (lazy imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            found.add(module)
            # `from pipeline.extract import decode` imports a module by that name too.
            found |= {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("pipeline", "stages") and _module_file(m, root)}


def closure(module: str, root: Path = ROOT) -> set[Path]:
    """The files of ``module`` and of everything in the project it imports, transitively.

    Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so
    those count too: an ``__init__.py`` may hold code (``pipeline/config``'s does).
    """
    todo, seen = [module], set()
    while todo:
        parts = todo.pop().split(".")
        for k in range(1, len(parts) + 1):
            f = _module_file(".".join(parts[:k]), root)
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(_imports(f, root))
    return {f.relative_to(root) for f in seen}


def listed_code(code: list[Path], root: Path = ROOT) -> set[Path]:
    """The ``.py`` files a stage's code deps cover (a folder covers every file under it)."""
    files = set()
    for dep in code:
        full = root / dep
        files |= {p.relative_to(root) for p in full.rglob("*.py")} if full.is_dir() else {dep}
    return files


def code_mismatch(stage: dict, root: Path = ROOT) -> tuple[list, list]:
    """``(imported but not listed, listed but not imported)`` for one resolved stage."""
    needed, listed = closure(stage["module"], root), listed_code(stage["code"], root)
    return sorted(map(str, needed - listed)), sorted(map(str, listed - needed))


STAGES = resolved_stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_code_deps_are_exactly_its_imports(name):
    missing, unused = code_mismatch(STAGES[name])
    assert not missing, f"dvc.yaml stage {name} imports but does not list: {missing}"
    assert not unused, f"dvc.yaml stage {name} lists but never imports: {unused}"


def test_an_undeclared_import_is_caught(tmp_path):
    """The check above fails when a module gains an import its stages do not list."""
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, tmp_path / name)
    evaluate = tmp_path / "pipeline/evaluate.py"
    evaluate.write_text(evaluate.read_text() + "\n\ndef _later():\n    from pipeline import runtime  # noqa\n")
    stage = STAGES["evaluate@logreg"]  # the deps as dvc.yaml lists them, checked against the changed code
    missing, unused = code_mismatch(stage, tmp_path)
    assert missing == ["pipeline/machine.py", "pipeline/runtime.py"]
    # And the other way: a listed module the stage no longer imports.
    evaluate.write_text(evaluate.read_text().replace("from pipeline.metrics import head_metrics, per_class_rows\n",
                                                     "head_metrics = per_class_rows = None\n"))
    assert "pipeline/metrics.py" in code_mismatch(stage, tmp_path)[1]


def test_the_closure_finds_nested_and_package_imports():
    files = closure("stages.extract")
    assert Path("pipeline/extract/store.py") in files  # two imports away, through the local engine
    assert Path("pipeline/config/__init__.py") in files  # load_config lives there
    assert Path("pipeline/visualize/optvis.py") not in files


def test_the_config_package_imports_nothing_above_it():
    """Reading params.yaml needs no stage's code (the heads' declaration is data)."""
    found = {str(f) for f in closure("pipeline.config")}
    assert found <= {"pipeline/__init__.py", "pipeline/errors.py", "pipeline/fileio.py",
                     *(f"pipeline/config/{m}.py" for m in ("__init__", "checks", "reads", "sections"))}, found


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


# ------------------------------------------------------------------ what stages import


def test_accepted_values_in_config_match_their_implementations():
    from pipeline import config
    from pipeline.visualize import optvis

    assert set(config.PARAMETERISATIONS) == set(optvis.PARAMETERISATIONS)
    from pipeline.extract.stage import ENGINES

    assert set(config.ENGINES) == set(ENGINES)


def test_devices_and_precisions_are_resolved_in_one_place():
    """runtime.place is the one caller of the device and precision policy (outside runtime.py itself)."""
    callers = []
    for f in (ROOT / "pipeline").rglob("*.py"):
        if f.name != "runtime.py":
            tree = ast.parse(f.read_text(encoding="utf-8"))
            callers += [f"{f.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Call)
                        and getattr(n.func, "id", getattr(n.func, "attr", None)) in ("resolve_device",
                                                                                       "resolve_precision")]
    assert not callers, f"resolve with runtime.place instead: {callers}"


def test_fine_tuning_imports_no_stage_module():
    """Fine-tuning scores with pipeline.metrics, below evaluate: an edit of evaluate never re-runs it."""
    stage_modules = {Path("pipeline/evaluate.py"), Path("pipeline/extract/stage.py"), Path("pipeline/visualize/stage.py")}
    assert not closure("pipeline.finetune.stage") & stage_modules


def test_the_ray_executor_imports_nothing_of_the_local_one():
    """Both executors share the store and its writer (extract/store.py), not each other."""
    assert Path("pipeline/extract/local.py") not in closure("pipeline.extract.ray_executor")
    assert Path("pipeline/extract/ray_executor.py") not in closure("pipeline.extract.local")


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


# ------------------------------------------------------------------ params


def _leaves(cls, prefix: str) -> dict[str, bool]:
    """``{key: runtime?}`` of every leaf key of a section class."""
    from pipeline.config.reads import Recorded

    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints.get(f.name)
        if isinstance(t, type) and issubclass(t, Recorded):
            out.update(_leaves(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = bool(f.metadata.get("runtime"))
    return out


def params_keys(params_file: Path) -> dict[str, bool]:
    """Every leaf key of params.yaml's configuration, with whether it is runtime-only."""
    from pipeline.config import Config, HeadConfig, load_config

    keys = {}
    for f in dataclasses.fields(Config):
        keys.update(_leaves(f.default_factory().__class__, f"{f.name}."))
    del keys["heads.train"]
    for name in load_config(params_file).heads.train:
        keys.update(_leaves(HeadConfig, f"heads.train.{name}."))
    return keys


def _covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


def params_mismatch(stage: dict, read: set[str], keys: dict[str, bool]) -> tuple[list, list]:
    """``(read but not listed, listed but never read)``; runtime keys may be read unlisted."""
    declared = stage["params"]
    unlisted = sorted(k for k in read if not keys.get(k, False) and not any(_covers(d, k) for d in declared))
    unread = sorted(d for d in declared if not any(_covers(d, k) for k in read))
    return unlisted, unread


def test_declared_params_keys_exist():
    keys = params_keys(ROOT / "params.yaml")
    for name, stage in STAGES.items():
        for d in stage["params"]:
            assert any(_covers(d, k) for k in keys), f"stage {name} lists params key {d}, which no section has"


def test_reads_are_recorded_after_loading_only(tmp_path, monkeypatch):
    """The recorder notes what a caller reads, leaf by leaf, not what parsing checked."""
    from pipeline.config import reads

    monkeypatch.setattr(reads, "_reads", None)
    monkeypatch.setenv(reads.ENV, str(tmp_path))
    monkeypatch.setattr(reads.atexit, "register", lambda fn: None)
    from pipeline.config import load_config

    cfg = load_config(ROOT / "params.yaml")
    assert reads._reads == set()
    cfg.extract.ray.concurrency, cfg.heads.head("svm").C, cfg.backbone.name
    assert reads._reads == {"extract.ray.concurrency", "heads.train.svm.C", "backbone.name"}


def test_params_check_catches_both_directions():
    keys = params_keys(ROOT / "params.yaml")
    stage = {"params": ["backbone", "extract.precision"]}
    assert params_mismatch(stage, {"backbone.name", "extract.precision"}, keys) == ([], [])
    assert params_mismatch(stage, {"backbone.name", "extract.precision", "extract.decoder"}, keys)[0] == [
        "extract.decoder"]
    assert params_mismatch(stage, {"backbone.name"}, keys)[1] == ["extract.precision"]
    assert params_mismatch(stage, {"backbone.name", "extract.precision", "extract.device"}, keys) == ([], [])


def recorded_reads(folder: Path, stages: dict) -> dict[str, set[str]]:
    """The keys each stage read, from the records its processes left in ``folder``."""
    by_stage: dict[str, set[str]] = {}
    for f in folder.glob("*.json"):
        record = json.loads(f.read_text())
        argv = record["argv"]
        module, args = f"stages.{Path(argv[0]).stem}", argv[1:]
        name = next((n for n, s in stages.items() if s["module"] == module and s["args"] == args), None)
        assert name is not None, f"a process no stage runs read params: {argv}"
        by_stage.setdefault(name, set()).update(record["keys"])
    return by_stage


def graph_honesty_params(project, photos) -> dict:
    """The settings of the recorded run: every stage runs, small and quick."""
    return dict(
        data={"source": "folder", "folder": str(photos), "test_fraction": 0.25, "seed": 0},
        backbone={"name": "efficientnet_lite0", "weights": "DEFAULT"},
        extract={"precision": "fp32", "decoder": "pillow-exact"},
        heads={"cv_folds": 3, "backbones": ["efficientnet_lite0"]},
        finetune={"epochs": 1, "batch_size": 8},
        visualize={"imagenet_classes": [285], "judge": "", "steps": 4, "precision": "fp32",
                   "attack": {"steps": 2, "max_images": 2, "save": 1}, "feature_maps": {"images": 1, "channels": 2}},
    )


@pytest.mark.slow
@pytest.mark.sample_data
def test_every_stage_reads_exactly_its_declared_params(project, catsdogs, tmp_path, monkeypatch):
    """A real `dvc repro` of every stage, its params reads recorded, against dvc.yaml; then dvc status."""
    from helpers_dvc import sample_slice

    photos = sample_slice(catsdogs, tmp_path / "photos", per_class=8)
    project.set_params(**graph_honesty_params(project, photos))
    project.commit("small run")
    record = tmp_path / "reads"
    monkeypatch.setenv("TL_RECORD_PARAMS", str(record))
    project.dvc("repro")
    monkeypatch.delenv("TL_RECORD_PARAMS")

    stages = resolved_stages(project.path)
    reads = recorded_reads(record, stages)
    # A stage without params (plots_template) need not load params.yaml at all.
    silent = {n for n in stages if n not in reads}
    assert not {n for n in silent if stages[n]["params"]}, f"stages that read no params: {silent}"
    reads.update({n: set() for n in silent})
    keys = params_keys(project.path / "params.yaml")
    problems = {name: params_mismatch(stages[name], reads[name], keys) for name in stages}
    problems = {n: p for n, p in problems.items() if p != ([], [])}
    assert not problems, f"(read but not listed, listed but not read) per stage: {problems}"

    # After a full run nothing is stale but the always-changed prepare.
    status = json.loads(project.dvc("status", "--json").stdout)
    assert set(status) <= {"prepare"}, status

    # The heads' declaration: a new C, or a new head, touches only its heads' stages.
    project.commit("ran")
    project.set_params(heads={"train": {"logreg": {"C": [0.5]}}})
    # dvc status names the stage whose own inputs changed; repro then runs it and what reads its output.
    assert set(json.loads(project.dvc("status", "--json").stdout)) - {"prepare"} == {"train_heads@logreg"}
    assert project.ran(project.dvc("repro").stdout) - {"prepare"} == {"train_heads@logreg", "evaluate@logreg"}
    params = yaml.safe_load((project.path / "params.yaml").read_text())
    params["heads"]["train"]["wide"] = {"kind": "logreg", "C": [0.001]}
    (project.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(project.dvc("status", "--json").stdout)
    assert set(status) - {"prepare"} == {"train_heads@wide", "evaluate@wide"}, status
