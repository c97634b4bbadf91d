"""Swap a setting and swap it back: the heads' reports are the fresh run's again.

Each sequence runs the real ``dvc repro`` (and once ``dvc exp run -S``) in a
temporary git repository on a small slice of the sample photos. After going
X -> Y -> X, every head's reports (cross-validation, test metrics, per-class
table, confusion data) and the provenance recorded in its model folder must
equal those of the first, fresh run of X, and ``dvc status`` must be clean:
DVC never shows one configuration's numbers under another's name.
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers_dvc import heads_reports, sample_slice

pytestmark = [pytest.mark.slow, pytest.mark.sample_data]

A, B = "efficientnet_lite0", "efficientnet_lite2"


def _base(photos) -> dict:
    return dict(
        data={"source": "folder", "folder": str(photos), "test_fraction": 0.25, "seed": 0},
        backbone={"name": A, "weights": "DEFAULT"},
        extract={"precision": "fp32", "decoder": "pillow-exact"},
        heads={"cv_folds": 3, "backbones": []},
    )


def _repro(project, said: list | None = None, **params) -> dict:
    project.set_params(**params)
    out = project.dvc("repro", "evaluate").stdout
    if said is not None:
        said.append(out)
    return heads_reports(project.path)


def _clean(project) -> None:
    # The heads' branch and what it reads (fine-tuning and visualize are not run here).
    status = json.loads(project.dvc("status", "evaluate", "--json").stdout)
    assert set(status) <= {"prepare"}, status


def _same(now: dict, fresh: dict, what: str) -> None:
    differ = sorted(k for k in fresh if now.get(k) != fresh[k])
    assert not differ, f"after {what}, these differ from the fresh run: {differ}\n" + "\n".join(
        f"{k}:\n  now   {now.get(k)}\n  fresh {fresh[k]}" for k in differ[:3])


def test_each_swap_and_back_gives_the_fresh_runs_results(project, catsdogs, tmp_path):
    from pipeline.runtime import cpu_has_native_bf16

    photos = sample_slice(catsdogs, tmp_path / "photos", per_class=8)
    fresh = _repro(project, **_base(photos))
    assert fresh["reports/metrics_logreg.json"]["made_from"]["backbone"] == A
    project.commit("fresh run of A")

    # backbone A -> B -> A; the way back costs no extraction: DVC's run cache has A's features
    said = []
    middle = _repro(project, said, backbone={"name": B})
    assert "Running stage 'extract'" in said[-1]
    assert middle["reports/metrics_logreg.json"]["made_from"]["backbone"] == B
    assert middle["models/logreg:made_from"]["backbone"] == B
    _same(_repro(project, said, backbone={"name": A}), fresh, f"backbone {A} -> {B} -> {A}")
    assert "Stage 'extract' is cached - skipping run, checking out outputs" in said[-1], said[-1]
    assert (project.path / f"data/features/{A}.h5").is_file()
    _clean(project)

    # An extract param and cache attribute: precision fp32 -> bf16 -> fp32 where the CPU computes bf16
    # natively, else decoder pillow-exact -> pillow -> pillow-exact (the same path; one of them is enough).
    if cpu_has_native_bf16():
        middle = _repro(project, extract={"precision": "bf16"})
        assert middle["reports/metrics_logreg.json"]["made_from"]["precision"] == "bf16"
        _same(_repro(project, extract={"precision": "fp32"}), fresh, "precision fp32 -> bf16 -> fp32")
    else:
        middle = _repro(project, extract={"decoder": "pillow"})
        assert middle["reports/metrics_logreg.json"]["made_from"]["decoder"] == "pillow"
        _same(_repro(project, extract={"decoder": "pillow-exact"}), fresh, "decoder pillow-exact -> pillow -> back")
    _clean(project)

    # heads.backbones [] -> [B] -> []
    middle = _repro(project, heads={"backbones": [B]})
    assert middle["reports/metrics_logreg.json"]["made_from"]["heads_backbones"] == [B]
    assert middle["reports/metrics_logreg.json"]["made_from"]["backbone"] == f"{A} + {B}"
    _same(_repro(project, heads={"backbones": []}), fresh, f"heads.backbones [] -> [{B}] -> []")
    _clean(project)

    # a photo added, then removed
    extra = sorted((catsdogs / "cat").iterdir())[-1]
    shutil.copy2(extra, photos / "cat" / extra.name)
    middle = _repro(project)
    assert middle["reports/metrics_logreg.json"]["made_from"]["manifest_sha256"] != \
        fresh["reports/metrics_logreg.json"]["made_from"]["manifest_sha256"]
    (photos / "cat" / extra.name).unlink()
    _same(_repro(project), fresh, "a photo added, then removed")
    _clean(project)

    # The same through experiments: dvc exp run -S, the way the README suggests trying a backbone.
    project.dvc("exp", "run", "evaluate", "-S", f"backbone.name={B}")
    assert heads_reports(project.path)["reports/metrics_logreg.json"]["made_from"]["backbone"] == B
    project.dvc("exp", "run", "evaluate", "-S", f"backbone.name={A}")
    _same(heads_reports(project.path), fresh, f"dvc exp run -S backbone.name={B}, then ={A}")
    _clean(project)
