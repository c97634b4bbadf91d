"""Whole-process timings: what a user waits for, from process start to exit.

``python -m pipeline.bench process`` (or ``extract --whole-process``) runs, in one
sitting on the same photos:

- the ``extract`` stage as a subprocess (``python -m stages.extract`` in a
  scratch project) with an empty feature store, twice: first with an empty
  compile cache (a machine's first run), then with the compile cache that run
  left (a user's usual run);
- the lesson's loop as a subprocess: ImageFolder + DataLoader (2 workers), the
  weights' transform, fp32 under ``no_grad``.

Both count imports, model loading, compilation and writing. ``make_set``
builds a larger set of distinct files from a few photos (re-encoded, flipped,
cropped, rescaled), since the stage computes identical files only once.

Example:
    python -m pipeline.bench process --folder ../shared/data/catsdogs --backbone efficientnet_lite0 --baseline
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml
from PIL import Image, ImageOps

from pipeline.bench.common import ROOT, add_photo_arguments, rewrite_folder, timed_run
from pipeline.data.sources import prepare
from pipeline.runtime import compile_cache_warm

#: The variants make_set writes of each photo: every one is a different file.
VARIANTS = (
    ("q90", lambda im: im),
    ("flip", ImageOps.mirror),
    ("crop", lambda im: im.crop((im.width // 10, im.height // 10, im.width, im.height))),
    ("small", lambda im: im.resize((im.width * 4 // 5, im.height * 4 // 5), Image.BICUBIC)),
    ("q75", lambda im: im),
    ("flipcrop", lambda im: ImageOps.mirror(im).crop((0, 0, im.width * 9 // 10, im.height * 9 // 10))),
)


def make_set(sources: list[Path], dest: Path, copies: int = len(VARIANTS)) -> int:
    """Write ``copies`` distinct JPEG variants of every ``<class>/<image>`` of ``sources`` into ``dest``."""

    def variants(f: Path, out: Path) -> int:
        with Image.open(f) as im:
            im = im.convert("RGB")
            for name, change in VARIANTS[:copies]:
                change(im).save(out / f"{f.stem}_{name}.jpg", quality=75 if "75" in name else 90)
        return len(VARIANTS[:copies])

    return sum(rewrite_folder(src, dest, variants) for src in sources)


LESSON_LOOP = textwrap.dedent(
    """
    import sys, time
    import torch
    from pipeline.backbones import load_backbone
    from pipeline.bench.extract import straightforward_loader
    bb = load_backbone(sys.argv[2], sys.argv[3])
    ds, loader = straightforward_loader(sys.argv[1], bb.transform_spec, batch_size=32, workers=2)
    model = bb.features.eval()
    n = 0
    with torch.no_grad():
        for x, _ in loader:
            n += model(x).shape[0]
    print(n)
    """
)


def whole_process(folder, backbone: str, weights: str = "DEFAULT", precision: str = "auto",
                  decoder: str = "auto", compile="auto", lesson: bool = True) -> dict:
    """Time the stage (cold and warm compile cache) and the lesson's loop as whole processes."""
    folder = Path(folder).resolve()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-process-") as tmp:
        tmp = Path(tmp)
        prepare(source="folder", folder=folder, out_dir=tmp / "data/prepared", test_fraction=0.2)
        params = {"backbone": {"name": backbone, "weights": weights},
                  "extract": {"precision": precision, "decoder": decoder, "compile": compile,
                              "store": str(tmp / "store")}}
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"))
        for run in ("cold", "warm"):
            seconds, stdout, stderr = timed_run([sys.executable, "-m", "stages.extract"], tmp, env)
            log = stdout + stderr
            stats = json.loads((tmp / "reports/extract.json").read_text())["extract"]
            out[f"stage_{run}_s"] = seconds
            out[f"stage_{run}_ips"] = stats["images_per_second"]  # the network phase: decoding + network
            out["images"] = stats["images"]
            out[f"first_batch_{run}_s"] = stats["first_batch_seconds"]
            out[f"stage_{run}_log"] = [line for line in log.splitlines() if line.startswith("extract:")]
            (tmp / "store").rename(tmp / f"store-{run}")  # the next run starts with an empty store
            if run == "cold":  # an eager first run leaves nothing for the second to reuse
                out["compiled_graphs_left"] = compile_cache_warm(env["TORCHINDUCTOR_CACHE_DIR"])
        if lesson:
            out["lesson_s"], _, _ = timed_run([sys.executable, "-c", LESSON_LOOP, str(folder), backbone, weights],
                                              tmp, env)
    return out


def report(r: dict, backbone: str) -> str:
    n = r["images"]
    lines = [f"whole process, {backbone}, {n} images (process start to exit):",
             f"  stage, empty store, cold compile cache: {r['stage_cold_s']:6.1f} s ({n / r['stage_cold_s']:.1f} img/s)"
             f", first batch after {r['first_batch_cold_s']} s",
             f"  stage, empty store, compile cache the first run left: {r['stage_warm_s']:6.1f} s "
             f"({n / r['stage_warm_s']:.1f} img/s), first batch after {r['first_batch_warm_s']} s"
             + ("" if r.get("compiled_graphs_left", True) else " (it held no compiled graph: the first run stayed eager)")]
    lines += [f"    {line}" for run in ("cold", "warm") for line in r[f"stage_{run}_log"]
              if "compile auto" in line or " images in " in line]
    if "lesson_s" in r:
        lines.append(f"  lesson loop (ImageFolder + DataLoader, 2 workers, fp32): {r['lesson_s']:6.1f} s "
                     f"({n / r['lesson_s']:.1f} img/s)")
        lines.append(f"  stage (warm) vs lesson loop: {r['lesson_s'] / r['stage_warm_s']:.2f}x")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_photo_arguments(p)
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | int8, as extract.precision")
    p.add_argument("--decoder", default="auto")
    p.add_argument("--baseline", action="store_true", help="also time the lesson loop as a whole process")


def run(a: argparse.Namespace) -> dict:
    """Also ``extract --whole-process``'s first part: ``a`` may hold extract's options too."""
    r = whole_process(a.folder, a.backbone, a.weights, a.precision, a.decoder, lesson=a.baseline)
    print(report(r, a.backbone), flush=True)
    return r
