"""Extraction speed: ``python -m pipeline.bench extract --folder DIR --backbone NAME [--baseline]``.

Prints, in one run on the same images:

* the extract stage's own code path end to end (read, hash, decode, resize,
  network, HDF5), eager and as a compiled package;
* decoding alone, as the stage decodes (its rate, and its cost per image on one core);
* the model-only ceilings: the same batches already in memory, channels_last,
  eager, ``torch.compile``d and as an AOTInductor package, per precision;
* the arithmetic bound of this machine: cores over (decode + network) core-ms per image;
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
from pipeline.compiled import Packages, package_key
from pipeline.config import ExtractConfig
from pipeline.data.images import load_rgb
from pipeline.errors import PipelineError
from pipeline.extract import decode
from pipeline.extract.local import extract_features
from pipeline.machine import describe_cpu_line
from pipeline.extract.runner import Runner
from pipeline.runtime import EXTRACT_PRECISIONS, Precision, place


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
    cores = torch.get_num_threads()
    print(
        f"bench extract: {backbone} ({bb.weights}) on {n} images from {folder}; {describe_machine(dev)}, "
        f"{describe_cpu_line()}, batch {batch_size}, precision {prec.name}",
        flush=True,
    )
    out: dict = {"n_images": n, "precision": prec.name}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, comp in (("eager", False), ("packaged", True)):
            res = extract_features(
                bb, root=folder, rows=rows, classes=classes, out_path=Path(tmp) / f"{mode}.h5",
                batch_size=batch_size, device=str(dev), decode_threads=decode_threads, decoder=decoder, compile=comp,
                precision=prec.name, compiled_dir=Path(tmp) / "compiled",
            )
            out[f"e2e_{res.mode}"] = res.images_per_second
            print(
                f"  stage code path, {res.mode:8s}: {res.images_per_second:7.1f} images/s end to end"
                + (f" (building the package {res.compile_seconds:.1f} s, excluded)" if res.compile_seconds else ""),
                flush=True,
            )
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  peak resident memory so far: {out['peak_rss_mb']:.0f} MB", flush=True)

        # Decoding alone, as the stage decodes: its rate on all threads, and its cost on one core.
        resolved = decode.resolve_decoder(decoder, dev)
        for threads in (1, decode_threads):
            out[f"decode_{threads}_ips"] = _decode_only(resolved, folder, rows, bb.transform_spec, batch_size, threads,
                                                        dev)
        decode_ms = 1000 / out["decode_1_ips"]
        print(f"  decoding only ({resolved}): {out[f'decode_{decode_threads}_ips']:.1f} images/s on "
              f"{decode_threads} threads; {decode_ms:.2f} ms of one core per image", flush=True)

        # The same images, preprocessed once and held in memory: the network alone.
        spec = bb.transform_spec
        tfm = spec.build()
        k = min(n, 4 * batch_size)
        xs = torch.stack([tfm(load_rgb(folder / r.path)) for r in rows[:k]]).to(dev)
        k = max(batch_size, k - k % batch_size)
        xs = xs[torch.arange(k) % len(xs)]
        model = bb.features.to(dev).eval().to(memory_format=torch.channels_last)
        cl = [b.contiguous(memory_format=torch.channels_last) for b in xs.split(batch_size)]
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
            torch._dynamo.reset()
            runner, build_s, load_s = _packaged(model, dev, p, cl, Path(tmp) / "ceiling")
            ceil[f"{name}_packaged"] = _model_only(runner, cl, dev, repeat=2)
            print(f"  model only ({name}, batches in memory, channels_last): eager {ceil[f'{name}_eager']:.1f}, "
                  f"torch.compile {ceil[f'{name}_compiled']:.1f} (compile {compile_s:.1f} s), packaged "
                  f"{ceil[f'{name}_packaged']:.1f} images/s (build {build_s:.1f} s, load {load_s * 1000:.0f} ms)",
                  flush=True)
        out.update({f"ceiling_{k}": v for k, v in ceil.items()})
        if dev.type == "cpu":
            out["ceiling_int8_packaged"] = _int8_ceiling(model, cl, dev, Path(tmp) / "int8")
    best_ceiling = max(ceil.values())
    own = out.get(f"ceiling_{prec.name}_packaged") or best_ceiling
    # Decoding and the network share the cores: per image, decode_ms + the network's core-ms.
    net_ms = 1000 * cores / own
    out["bound_ips"] = 1000 * cores / (decode_ms + net_ms)
    print(f"  arithmetic bound ({prec.name}, {cores} cores): ({decode_ms:.2f} decode + {net_ms:.2f} network) core-ms "
          f"per image -> {out['bound_ips']:.1f} images/s", flush=True)
    best_e2e = max(out["e2e_eager"], out.get("e2e_packaged", 0.0))
    print(f"  stage code path (packaged) / arithmetic bound: {100 * out.get('e2e_packaged', 0) / out['bound_ips']:.0f}%",
          flush=True)

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


def _packaged(model, dev, precision, batches, folder):
    """A runner on a freshly built package of ``model`` (build seconds), then loaded anew (load seconds)."""
    key = package_key({"backbone": "bench"}, precision.name, batches[0].shape[0], batches[0].shape[1:], dev)
    t = time.perf_counter()
    Runner(model, dev, precision, compile=True, packages=Packages(folder, key))(batches[0])
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    runner = Runner(model, dev, precision, compile=True, packages=Packages(folder, key))
    load_s = time.perf_counter() - t
    return runner, build_s, load_s


def _decode_only(decoder, folder, rows, spec, batch_size, threads, dev) -> float:
    source = decode.batches(decoder, folder, rows, spec, batch_size, threads, dev)
    t, k = time.perf_counter(), 0
    try:
        for chunk, _, _ in source:
            k += len(chunk)
    finally:
        source.close()
    return k / (time.perf_counter() - t)


def _int8_ceiling(model, batches, dev, folder) -> float | None:
    """int8's model-only speed (``extract.precision: int8``), calibrated on the same batches, as a package.

    Printed beside the fp32/bf16 ceilings but not counted as the best of them:
    int8 is opt-in, and the stage's ratio is against the precision it ran.
    """
    try:
        t = time.perf_counter()
        key = package_key({"backbone": "bench"}, "int8", batches[0].shape[0], batches[0].shape[1:], dev, "bench")
        runner = Runner(model, dev, Precision("int8", "--precision int8"), calibration=batches[:2],
                        packages=Packages(folder, key))
        runner(batches[0])
        setup_s = time.perf_counter() - t
        speed = _model_only(runner, batches, dev, repeat=2)
    except PipelineError as e:
        print(f"  model only (int8): not measured: {e}", flush=True)
        return None
    print(f"  model only (int8, quantized, packaged; not counted as the best ceiling): {speed:.1f} images/s "
          f"(quantize + build {setup_s:.1f} s)", flush=True)
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
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | int8, as extract.precision; "
                   "with --whole-process several, comma-separated (auto,int8): the first is the one measured in process")
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
                        a.decode_threads, a.decoder, a.workers, a.precision.split(",")[0])
    if a.whole_process:
        for precision, run in r["runs"].items():
            ips = run["second"]["ips"]
            if ips and precision in ("auto", out["precision"]):
                print(f"  stage's network phase (second run, {precision}: decoding + network, {ips:.1f} images/s) / "
                      f"arithmetic bound: {100 * ips / out['bound_ips']:.0f}%", flush=True)
    return out
