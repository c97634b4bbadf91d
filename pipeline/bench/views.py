"""The finetune stage over photos and over cached views (``finetune.cached_views``): whole processes.

In one scratch project, prepared and extracted once, with the same photos and
params (``finetune.epochs`` E and ``patience`` E, so that every epoch runs):

1. the stage as it trains by default, decoding every photo in every epoch;
2. the stage with ``cached_views: K``, its first run, which computes the views;
3. the same with another learning rate, which finds the views and trains only;
4. that learning rate over photos again: what the same edit costs without views.

Each is timed from start to exit. The table gives their wall seconds, training
images/s, test accuracy and the epoch kept, and how far runs 1 and 2 differ in
the training loss of the first min(E, K) epochs, where both read the same crops.

Example:
    python -m pipeline.bench views --folder ../shared/data/dogbreeds10 --epochs 6 --views 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.bench.common import describe_cpu, finetune_result, scratch_project, set_finetune, stage_env, timed_run


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--folder", required=True, type=Path, help="a <class>/<image> folder")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--views", type=int, default=3, help="finetune.cached_views of the cached runs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-views"), help="scratch folder (emptied)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")


def run(args: argparse.Namespace) -> dict:
    work, epochs, k = args.work, args.epochs, args.views
    params = scratch_project(work, data=dict(source="folder", folder=str(args.folder.resolve()), test_fraction=0.2),
                             backbone=dict(name=args.backbone, weights="DEFAULT"),
                             finetune=dict(epochs=epochs, patience=epochs))
    env = stage_env()
    for stage in ("prepare", "extract"):
        timed_run([sys.executable, "-m", f"stages.{stage}"], work, env)
    ft = params["finetune"]
    lr = ft["lr_head"] * 2
    print(f"# the finetune stage over photos and over {k} cached views: {args.folder}, {args.backbone}, "
          f"{epochs} epochs, batch {ft['batch_size']}, precision {ft['precision']}; {describe_cpu()}", flush=True)
    plan = {
        "photos (cached_views 0)": {"cached_views": 0},
        f"cached_views {k}, first run (computes the views)": {"cached_views": k},
        f"cached_views {k}, lr_head x2 (views found)": {"cached_views": k, "lr_head": lr},
        "photos, lr_head x2": {"cached_views": 0, "lr_head": lr},
    }
    runs = {}
    for name, settings in plan.items():
        set_finetune(work, **{"cached_views": 0, "lr_head": ft["lr_head"], **settings})
        seconds, out, _ = timed_run([sys.executable, "-m", "stages.finetune"], work, env)
        runs[name] = {"seconds": seconds, **finetune_result(work),
                      "views_line": next((line for line in out.splitlines()
                                          if line.startswith(("finetune: cached ", "finetune: reusing the cached"))),
                                         "")}
    names = list(plan)
    same = min(epochs, k)
    # DVCLive's train/loss rows are epochs 1.. (epoch 0, the warm start, has validation scores only).
    a, b = (runs[n]["epochs"].get("train/loss", [])[:same] for n in names[:2])
    gap = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=float("nan"))
    print("| run | wall s (start to exit) | vs photos | training img/s | test accuracy | kept |")
    print("| --- | --- | --- | --- | --- | --- |")
    table = {}
    for i, (name, r) in enumerate(runs.items()):
        fr = r["finetune_run"]
        base = runs[names[3] if i >= 2 else names[0]]["seconds"]
        table[name] = {"seconds": round(r["seconds"], 1), "speedup": round(base / r["seconds"], 2),
                       "train_images_per_second": fr["train_images_per_second"], "accuracy": r["finetune"]["accuracy"],
                       "n_test": r["finetune"]["n_test"], "kept": fr["kept"], "best_epoch": fr["best_epoch"],
                       "views": r["views_line"]}
        print(f"| {name} | {r['seconds']:.1f} | {base / r['seconds']:.2f}x | {fr['train_images_per_second']} | "
              f"{r['finetune']['accuracy']:.4f} of {r['finetune']['n_test']} | {fr['kept']} "
              f"(epoch {fr['best_epoch']}) |", flush=True)
    print(f"largest relative difference of the training loss, epochs 1-{same}, photos against views: {gap:.2e}")
    for name, r in runs.items():
        if r["views_line"]:
            print(f"{name}: {r['views_line']}")
    table["train_loss_relative_difference"] = gap
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))
    return table
