"""Whole-process timings: what a user waits for, from process start to exit.

``python -m pipeline.bench process`` (or ``extract --whole-process``) runs, in one
sitting on the same photos:

- per precision, the ``extract`` stage as a subprocess (``python -m
  stages.extract`` in a scratch project) with an empty feature store, twice:
  first with empty caches (a machine's first run), then, after ``python -m
  pipeline compile`` has the package ready, with the caches that run left
  (a user's next run on new photos);
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
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml
from PIL import Image, ImageOps

from pipeline.bench.common import ROOT, add_photo_arguments, rewrite_folder, timed_run
from pipeline.data.sources import prepare

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


def whole_process(folder, backbone: str, weights: str = "DEFAULT", precisions=("auto",), decoder: str = "auto",
                  compile="auto", lesson: bool = True) -> dict:
    """Time the stage per precision (a machine's first run, then a second one) and the lesson's loop.

    Each precision gets a scratch project of its own. Its first run starts
    with empty caches (Inductor's and the compiled packages). Then ``python -m
    pipeline compile`` waits for the package that run left building in the
    background (or builds it); the second run starts with an empty feature
    store and the caches kept, as a user's next run on new photos.
    ``compile=False`` times two eager runs, with no package step between.
    """
    folder = Path(folder).resolve()
    out: dict = {"runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-process-") as tmp:
        tmp = Path(tmp)
        prepare(source="folder", folder=folder, out_dir=tmp / "prepared", test_fraction=0.2)
        for precision in precisions:
            project = tmp / f"project-{precision}"
            shutil.copytree(tmp / "prepared", project / "data" / "prepared")
            params = {"backbone": {"name": backbone, "weights": weights},
                      "extract": {"precision": precision, "decoder": decoder, "compile": compile,
                                  "store": str(project / "cache" / "store")}}
            (project / "params.yaml").write_text(yaml.safe_dump(params))
            env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_CACHE_DIR=str(project / "inductor"))
            run: dict = {}
            for which in ("first", "second"):
                seconds, stdout, stderr = timed_run([sys.executable, "-m", "stages.extract"], project, env)
                stats = json.loads((project / "reports/extract.json").read_text())["extract"]
                log = [line for line in (stdout + stderr).splitlines() if line.startswith("extract:")]
                run[which] = {"s": seconds, "ips": stats["images_per_second"], "first_batch_s":
                              stats["first_batch_seconds"], "log": log,
                              "packaged": any("(packaged)" in line for line in log)}
                out["images"] = stats["images"]
                (project / "cache" / "store").rename(project / "cache" / f"store-{which}")  # next: an empty store
                if which == "first" and compile is not False:
                    # The package the first run built, or left building in the background, or none yet.
                    run["package_s"], stdout, _ = timed_run([sys.executable, "-m", "pipeline", "compile"], project,
                                                            env)
                    run["package_log"] = stdout.strip().splitlines()[-1:]
            out["runs"][precision] = run
        if lesson:
            out["lesson_s"], _, _ = timed_run([sys.executable, "-c", LESSON_LOOP, str(folder), backbone, weights],
                                              tmp, env)
    return out


def report(r: dict, backbone: str) -> str:
    n = r["images"]
    lines = [f"whole process, {backbone}, {n} images (process start to exit):"]
    for precision, run in r["runs"].items():
        for which in ("first", "second"):
            x = run[which]
            ratio = f", {r['lesson_s'] / x['s']:.2f}x the lesson loop" if "lesson_s" in r else ""
            lines.append(f"  stage, precision {precision}, {which} run: {x['s']:6.1f} s, first batch after "
                         f"{x['first_batch_s']} s, network phase {x['ips']} img/s"
                         f"{' (packaged)' if x['packaged'] else ''}{ratio}")
            lines += [f"    {line}" for line in x["log"] if "compile" in line or " images in " in line]
            if which == "first" and "package_s" in run:
                lines.append(f"  python -m pipeline compile after it: {run['package_s']:.1f} s "
                             f"({' '.join(run['package_log'])})")
    if "lesson_s" in r:
        lines.append(f"  lesson loop (ImageFolder + DataLoader, 2 workers, fp32): {r['lesson_s']:6.1f} s "
                     f"({n / r['lesson_s']:.1f} img/s)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_photo_arguments(p)
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | int8, as extract.precision; several "
                   "comma-separated (auto,int8)")
    p.add_argument("--decoder", default="auto")
    p.add_argument("--baseline", action="store_true", help="also time the lesson loop as a whole process")


def run(a: argparse.Namespace) -> dict:
    """Also ``extract --whole-process``'s first part: ``a`` may hold extract's options too."""
    r = whole_process(a.folder, a.backbone, a.weights, a.precision.split(","), a.decoder, lesson=a.baseline)
    print(report(r, a.backbone), flush=True)
    return r
