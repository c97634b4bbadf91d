"""``finetune.engine: ray``: the same loop (:func:`pipeline.finetune.train.fit`) in each worker of Ray Train's ``TorchTrainer``.

The stage's process is Ray's driver: it fits the warm-start head, sends the
network's starting weights to ``finetune.workers`` workers, and gets back the
kept weights and the run's summary, as a Ray checkpoint of rank 0. Everything
else (the guard, the test scores, the model folder, DVCLive's log) it then does
itself, exactly as after an in-process run.

A worker that dies is restarted by Ray Train (``finetune.ray.max_failures``)
and resumes from the run's own checkpoint (:mod:`pipeline.finetune.resume`),
which therefore lives where every worker reads it: the project folder, which on
a cluster is a shared file system, as the photos are.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.backbones import load_backbone
from pipeline.cli import say
from pipeline.config import FinetuneConfig
from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.finetune.cached import Views
from pipeline.finetune.distributed import backend_for, from_ray
from pipeline.finetune.network import FineTuneNet
from pipeline.finetune.resume import Checkpoints
from pipeline.finetune.train import FitResult, fit
from pipeline.raycluster import check_resources, connect, import_ray, pipeline_error_in
from pipeline.runtime import Placement, place

FINAL = "final.safetensors"
SUMMARY = "fit.json"


def _worker(config: dict) -> None:
    """One Ray Train worker: rebuild the network from the driver's weights, run the loop, report rank 0's result."""
    import ray.train

    cfg: FinetuneConfig = config["cfg"]
    bb = load_backbone(config["backbone"], config["weights"], config["input_size"], pretrained=False)
    net = FineTuneNet(bb.features, nn.Linear(bb.feature_dim, config["classes"]))
    net.load_state_dict(config["start"])
    where = place(cfg.device, cfg.precision, section="finetune")
    workers = from_ray(where.device)
    log = say if workers.main else (lambda s: None)
    result = fit(net, backbone=bb.name, root=config["root"], train_rows=config["train_rows"],
                 val_rows=config["val_rows"], transform_spec=bb.transform_spec, cfg=cfg, log=log,
                 placement=where, workers=workers, checkpoints=Checkpoints(config["cache"], config["key"], log),
                 views=config["views"])
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if workers.main:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()},
                      os.path.join(d, FINAL))
            Path(d, SUMMARY).write_text(json.dumps(asdict(result)))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        # Every worker reports (a collective in Ray Train); rank 0 alone with the weights.
        ray.train.report({"best_epoch": result.best_epoch}, checkpoint=checkpoint)


def train_with_ray(net: FineTuneNet, *, backbone, root, train_rows: Sequence[Row], val_rows: Sequence[Row],
                   cfg: FinetuneConfig, placement: Placement, checkpoints: Checkpoints,
                   views: Views | None = None) -> FitResult:
    """Fine-tune ``net`` on ``cfg.workers`` Ray Train workers; load the kept weights into it.

    Args:
        backbone: the :class:`~pipeline.backbones.Backbone` ``net`` was built from (workers rebuild it by name).
        checkpoints: the run's checkpoint, which the workers save and resume from; Ray Train's own
            records go in its folder too, so both go when the model is written.
        views: the cached activations to train on (:mod:`pipeline.finetune.cached`), in the project
            folder, which the workers share.
    """
    ray = import_ray("finetune.engine", "ray.train.torch")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.ray
    cuda = placement.device.type == "cuda"
    started = connect(ray, r.address, max(os.cpu_count() or 1, int(cfg.workers * r.cpus_per_worker + 0.999)),
                      "finetune.ray.address")
    try:
        check_resources(ray, r.address, cfg.workers, {"CPU": r.cpus_per_worker, "GPU": 1 if cuda else 0},
                        f"finetune.workers={cfg.workers} workers",
                        "lower finetune.workers or finetune.ray.cpus_per_worker",
                        warn=lambda line: say(f"finetune: {line}"))
        folder = checkpoints.path.parent.resolve()
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg, "backbone": backbone.name, "weights": backbone.weights,
                               "input_size": backbone.input_size, "classes": net.head.out_features,
                               "start": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                               "root": str(Path(root).resolve()), "train_rows": list(train_rows),
                               "val_rows": list(val_rows), "cache": str(checkpoints.cache.resolve()),
                               "key": checkpoints.key,
                               "views": (replace(views, path=str(Path(views.path).resolve()))
                                         if views is not None else None)},
            torch_config=TorchConfig(backend=backend_for(placement.device)),
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cuda,
                                         resources_per_worker={"CPU": r.cpus_per_worker}),
            run_config=RunConfig(name="ray", storage_path=str(folder),
                                 failure_config=FailureConfig(max_failures=r.max_failures)),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - a user error raised in a worker, however Ray wrapped it
            found = pipeline_error_in(e)
            if found is not None:
                raise PipelineError(str(found)) from None
            raise PipelineError(f"Ray Train failed: {str(e).splitlines()[0][:300]}") from None
        if result.checkpoint is None:
            raise PipelineError("Ray Train ended without the kept weights; see the workers' log above")
        with result.checkpoint.as_directory() as d:
            net.load_state_dict(load_file(os.path.join(d, FINAL)))
            summary = json.loads(Path(d, SUMMARY).read_text())
        return FitResult(**summary)
    finally:
        if started:
            ray.shutdown()
