"""Stage prepare: list the dataset's usable images, their labels and split."""

from pipeline.cli import run_stage
from pipeline.data.sources import prepare
from pipeline.params import load_params


def main():
    p = load_params()["data"]
    prepare(
        source=p["source"],
        out_dir="data/prepared",
        folder=p["folder"],
        download_dir=p["download_dir"],
        test_fraction=p["test_fraction"],
        seed=p["seed"],
        catsdogs_sha256=p["archive_sha256"] or None,
    )


if __name__ == "__main__":
    run_stage(main)
