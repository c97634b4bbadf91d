"""Stage extract: every image once through the frozen backbone, into HDF5."""

from pipeline.cli import run_stage
from pipeline.extract.local import run_extract
from pipeline.params import load_params


def main():
    p = load_params()
    e = p["extract"]
    run_extract(
        prepared_dir="data/prepared",
        out_dir="data/features",
        backbone=p["backbone"]["name"],
        weights=p["backbone"]["weights"],
        batch_size=e["batch_size"],
        device=e["device"],
        decode_threads=e["decode_threads"],
        decoder=e["decoder"],
        compile=e["compile"],
        store_dir=e["store"] or None,
        flush_every=e["flush_every"],
        engine=e["engine"],
        ray=e["ray"],
    )


if __name__ == "__main__":
    run_stage(main)
