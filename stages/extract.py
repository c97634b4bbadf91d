"""Stage extract: every image once through the frozen backbone, into HDF5."""

import sys

from pipeline.cli import run_stage
from pipeline.config import BackboneConfig, load_config
from pipeline.extract.stage import run_extract


def main():
    cfg = load_config()
    if len(sys.argv) == 2:  # extract_extra@<name>: one of heads.backbones, with its default weights
        run_extract(backbone=BackboneConfig(name=sys.argv[1]), extract=cfg.extract, out_dir="data/features/extra")
    else:
        run_extract(backbone=cfg.backbone, extract=cfg.extract, metrics_path="reports/extract.json")


if __name__ == "__main__":
    run_stage(main)
