"""Extraction speed: ``python -m pipeline.bench extract --folder DIR --backbone NAME [--baseline]``.

Prints, in one run on the same images:

* the model-only ceiling: the same batches already in memory, through the
  network eager (NCHW), eager channels_last and compiled channels_last;
* the extract stage's own code path end to end (read, hash, decode, resize,
  network, HDF5), eager and compiled;
* with ``--baseline``, the straightforward loop (ImageFolder + DataLoader +
  fp32 forward under no_grad);
* the peak resident memory after the stage's code path ran;
* with ``--whole-process``, first the whole-process timings of
  ``python -m pipeline.bench process`` (``--whole-process-only``: only those).

Compare figures within one run only: a shared machine is noisy.

Example:
    python -m pipeline.bench extract --folder ../shared/data/catsdogs --backbone efficientnet_lite0 --limit 32
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from pipeline.backbones import load_backbone
from pipeline.bench import process
from pipeline.bench.common import add_photo_arguments, describe_machine, folder_rows
from pipeline.config import ExtractConfig
from pipeline.data.images import load_rgb
from pipeline.errors import PipelineError
from pipeline.extract.local import extract_features
from pipeline.runtime import EXTRACT_PRECISIONS, Precision, Runner, place


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
    where = place(device, precision, section="bench", accepted=EXTRACT_PRECISIONS)
    dev, prec = where.device, where.precision
    classes, rows = folder_rows(folder, limit)
    bb = load_backbone(backbone, weights)
    n = len(rows)
    print(
        f"bench extract: {backbone} ({bb.weights}) on {n} images from {folder}; {describe_machine(dev)}, "
        f"batch {batch_size}",
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
        p = place(dev, name, section="bench").precision
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_photo_arguments(p)
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


def run(a: argparse.Namespace) -> dict:
    if a.whole_process or a.whole_process_only:
        r = process.run(a)
        if a.whole_process_only:
            return r
    out = bench_extract(a.folder, a.backbone, a.weights, a.batch_size, a.device, a.baseline, a.limit,
                        a.decode_threads, a.decoder, a.workers, a.precision)
    if a.whole_process:
        best = max(v for k, v in out.items() if k.startswith(("ceiling_fp32", "ceiling_bf16")))
        print(f"  stage's network phase (warm run: decoding + network, {r['stage_warm_ips']:.1f} images/s) / "
              f"best fp32/bf16 model-only ceiling: {100 * r['stage_warm_ips'] / best:.0f}%; "
              f"whole process (warm, start to exit): {100 * r['images'] / r['stage_warm_s'] / best:.0f}%", flush=True)
    return out
