"""Stage quality: audit the data set on its cached features (label issues, duplicates and leaks, outliers)."""

from pipeline.cli import run_stage
from pipeline.config import load_config
from pipeline.quality.stage import run_quality


def main():
    cfg = load_config()
    run_quality(cfg.quality, cfg.backbone.name, prepared_dir="data/prepared", features_dir="data/features",
                reports_dir="reports")


if __name__ == "__main__":
    run_stage(main)
