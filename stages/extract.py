"""Stage extract: every image once through the frozen backbone, into HDF5.

``python -m stages.extract``: backbone.name's cache (stage extract);
``python -m stages.extract --extra``: one per heads.backbones entry (stage extract_extra).
"""

import sys

from pipeline.cli import run_stage
from pipeline.config import load_config
from pipeline.extract.stage import run_extract, run_extract_extra


def main():
    cfg = load_config()
    if sys.argv[1:] == ["--extra"]:
        run_extract_extra(backbones=cfg.heads.backbones, extract=cfg.extract)
    elif len(sys.argv) == 1:
        run_extract(backbone=cfg.backbone, extract=cfg.extract, metrics_path="reports/extract.json")
    else:
        raise SystemExit("usage: python -m stages.extract [--extra]")


if __name__ == "__main__":
    run_stage(main)
