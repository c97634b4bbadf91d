"""The ``finetune`` stage: the backbone plus the logreg head as one network, trained end to end.

Inputs: the prepare stage's manifest and ``models/logreg.joblib``. Outputs:
``models/finetune.pt`` + ``.json`` (:mod:`pipeline.finetune.checkpoint`) and
DVCLive's per-epoch metrics and plots.
"""

from __future__ import annotations

from dvclive import Live

from pipeline.backbones import load_backbone
from pipeline.config import Config
from pipeline.data.manifest import read_prepared
from pipeline.errors import PipelineError
from pipeline.finetune.checkpoint import save_finetuned
from pipeline.finetune.data import split_validation
from pipeline.finetune.network import build_network
from pipeline.finetune.train import FitResult, fit
from pipeline.heads.model import load_head


def run_finetune(cfg: Config, *, prepared_dir, head_path, out_path, live_dir) -> FitResult:
    """Fine-tune ``cfg.backbone`` from the head at ``head_path``; write ``out_path`` (+ .json) and DVCLive logs.

    Example:
        >>> run_finetune(load_config(), prepared_dir="data/prepared", head_path="models/logreg.joblib",
        ...              out_path="models/finetune.pt", live_dir="dvclive")        # doctest: +SKIP
    """
    ft = cfg.finetune
    prepared = read_prepared(prepared_dir)
    bb = load_backbone(cfg.backbone.name, cfg.backbone.weights, cfg.backbone.input_size)
    head = load_head(head_path, {**bb.provenance(), "classes": prepared.classes})
    rows = prepared.split("train")
    if not rows:
        raise PipelineError(f"{prepared_dir} lists no train images; check data.test_fraction")
    train_rows, val_rows = split_validation(rows, ft.val_fraction, ft.seed)
    net = build_network(bb.features, head["estimator"])

    with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False) as live:
        def on_epoch(epoch: int, m: dict) -> None:
            live.step = epoch
            for k, v in m.items():
                if k != "seconds":
                    live.log_metric(k, v)
            live.next_step()

        result = fit(net, backbone=bb.name, root=prepared.root, train_rows=train_rows, val_rows=val_rows,
                     transform_spec=bb.transform_spec, cfg=ft, on_epoch=on_epoch)
        live.summary.update(
            best_epoch=result.best_epoch,
            epochs_run=result.epochs_run,
            **({"best_val_accuracy": result.best_val_accuracy} if result.best_val_accuracy is not None else {}),
        )
    save_finetuned(
        out_path, net, bb, prepared.classes,
        init_head=str(head_path),
        params=ft.to_dict(),
        training={**result.summary(), "n_train": len(train_rows), "n_val": len(val_rows)},
    )
    print(f"finetune: kept epoch {result.best_epoch} ({result.stopped}) after {result.seconds:.0f} s -> {out_path}",
          flush=True)
    return result
