"""The ``finetune`` stage: the backbone plus its own warm-start head as one network, trained end to end.

Inputs: the prepare stage's manifest and the feature cache
``data/features/<backbone>.h5`` (the warm-start head is fitted on it, see
:mod:`pipeline.finetune.warmstart`); no file of the ``train_heads`` stage, so
editing ``heads.*`` never re-runs fine-tuning. Outputs: the model folder
``models/finetune/`` (:mod:`pipeline.finetune.checkpoint`), DVCLive's per-epoch metrics,
and the network's test-split metrics (``reports/finetune_metrics.json``, the
heads' keys under ``finetune``, computed here rather than by the heads'
``evaluate`` stage so that the heads' evaluation never waits for a network),
with its confusion data.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from dvclive import Live

from pipeline.backbones import load_backbone
from pipeline.cli import say
from pipeline.config import Config
from pipeline.data.manifest import read_prepared
from pipeline.errors import PipelineError
from pipeline.extract.cache import manifest_rows
from pipeline.metrics import head_metrics
from pipeline.extract.cache import features_path, open_cache
from pipeline.fileio import write_csv, write_json
from pipeline.finetune.cached import cached_views
from pipeline.finetune.checkpoint import save_finetuned
from pipeline.finetune.data import loader, split_validation
from pipeline.finetune.distributed import Workers, from_torchrun, launched_by_torchrun, leave, single
from pipeline.finetune.ray_engine import train_with_ray
from pipeline.finetune.network import build_network
from pipeline.finetune.resume import Checkpoints, run_key
from pipeline.finetune.train import FitResult, fit, predict_logits, replay
from pipeline.finetune.warmstart import fit_warm_start, keep_or_refit
from pipeline.provenance import made_from, trained_on
from pipeline.raycluster import check_reachable, import_ray
from pipeline.runtime import Placement, place

FINETUNE = "finetune"


def score_test(net, fs, features_file, prepared_dir, cfg: Config, transform,
               where: Placement) -> tuple[dict, np.ndarray, np.ndarray]:
    """The network's metrics on the cache's test photos (the heads' keys): ``(metrics, y, pred)``.

    The photos are those the heads are scored on, decoded from their files and
    checked against the manifest's content hashes. fp32, as ``predict`` scores it.
    """
    root, rows = manifest_rows(fs, features_file, prepared_dir)
    if not rows:
        raise PipelineError(f"{features_file} has no test rows; check the prepare stage's split")
    batches = loader(root, rows, transform, cfg.finetune.batch_size)
    logits, y = predict_logits(net.to(where.device), batches, where.device, flip=cfg.finetune.tta_flip)
    probs = torch.from_numpy(logits).double().softmax(1).numpy()
    pred = probs.argmax(1)
    return head_metrics(y, pred, probs, len(fs.classes), cfg.evaluate.top_k), y, pred


def run_finetune(cfg: Config, *, prepared_dir, features_dir, out_dir, live_dir, reports_dir, cache_dir) -> FitResult:
    """Fine-tune ``cfg.backbone`` from a head fitted on its training part; write the model, logs and test metrics.

    Under ``torchrun`` every process runs this function: each trains its share,
    and rank 0 alone scores and writes. With ``finetune.engine: ray`` this
    process is Ray's driver (:mod:`pipeline.finetune.ray_engine`).

    Example:
        >>> run_finetune(load_config(), prepared_dir="data/prepared", features_dir="data/features",
        ...              out_dir="models/finetune", live_dir="dvclive", reports_dir="reports",
        ...              cache_dir="data/cache/finetune")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    ft = cfg.finetune
    where = place(ft.device, ft.precision, section="finetune")  # once, for training and scoring
    workers = _workers(ft, where)
    try:
        return _run(cfg, where, workers, t0, prepared_dir=prepared_dir, features_dir=features_dir, out_dir=out_dir,
                    live_dir=live_dir, reports_dir=reports_dir, cache_dir=cache_dir)
    finally:
        leave(workers)


def _workers(ft, where: Placement) -> Workers:
    """This process's place: a torchrun worker, or alone (in-process, or the driver of Ray's workers)."""
    if launched_by_torchrun():
        if ft.engine == "ray":
            raise PipelineError("finetune.engine is 'ray' but the stage was started by torchrun; launch it "
                                "with python -m stages.finetune, or set finetune.engine: local")
        return from_torchrun(where.device)
    if ft.engine == "ray":  # refused now, before the warm start, rather than after it
        import_ray("finetune.engine", "ray.train.torch")
        check_reachable(ft.ray.address, "finetune.ray.address")
    if ft.engine == "local" and ft.workers > 1:
        raise PipelineError(f"finetune.workers is {ft.workers} with finetune.engine: local, which trains in this "
                            "process; set finetune.engine: ray, or launch torchrun --nproc_per_node "
                            f"{ft.workers} -m stages.finetune")
    return single(where.device)


def _run(cfg: Config, where: Placement, workers: Workers, t0: float, *, prepared_dir, features_dir, out_dir,
         live_dir, reports_dir, cache_dir) -> FitResult:
    ft = cfg.finetune
    log = say if workers.main else (lambda s: None)
    prepared = read_prepared(prepared_dir)
    bb = load_backbone(cfg.backbone.name, cfg.backbone.weights, cfg.backbone.input_size)
    features_file = features_path(features_dir, cfg.backbone.name)
    made_with = {k: v for k, v in bb.provenance().items() if k in ("backbone", "weights", "weights_sha256",
                                                                  "transform")}
    fs = open_cache(features_file, {**made_with, "classes": prepared.classes})
    rows = prepared.split("train")
    if not rows:
        raise PipelineError(f"{prepared_dir} lists no train images; check data.test_fraction")
    train_rows, val_rows = split_validation(rows, ft.val_fraction, ft.seed)
    head = fit_warm_start(fs, train_rows, C=ft.head_C, seed=ft.seed, source=features_file)
    warm_C = float(head.named_steps["clf"].C)
    log(f"finetune: warm-start head: logistic regression, C={warm_C:g} (by cross-validation over finetune.head_C), "
        f"fitted on the cached features of {len(train_rows)} train photos; {len(val_rows)} held out for validation")
    net = build_network(bb.features, head)
    views = (cached_views(net, backbone=bb, root=prepared.root, train_rows=train_rows, val_rows=val_rows, cfg=ft,
                          placement=where, cache_dir=cache_dir, log=log) if ft.cached_views else None)
    key = run_key(ft.learned_dict(), backbone=made_with, precision=where.precision.name, train_rows=train_rows,
                  val_rows=val_rows, start=net.state_dict())
    checkpoints = Checkpoints(cache_dir, key, log)
    ray = ft.engine == "ray"
    engine, world = ("ray", ft.workers) if ray else (workers.engine, workers.world_size)

    with (Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False) if workers.main else nullcontext()) as live:
        def on_epoch(epoch: int, m: dict) -> None:
            live.step = epoch
            for k, v in m.items():
                if k != "seconds":
                    live.log_metric(k, v)
            live.next_step()

        if ray:
            log(f"finetune: training on {ft.workers} Ray Train workers "
                f"({ft.ray.address or 'a local Ray instance'})")
            result = train_with_ray(net, backbone=bb, root=prepared.root, train_rows=train_rows, val_rows=val_rows,
                                    cfg=ft, placement=where, checkpoints=checkpoints, views=views)
            replay(result.history, on_epoch)  # the workers' epochs, logged here, where the files are written
        else:
            result = fit(net, backbone=bb.name, root=prepared.root, train_rows=train_rows, val_rows=val_rows,
                         transform_spec=bb.transform_spec, cfg=ft, on_epoch=on_epoch if workers.main else None,
                         log=log, placement=where, workers=workers, checkpoints=checkpoints, views=views)
        if not workers.main:
            return result
        live.summary.update(
            best_epoch=result.best_epoch,
            epochs_run=result.epochs_run,
            **({"best_val_accuracy": result.best_val_accuracy} if result.best_val_accuracy is not None else {}),
        )
    net, kept = keep_or_refit(net, result.best_epoch, fs, rows, C=ft.head_C, seed=ft.seed, source=features_file)
    if result.best_epoch == 0:
        log(f"finetune: no epoch beat the warm-start head on validation; the model is a {kept}")
    # Scored before anything is written: a test photo that cannot be used (changed since
    # the prepare stage, say) fails the stage with no model left under its final name.
    metrics, y, pred = score_test(net, fs, features_file, prepared_dir, cfg, bb.transform_spec.build(), where)
    training = {**result.summary(), "n_train": len(train_rows), "n_val": len(val_rows), "engine": engine,
                "world_size": world}
    save_finetuned(out_dir, net, bb, prepared.classes, precision=where.precision.name, made_from=made_from(fs.attrs),
                   params=ft.learned_dict(), training=training, metrics=metrics, data=trained_on(fs, prepared_dir),
                   warm_start={"head": "logreg", "C": warm_C, "n_train": len(train_rows)}, kept=kept)
    reports = Path(reports_dir)
    write_csv(reports / f"confusion_{FINETUNE}.csv", ["actual", "predicted"],
              [[fs.classes[a], fs.classes[p]] for a, p in zip(y, pred)])
    wall = time.perf_counter() - t0
    # Two entries: `dvc metrics show` lines finetune.accuracy up with logreg.accuracy
    # (reports/metrics_logreg.json), and the run's cost sits beside it.
    write_json(reports / "finetune_metrics.json", {
        FINETUNE: metrics,
        "finetune_run": {"wall_seconds": round(wall, 1), "training_seconds": round(result.seconds, 1),
                         "train_images_per_second": result.train_images_per_second,
                         "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                         "epochs_planned": result.epochs_planned, "kept": kept,
                         "kept_weights": result.kept_weights, "engine": engine, "world_size": world,
                         "resumed_from": result.resumed_from},
    })
    checkpoints.clear()  # the model is written: nothing is left to resume
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n_test")
    rate = f"{result.train_images_per_second:.1f}" if result.train_images_per_second else "-"
    weights = " (its average of the weights, finetune.ema)" if result.kept_weights == "ema" else ""
    log(f"finetune: kept epoch {result.best_epoch}{weights} ({result.stopped}); trained at {rate} images/s on {world} "
        f"worker{'s' if world > 1 else ''} ({engine}); test on {metrics['n_test']} images: {shown}; "
        f"{wall:.0f} s in all -> {out_dir}")
    return result
