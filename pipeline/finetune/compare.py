"""Measure fine-tuning choices over repeated stratified splits: ``python -m pipeline.finetune.compare``.

One photo moves a small test split by several points, so each choice is run on
several test splits (the ``data.seed`` values the prepare stage would draw) and
reported as mean and spread, beside the user's logreg head (C by 5-fold CV on
the whole train split, as ``train_heads`` fits it) on the same splits.

The features come from an existing cache (``dvc repro extract`` on the photo
folder, or ``python -m stages.extract``): one extraction serves every split.

Example:
    python -m pipeline.finetune.compare --project /tmp/dogs --seeds 0 1 2 \\
        --variant base= --variant ema=ema=0.9 --variant tta=tta_flip=true --out compare.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.backbones import load_backbone
from pipeline.config import load_config, read_yaml
from pipeline.data.manifest import read_prepared, stratified_holdout
from pipeline.metrics import head_metrics
from pipeline.extract.cache import features_path, open_cache
from pipeline.finetune.cached import cached_views
from pipeline.finetune.data import loader, split_validation
from pipeline.finetune.network import build_network
from pipeline.finetune.train import fit, predict_logits
from pipeline.finetune.warmstart import cached_rows, fit_warm_start, keep_or_refit
from pipeline.heads.batch import make_head
from pipeline.runtime import place


def _value(text: str):
    return read_yaml(text)


def parse_variant(spec: str) -> tuple[str, dict]:
    """``name=key=value,key=value`` -> ``(name, {key: value})`` (values as YAML; ``augment.mixup=0.2`` reaches in)."""
    name, _, rest = spec.partition("=")
    pairs = [p.split("=", 1) for p in rest.split(",") if p]
    return name, {k: _value(v) for k, v in pairs}


def _with(section, overrides: dict):
    """``section`` with ``overrides`` applied; a dotted key (``augment.mixup``) reaches into a sub-section."""
    top = {k: v for k, v in overrides.items() if "." not in k}
    for key, value in overrides.items():
        if "." in key:
            head, rest = key.split(".", 1)
            top[head] = _with(top.get(head, getattr(section, head)), {rest: value})
    return dataclasses.replace(section, **top)


def run_split(project: Path, seed: int, variants: list[tuple[str, dict]], test_fraction: float) -> dict:
    """Every variant (and the user's logreg head) on the test split drawn with ``seed``."""
    cfg = load_config(project / "params.yaml")
    prepared = read_prepared(project / "data/prepared")
    bb = load_backbone(cfg.backbone.name, cfg.backbone.weights, cfg.backbone.input_size)
    fs = open_cache(features_path(project / "data/features", cfg.backbone.name))
    rows = [r._replace(split="train") for r in prepared.rows]
    test = stratified_holdout([r.path for r in rows], [prepared.classes[r.label] for r in rows], test_fraction, seed)
    train = [r for r, t in zip(rows, test) if not t]
    test_rows = [r for r, t in zip(rows, test) if t]
    n_classes = len(prepared.classes)

    i_train, i_test = cached_rows(fs, train, "cache"), cached_rows(fs, test_rows, "cache")
    search = make_head("logreg", C=list(cfg.heads.head("logreg").C), y=fs.labels[i_train], seed=cfg.heads.seed)
    search.fit(fs.features[i_train], fs.labels[i_train])
    y_test = fs.labels[i_test]
    out = {"logreg": head_metrics(y_test, search.predict(fs.features[i_test]),
                                  search.predict_proba(fs.features[i_test]), n_classes)}
    for name, overrides in variants:
        ft = _with(cfg.finetune, overrides)
        where = place(ft.device, ft.precision, section="finetune")  # a variant may change the precision
        tr, va = split_validation(train, ft.val_fraction, ft.seed)
        head = fit_warm_start(fs, tr, C=ft.head_C, seed=ft.seed, source="cache")
        fresh = load_backbone(cfg.backbone.name, cfg.backbone.weights, cfg.backbone.input_size)
        net = build_network(fresh.features, head)
        t0 = time.perf_counter()
        # The views' file is built inside the timed run, as the stage's first run builds it.
        views = cached_views(net, backbone=fresh, root=prepared.root, train_rows=tr, val_rows=va, cfg=ft,
                             placement=where, cache_dir=project / "data/cache/finetune",
                             log=lambda s: None) if ft.cached_views else None
        t_views = time.perf_counter() - t0
        res = fit(net, backbone=bb.name, root=prepared.root, train_rows=tr, val_rows=va,
                  transform_spec=bb.transform_spec, cfg=ft, log=lambda s: None, placement=where, views=views)
        # Measured, not shipped: would averaging with the warm-start head be worth a candidate?
        ensemble = _ensemble(net, head, fs, va, test_rows, prepared.root, bb.transform_spec, where.device) \
            if res.best_epoch else {}
        net, kept = keep_or_refit(net, res.best_epoch, fs, train, C=ft.head_C, seed=ft.seed, source="cache")
        seconds = time.perf_counter() - t0 - ensemble.pop("seconds", 0.0)  # the stage's work, not this measurement
        dev = where.device
        # The same network scored plain and with the flip: what tta_flip adds at test time alone.
        scored = {}
        for flip in (False, True):
            batches = loader(prepared.root, test_rows, bb.transform_spec.build(), 32)
            logits, y = predict_logits(net, batches, dev, flip=flip)
            scored[flip] = torch.from_numpy(logits).double().softmax(1).numpy()
        probs = scored[ft.tta_flip]
        m = head_metrics(y, probs.argmax(1), probs, n_classes)
        m.update(accuracy_plain=float((scored[False].argmax(1) == y).mean()),
                 accuracy_flip=float((scored[True].argmax(1) == y).mean()),
                 seconds=round(seconds, 1), views_seconds=round(t_views, 1),
                 train_images_per_second=res.train_images_per_second,
                 best_epoch=res.best_epoch, epochs_run=res.epochs_run, kept=kept,
                 val_start=res.history[0].get("val/accuracy") if res.history else None,
                 best_val=res.best_val_accuracy, **ensemble)
        if ensemble:  # the candidates' choice with the ensemble among them: picked by more validation photos
            better = ensemble["val_ensemble"] > ensemble["val_network"]
            m["accuracy_with_ensemble"] = ensemble["test_ensemble"] if better else m["accuracy"]
        out[name] = m
        print(f"seed {seed} {name}: test {m['accuracy']:.4f}, flipped {m['accuracy_flip']:.4f} "
              f"(logreg {out['logreg']['accuracy']:.4f}), validation {m['val_start']} -> {m['best_val']}, "
              f"epoch {res.best_epoch}/{res.epochs_run}, {m['seconds']:.0f} s ({t_views:.0f} s caching views), "
              f"training {res.train_images_per_second} img/s", flush=True)
    return out


def _ensemble(net, head, fs, val_rows, test_rows, root, spec, device) -> dict:
    """Accuracy of the trained network alone and averaged (probabilities) with its warm-start head, on both slices."""
    t0 = time.perf_counter()
    out = {}
    for part, rows in (("val", val_rows), ("test", test_rows)):
        logits, y = predict_logits(net, loader(root, rows, spec.build(), 32), device)
        p_net = torch.from_numpy(logits).double().softmax(1).numpy()
        p_head = head.predict_proba(fs.features[cached_rows(fs, rows, "cache")])
        out[f"{part}_network"] = float((p_net.argmax(1) == y).mean())
        out[f"{part}_ensemble"] = float((((p_net + p_head) / 2).argmax(1) == y).mean())
    out["seconds"] = time.perf_counter() - t0
    return out


def summarise(runs: dict) -> dict:
    """Per variant: mean and standard deviation over splits of test accuracy, and of its gain over logreg."""
    names = next(iter(runs.values())).keys()
    out = {}
    for name in names:
        acc = np.array([r[name]["accuracy"] for r in runs.values()])
        gain = acc - np.array([r["logreg"]["accuracy"] for r in runs.values()])
        secs = [r[name].get("seconds", 0.0) for r in runs.values()]
        rates = [r[name]["train_images_per_second"] for r in runs.values() if r[name].get("train_images_per_second")]
        flip = np.array([r[name].get("accuracy_flip", np.nan) for r in runs.values()])
        with_ensemble = np.array([r[name].get("accuracy_with_ensemble", r[name]["accuracy"]) for r in runs.values()])
        out[name] = {"accuracy_mean": round(float(acc.mean()), 4), "accuracy_std": round(float(acc.std()), 4),
                     "gain_mean": round(float(gain.mean()), 4), "gain_std": round(float(gain.std()), 4),
                     "flip_accuracy_mean": round(float(flip.mean()), 4), "flip_accuracy_std": round(float(flip.std()), 4),
                     "seconds_mean": round(float(np.mean(secs)), 1), "splits": len(acc),
                     "train_images_per_second_mean": round(float(np.mean(rates)), 1) if rates else None,
                     "epochs_kept": [r[name].get("best_epoch") for r in runs.values()],
                     "with_ensemble_mean": round(float(with_ensemble.mean()), 4),
                     "with_ensemble_std": round(float(with_ensemble.std()), 4)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True, help="a project with data/prepared and the feature cache")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--variant", action="append", default=[], help="name=key=value,key=value (finetune keys)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant] or [("base", {})]
    runs = {s: run_split(args.project, s, variants, args.test_fraction) for s in args.seeds}
    summary = summarise(runs)
    for name, s in summary.items():
        print(f"{name}: accuracy {s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f}, gain over logreg "
              f"{s['gain_mean']:+.4f} ± {s['gain_std']:.4f}, {s['seconds_mean']:.0f} s, training "
              f"{s['train_images_per_second_mean']} img/s, epochs kept {s['epochs_kept']}, with the ensemble "
              f"candidate {s['with_ensemble_mean']:.4f} ± {s['with_ensemble_std']:.4f}, {s['splits']} splits")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
