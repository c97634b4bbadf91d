"""Stage extract: every image once through the frozen backbone, into HDF5."""

import sys
import time

T_PROCESS = time.perf_counter()  # the wall time reported counts imports too

from pipeline.cli import run_stage  # noqa: E402
from pipeline.config import BackboneConfig, load_config  # noqa: E402
from pipeline.extract.stage import run_extract  # noqa: E402


def main():
    cfg = load_config()
    if len(sys.argv) == 2:  # extract_extra@<name>: one of heads.backbones, with its default weights
        run_extract(backbone=BackboneConfig(name=sys.argv[1]), extract=cfg.extract, out_dir="data/features/extra")
    else:
        run_extract(backbone=cfg.backbone, extract=cfg.extract, metrics_path="reports/extract.json",
                    t_process=T_PROCESS)


if __name__ == "__main__":
    run_stage(main)
