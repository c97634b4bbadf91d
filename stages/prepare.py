"""Stage prepare: list the dataset's usable images, their labels and split."""

from pipeline.cli import run_stage
from pipeline.config import load_config
from pipeline.data.sources import prepare


def main():
    d = load_config().data
    prepare(
        source=d.source,
        out_dir="data/prepared",
        folder=d.folder,
        download_dir=d.download_dir,
        test_fraction=d.test_fraction,
        seed=d.seed,
        catsdogs_sha256=d.archive_sha256 or None,
        exclude=d.exclude or None,
    )


if __name__ == "__main__":
    run_stage(main)
