"""Stage extract: every image once through the frozen backbone, into HDF5."""

from pipeline.cli import run_stage
from pipeline.features import run_extract
from pipeline.params import load_params


def main():
    p = load_params()
    run_extract(
        prepared_dir="data/prepared",
        out_dir="data/features",
        backbone=p["backbone"]["name"],
        weights=p["backbone"]["weights"],
        batch_size=p["extract"]["batch_size"],
        device=p["extract"]["device"],
        decode_threads=p["extract"]["decode_threads"],
    )


if __name__ == "__main__":
    run_stage(main)
