"""The ``extract`` stage: manifest in, ``data/features/<backbone>.h5`` out, on either engine."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.backbones import get_spec, load_backbone
from pipeline.config import BackboneConfig, ExtractConfig
from pipeline.data.manifest import read_prepared
from pipeline.extract import decode
from pipeline.extract.cache import EXTRA_DIR, features_path, write_extra_index
from pipeline.extract.compute import ExtractResult
from pipeline.extract.local import extract_features
from pipeline.extract.ray_executor import extract_with_ray
from pipeline.fileio import write_json
from pipeline.runtime import (
    EXTRACT_PRECISIONS,
    process_age,
    resolve_device,
    resolve_precision,
    use_compile_cache,
)


def run_extract(*, backbone: BackboneConfig, extract: ExtractConfig, prepared_dir="data/prepared",
                out_dir="data/features", metrics_path=None) -> ExtractResult:
    """Run the stage and, if ``metrics_path`` is given, write its speed there.

    The wall time reported counts from process start (imports included) where
    the system says when that was, else from this call.
    """
    t0 = time.perf_counter()
    use_compile_cache(Path(extract.store or "data/cache/features").parent / "inductor")
    prepared = read_prepared(prepared_dir)
    out = features_path(out_dir, backbone.name)
    e = extract
    if e.engine == "ray":
        r = e.ray
        print(f"extract: {len(prepared.rows)} images through {backbone.name} on Ray "
              f"({r.address or 'local instance'}, {r.concurrency} actors) -> {out}", flush=True)
        res = extract_with_ray(
            backbone_name=backbone.name, weights=backbone.weights, input_size=backbone.input_size,
            root=prepared.root, rows=prepared.rows,
            classes=prepared.classes, out_path=out, store_dir=e.store or None, address=r.address,
            num_gpus_per_worker=r.num_gpus_per_worker, concurrency=r.concurrency, batch_size=e.batch_size,
            decoder=e.decoder, decode_threads=e.decode_threads, compile=e.compile, precision=e.precision,
            flush_every=e.flush_every,
        )
    else:
        dev = resolve_device(e.device, "extract.device")
        prec = resolve_precision(e.precision, dev, "extract.precision", EXTRACT_PRECISIONS)
        decoder = decode.resolve_decoder(e.decoder, dev)
        # The first batches decode while the network loads (and, for int8, is quantized):
        # the transform is known from the registry without building the network.
        spec = get_spec(backbone.name).transform_for(backbone.weights, backbone.input_size)
        early = decode.batches(decoder, prepared.root, prepared.rows, spec, e.batch_size, e.decode_threads, dev)
        try:
            bb = load_backbone(backbone.name, backbone.weights, backbone.input_size)
        except BaseException:
            early.close()
            raise
        print(f"extract: {len(prepared.rows)} images through {backbone.name} ({bb.weights}) on {dev}, "
              f"{prec.name} ({prec.reason}), batch {e.batch_size}, decoder {decoder} -> {out}", flush=True)
        res = extract_features(
            bb, root=prepared.root, rows=prepared.rows, classes=prepared.classes, out_path=out,
            batch_size=e.batch_size, device=str(dev), precision=e.precision, decode_threads=e.decode_threads,
            decoder=e.decoder, compile=e.compile, store_dir=e.store or None, flush_every=e.flush_every,
            early=early,
        )
    speed = f" at {res.images_per_second:.1f} images/s ({res.mode})" if res.n_computed else ""
    compiled = f", compile {res.compile_seconds:.1f} s" if res.compile_seconds else ""
    age = process_age()
    wall = age if age is not None else time.perf_counter() - t0
    first = res.first_batch_seconds
    started = f" (first batch after {first:.1f} s)" if first is not None else ""
    print(f"extract: {res.n_images} images in {wall:.1f} s{started}: {res.n_computed} computed{speed}{compiled}, "
          f"{res.n_reused} reused from {e.store or 'no store'}, {res.n_skipped} skipped", flush=True)
    if metrics_path:
        write_json(Path(metrics_path), {"extract": {
            "images": res.n_images, "computed": res.n_computed, "reused": res.n_reused,
            "skipped": res.n_skipped, "wall_seconds": round(wall, 2),
            "images_per_second": round(res.images_per_second, 1) if res.n_computed else None,
            # Start-up as a user meets it: imports, loading the network, the first batch.
            "first_batch_seconds": round(first, 2) if first is not None else None,
        }})
    return res


def run_extract_extra(*, backbones, extract: ExtractConfig, prepared_dir="data/prepared",
                      out_dir="data/features") -> list[ExtractResult]:
    """The ``extract_extra`` stage: each of ``heads.backbones`` (default weights) into ``<out_dir>/extra/``.

    One stage for the whole list, whose output folder holds exactly the
    caches the heads concatenate, and an index of them in order: the heads
    then depend on that folder, and DVC sees ``heads.backbones`` change
    ``[] -> [x] -> []`` as the folder it is. The per-image store makes a
    backbone already extracted cost only the file's writing.
    """
    extra_dir = Path(out_dir) / EXTRA_DIR
    extra_dir.mkdir(parents=True, exist_ok=True)
    results = [run_extract(backbone=BackboneConfig(name=name), extract=extract, prepared_dir=prepared_dir,
                           out_dir=extra_dir) for name in backbones]
    index = write_extra_index(extra_dir, backbones)
    print(f"extract_extra: {len(results)} extra backbone(s) {list(backbones)} -> {index}", flush=True)
    return results
