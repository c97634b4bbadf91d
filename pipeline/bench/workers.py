"""The finetune stage on 1 and 2 workers, and killed then resumed: whole processes on the same photos.

Runs, in one scratch folder prepared and extracted once (fp32 on the CPU, no validation slice, so
the last epoch is kept):
the stage in one process; under ``torchrun --nproc_per_node 2``; on 2 Ray Train
workers of a local Ray instance; and killed with SIGKILL after a random number of
its checkpoints, then run again to the end. Each is timed from start to exit and
compared with the one-process run: test accuracy, the epochs' training and
validation losses, and the largest difference of any weight.

Example:
    python -m pipeline.bench workers --folder ../shared/data/dogbreeds10 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.bench.common import describe_cpu, finetune_result, scratch_project, set_finetune, stage_env, timed_run


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--folder", required=True, type=Path, help="a <class>/<image> folder")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-workers"), help="scratch folder (emptied)")
    ap.add_argument("--seed", type=int, default=0, help="of the kill's moment")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")


def _compare(run: dict, base: dict) -> dict:
    dw = max(float((run["weights"][k].double() - base["weights"][k].double()).abs().max()) for k in base["weights"])
    dl = max((abs(a - b) for k, v in base["epochs"].items() for a, b in zip(v, run["epochs"].get(k, []))),
             default=0.0)
    return {"max_weight_diff": dw, "max_epoch_metric_diff": dl}


def _kill_after_checkpoints(work: Path, n: int, delay: float) -> float:
    """Start the stage, SIGKILL it ``delay`` s after its ``n``-th checkpoint; its wall seconds."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stages.finetune"], cwd=work, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = set()
    while proc.poll() is None and len(seen) < n:
        for f in (work / "data/cache/finetune").glob("*/checkpoint.safetensors"):
            try:
                st = f.stat()
                seen.add((st.st_ino, st.st_mtime_ns))
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit("the run ended before it was killed; give it more epochs")
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> dict:
    work = args.work
    # No validation slice: the last epoch is kept, so the weights compared are trained ones (with
    # one, the guard may keep the head, equal in every run).
    params = scratch_project(work, data=dict(source="folder", folder=str(args.folder.resolve()), test_fraction=0.2),
                             backbone=dict(name=args.backbone, weights="DEFAULT"),
                             extract=dict(device="cpu", precision="fp32"),
                             finetune=dict(device="cpu", precision="fp32", epochs=args.epochs, val_fraction=0.0))
    env = stage_env()
    for stage in ("prepare", "extract"):
        timed_run([sys.executable, "-m", f"stages.{stage}"], work, env)
    print(f"# finetune on 1 and 2 workers: {args.folder}, {args.backbone}, {args.epochs} epochs, fp32, "
          f"batch {params['finetune']['batch_size']}; {describe_cpu()}", flush=True)

    runs = {}
    launches = {
        "1 process (2 threads)": ([sys.executable, "-m", "stages.finetune"], {}),
        "torchrun, 2 workers (1 thread each)": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 "2", "-m", "stages.finetune"], {}),
        "Ray Train, 2 workers (1 CPU each)": ([sys.executable, "-m", "stages.finetune"], {"engine": "ray",
                                                                                          "workers": 2}),
    }
    for name, (cmd, settings) in launches.items():
        set_finetune(work, **{"engine": "local", "workers": 1, "checkpoint_every": 0, **settings})
        seconds, _, _ = timed_run(cmd, work, env)
        runs[name] = {"seconds": seconds, **finetune_result(work)}
    rng = random.Random(args.seed)
    set_finetune(work, engine="local", workers=1, checkpoint_every=1)
    n, delay = rng.randint(2, 6), rng.uniform(0, 1)
    killed = _kill_after_checkpoints(work, n, delay)
    seconds, out, _ = timed_run([sys.executable, "-m", "stages.finetune"], work, env)
    name = f"killed after checkpoint {n} (+{delay:.2f} s), resumed"
    runs[name] = {"seconds": killed + seconds, **finetune_result(work),
                  "resumed": next((line for line in out.splitlines() if "resuming" in line), "")}
    set_finetune(work, checkpoint_every=0)

    base = runs["1 process (2 threads)"]
    print("| run | wall s (start to exit) | test accuracy | kept | max weight diff vs 1 process | "
          "max epoch-metric diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    table = {}
    for name, r in runs.items():
        cmp = _compare(r, base)
        fr = r["finetune_run"]
        table[name] = {"seconds": round(r["seconds"], 1), "accuracy": r["finetune"]["accuracy"],
                       "n_test": r["finetune"]["n_test"], "kept": fr["kept"], "best_epoch": fr["best_epoch"],
                       "train_images_per_second": fr["train_images_per_second"], **cmp}
        print(f"| {name} | {r['seconds']:.1f} | {r['finetune']['accuracy']:.4f} of {r['finetune']['n_test']} | "
              f"{fr['kept']} (epoch {fr['best_epoch']}) | {cmp['max_weight_diff']:.1e} | "
              f"{cmp['max_epoch_metric_diff']:.1e} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))
    return table
