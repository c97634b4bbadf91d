"""Benchmarks: ``python -m pipeline.bench extract --folder DIR --backbone NAME [--baseline]``.

Prints, in one run on the same images:

* the model-only ceiling: the same batches already in memory, through the
  network eager (NCHW), eager channels_last and compiled channels_last;
* the extract stage's own code path end to end (read, hash, decode, resize,
  network, HDF5), eager and compiled;
* with ``--baseline``, the straightforward loop (ImageFolder + DataLoader +
  fp32 forward under no_grad);
* the peak resident memory after the stage's code path ran.

``python -m pipeline.bench incremental --folder DIR --backbone NAME [--add 10] [--repeat 10]``
times adding images to an extracted set against the full extraction.

``python -m pipeline.bench draft --folder DIR --backbone NAME [--upscale 3]``
measures what reduced-scale JPEG decoding (draft mode) changes: feature rows
and a logistic-regression head's test accuracy, with and without it.

Compare figures within one run only: a shared machine is noisy.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.backbones import load_backbone
from pipeline.bench_process import report, whole_process
from pipeline.config import ExtractConfig
from pipeline.data.images import load_rgb
from pipeline.data.manifest import Row
from pipeline.errors import PipelineError
from pipeline.extract.cache import open_cache
from pipeline.extract.local import extract_features
from pipeline.heads.batch import make_head
from pipeline.runtime import (
    EXTRACT_PRECISIONS,
    Precision,
    Runner,
    resolve_device,
    resolve_precision,
)


def _rows(folder: Path, limit: int | None):
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows = []
    for label, cls in enumerate(classes):
        for f in sorted((folder / cls).iterdir()):
            if f.is_file():
                rows.append(Row(f"{cls}/{f.name}", label, "train", hashlib.sha256(f.read_bytes()).hexdigest()))
    return classes, rows[:limit] if limit else rows


def _model_only(model, batches, device, repeat=1) -> float:
    with torch.inference_mode():
        model(batches[0])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        n = 0
        for _ in range(repeat):
            for x in batches:
                model(x)
                n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)


def bench_extract(folder, backbone, weights="DEFAULT", batch_size=32, device="auto", baseline=False,
                  limit=None, decode_threads=ExtractConfig.decode_threads, decoder="auto", workers=2, precision="auto") -> dict:
    folder = Path(folder)
    dev = resolve_device(device, "--device")
    prec = resolve_precision(precision, dev, "--precision", EXTRACT_PRECISIONS)
    classes, rows = _rows(folder, limit)
    bb = load_backbone(backbone, weights)
    n = len(rows)
    print(
        f"bench extract: {backbone} ({bb.weights}) on {n} images from {folder}; device {dev}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, torch {torch.__version__}, batch {batch_size}",
        flush=True,
    )
    out: dict = {"n_images": n}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, comp in (("eager", False), ("compiled", True)):
            res = extract_features(
                bb, root=folder, rows=rows, classes=classes, out_path=Path(tmp) / f"{mode}.h5",
                batch_size=batch_size, device=str(dev), decode_threads=decode_threads, decoder=decoder, compile=comp,
                precision=prec.name,
            )
            out[f"e2e_{res.mode}"] = res.images_per_second
            out[f"e2e_{res.mode}_compile_s"] = res.compile_seconds
            print(
                f"  stage code path, {res.mode:8s}: {res.images_per_second:7.1f} images/s end to end"
                + (f" (compile {res.compile_seconds:.1f} s, excluded)" if res.compile_seconds else ""),
                flush=True,
            )
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  peak resident memory so far: {out['peak_rss_mb']:.0f} MB", flush=True)

    # The same images, preprocessed once and held in memory: the network alone.
    spec = bb.transform_spec
    tfm = spec.build()
    k = min(n, 4 * batch_size)
    xs = torch.stack([tfm(load_rgb(folder / r.path)) for r in rows[:k]]).to(dev)
    batches = [xs[s : s + batch_size] for s in range(0, k - batch_size + 1, batch_size)] or [xs]
    model = bb.features.to(dev).eval().to(memory_format=torch.channels_last)
    cl = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    ceil: dict = {}
    for name in ("fp32", "bf16"):
        p = resolve_precision(name, dev, "--precision")
        with p.autocast(dev):
            ceil[f"{name}_eager"] = _model_only(model, cl, dev)
            t = time.perf_counter()
            compiled = torch.compile(model, dynamic=False)
            with torch.inference_mode():
                compiled(cl[0])
            compile_s = time.perf_counter() - t
            ceil[f"{name}_compiled"] = _model_only(compiled, cl, dev, repeat=2)
        print(f"  model only ({name}, batches in memory, channels_last): eager {ceil[f'{name}_eager']:.1f}, "
              f"compiled {ceil[f'{name}_compiled']:.1f} images/s (compile {compile_s:.1f} s)",
              flush=True)
        torch._dynamo.reset()
    out.update({f"ceiling_{k}": v for k, v in ceil.items()})
    best_ceiling = max(ceil.values())
    if dev.type == "cpu":
        out["ceiling_int8_compiled"] = _int8_ceiling(model, cl, dev)
    best_e2e = max(out["e2e_eager"], out.get("e2e_compiled", 0.0))

    if baseline:
        out["baseline"] = _baseline(folder, bb, dev, batch_size, workers, limit)
        print(
            f"  straightforward loop (ImageFolder + DataLoader, {workers} workers, fp32, no_grad): "
            f"{out['baseline']:.1f} images/s",
            flush=True,
        )
        print(f"  end to end / straightforward loop: {best_e2e / out['baseline']:.2f}x", flush=True)
    print(f"  end to end / best model-only ceiling: {100 * best_e2e / best_ceiling:.0f}%", flush=True)
    return out


def _int8_ceiling(model, batches, dev) -> float | None:
    """int8's model-only speed (``extract.precision: int8``), calibrated on the same batches.

    Printed beside the fp32/bf16 ceilings but not counted as the best of them:
    int8 is opt-in, and the stage's ratio is against the precision it ran.
    """
    try:
        t = time.perf_counter()
        runner = Runner(model, dev, Precision("int8", "--precision int8"), calibration=batches[:2])
        runner(batches[0])
        setup_s = time.perf_counter() - t
        speed = _model_only(runner, batches, dev, repeat=2)
    except PipelineError as e:
        print(f"  model only (int8): not measured: {e}", flush=True)
        return None
    finally:
        torch._dynamo.reset()
    print(f"  model only (int8, quantized + compiled, not counted as the best ceiling): {speed:.1f} images/s "
          f"(quantize + compile {setup_s:.1f} s)", flush=True)
    return speed


def straightforward_loader(folder, spec, batch_size=32, workers=2):
    """The loop users write after the lesson: ImageFolder + DataLoader + the usual transform."""
    from torchvision import datasets, transforms

    tfm = transforms.Compose(
        [
            transforms.Resize(spec.resize, interpolation=transforms.InterpolationMode(spec.interpolation)),
            transforms.CenterCrop(spec.crop),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    ds = datasets.ImageFolder(folder, transform=tfm)
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)


def _baseline(folder, bb, dev, batch_size, workers, limit) -> float:
    """The straightforward loop, timed end to end."""
    ds, loader = straightforward_loader(folder, bb.transform_spec, batch_size, workers)
    if limit:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    model = bb.features.to(dev).eval().to(memory_format=torch.contiguous_format)
    start = time.perf_counter()
    n = 0
    with torch.no_grad():
        for x, _ in loader:
            model(x.to(dev))
            n += x.shape[0]
    return n / (time.perf_counter() - start)


def bench_draft(folder, backbone, weights="DEFAULT", upscale=1, test_fraction=0.3, seed=0) -> dict:
    """Effect of reduced-scale JPEG decoding on features and on a logreg head's accuracy.

    With ``upscale`` > 1 every photo is first enlarged (Lanczos, re-saved as
    JPEG quality 95 in a temporary folder) so that draft mode applies to all of
    them, as it does to camera photos.
    """
    import numpy as np
    from PIL import Image
    from sklearn.model_selection import train_test_split



    bb = load_backbone(backbone, weights)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(folder)
        if upscale != 1:
            big = Path(tmp) / "big"
            for f in src.rglob("*"):
                if f.is_file():
                    dest = big / f.relative_to(src)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    im = Image.open(f).convert("RGB")
                    im.resize((im.width * upscale, im.height * upscale), Image.LANCZOS).save(dest, "JPEG", quality=95)
            src = big
        classes, rows = _rows(src, None)
        labels = [r.label for r in rows]
        train, test = train_test_split(range(len(rows)), test_size=test_fraction, stratify=labels, random_state=seed)
        split = {i: "train" for i in train} | {i: "test" for i in test}
        rows = [r._replace(split=split[i]) for i, r in enumerate(rows)]
        out = {}
        feats = {}
        for decoder in ("pillow-exact", "pillow"):
            path = Path(tmp) / f"{decoder}.h5"
            res = extract_features(bb, root=src, rows=rows, classes=classes, out_path=path, decoder=decoder,
                                   compile=False)
            fs = open_cache(path)
            feats[decoder] = fs.features
            Xtr, ytr = fs.subset("train")
            Xte, yte = fs.subset("test")
            acc = make_head("logreg", C=[0.01, 0.1, 1.0], cv_folds=3, y=ytr).fit(Xtr, ytr).score(Xte, yte)
            out[decoder] = {"images_per_second": res.images_per_second, "logreg_accuracy": acc}
        a, b = feats["pillow-exact"], feats["pillow"]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        changed = int((np.abs(a - b).max(1) > 1e-4).sum())
    print(
        f"bench draft: {backbone} on {len(rows)} images of {folder} (upscale x{upscale}): "
        f"{changed} feature rows changed, min cosine similarity {cos.min():.4f}",
        flush=True,
    )
    for decoder, m in out.items():
        print(f"  {decoder:13s} {m['images_per_second']:6.1f} images/s, logreg test accuracy {m['logreg_accuracy']:.4f}")
    out["changed_rows"] = changed
    return out


def bench_incremental(folder, backbone, weights="DEFAULT", add=10, repeat=1) -> dict:
    """Cost of adding ``add`` images to an extracted set, against the full extraction.

    With ``repeat`` > 1 the set is the folder repeated that many times (each copy
    a distinct file: one byte appended after the JPEG data), in a temporary folder.
    """
    import numpy as np


    with tempfile.TemporaryDirectory() as tmp:
        src = Path(folder)
        if repeat > 1:
            big = Path(tmp) / "set"
            for f in src.rglob("*"):
                if f.is_file():
                    data = f.read_bytes()
                    for k in range(repeat):
                        dest = big / f.relative_to(src).parent / f"{k}_{f.name}"
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(data + bytes([k % 256]) * (k > 0))
            src = big
        classes, rows = _rows(src, None)
        rng = np.random.default_rng(0)
        held = set(rng.choice(len(rows), size=add, replace=False).tolist())
        first = [r for i, r in enumerate(rows) if i not in held]
        store = Path(tmp) / "store"

        def run(rows_, name, store_dir):
            t = time.perf_counter()
            bb = load_backbone(backbone, weights)  # the stage loads the network each run too
            res = extract_features(bb, root=src, rows=rows_, classes=classes, out_path=Path(tmp) / name,
                                   store_dir=store_dir, compile=False)
            return res, time.perf_counter() - t

        full, t_full = run(first, "full.h5", store)
        more, t_more = run(rows, "more.h5", store)
        scratch, t_scratch = run(rows, "scratch.h5", None)
        a, b = open_cache(Path(tmp) / "more.h5"), open_cache(Path(tmp) / "scratch.h5")
        same = list(a.paths) == list(b.paths) and bool(np.allclose(a.features, b.features, rtol=1e-4, atol=1e-5))
    print(
        f"bench incremental: {backbone}, {len(first)} images extracted in {t_full:.1f} s; adding {add}: "
        f"{more.n_computed} computed in {t_more:.1f} s ({100 * t_more / t_full:.1f}% of the full run); "
        f"equals a from-scratch extraction ({t_scratch:.1f} s) row for row: {same}",
        flush=True,
    )
    return {"full_s": t_full, "add_s": t_more, "computed": more.n_computed, "same": same}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("extract", help="images/s of feature extraction")
    p.add_argument("--folder", required=True, help="a <class>/<image> folder")
    p.add_argument("--backbone", required=True)
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | int8, as extract.precision")
    p.add_argument("--decoder", default="auto")
    p.add_argument("--decode-threads", type=int, default=ExtractConfig.decode_threads)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the straightforward loop")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--baseline", action="store_true", help="also time the straightforward loop")
    p.add_argument("--whole-process", action="store_true",
                   help="also time the stage and the lesson loop as whole processes (start to exit)")
    p.add_argument("--whole-process-only", action="store_true",
                   help="only the whole processes (e.g. once more with --precision int8)")
    d = sub.add_parser("draft", help="effect of reduced-scale JPEG decoding on accuracy")
    d.add_argument("--folder", required=True)
    d.add_argument("--backbone", required=True)
    d.add_argument("--weights", default="DEFAULT")
    d.add_argument("--upscale", type=int, default=1, help="enlarge every photo first, so draft mode applies")
    i = sub.add_parser("incremental", help="cost of adding images to an extracted set")
    i.add_argument("--folder", required=True)
    i.add_argument("--backbone", required=True)
    i.add_argument("--weights", default="DEFAULT")
    i.add_argument("--add", type=int, default=10)
    i.add_argument("--repeat", type=int, default=1, help="use the folder repeated N times (distinct files)")
    a = parser.parse_args(argv)
    if a.what == "incremental":
        bench_incremental(a.folder, a.backbone, a.weights, a.add, a.repeat)
        return
    if a.what == "draft":
        bench_draft(a.folder, a.backbone, a.weights, a.upscale)
        return
    if a.whole_process or a.whole_process_only:
        r = whole_process(a.folder, a.backbone, a.weights, a.precision, a.decoder, lesson=a.baseline)
        print(report(r, a.backbone), flush=True)
        if a.whole_process_only:
            return
    out = bench_extract(a.folder, a.backbone, a.weights, a.batch_size, a.device, a.baseline, a.limit,
                        a.decode_threads, a.decoder, a.workers, a.precision)
    if a.whole_process:
        best = max(v for k, v in out.items() if k.startswith(("ceiling_fp32", "ceiling_bf16")))
        print(f"  stage's network phase (warm run: decoding + network, {r['stage_warm_ips']:.1f} images/s) / "
              f"best fp32/bf16 model-only ceiling: {100 * r['stage_warm_ips'] / best:.0f}%; "
              f"whole process (warm, start to exit): {100 * r['images'] / r['stage_warm_s'] / best:.0f}%", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
