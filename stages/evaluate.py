"""Stage evaluate@<head>: one head's test-split metrics, per-class table and confusion data; its model folder."""

import sys

from pipeline.cli import run_stage
from pipeline.config import load_config
from pipeline.evaluate import run_evaluate


def main():
    cfg = load_config()
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m stages.evaluate HEAD  (HEAD: {' | '.join(cfg.heads.train)})")
    name = sys.argv[1]
    cfg.heads.head(name)  # a declared head, or a one-line error naming the declared ones
    # The fine-tuned network scores itself in the finetune stage (reports/finetune_metrics.json).
    run_evaluate(cfg, name, features_dir="data/features", heads_dir="data/heads", prepared_dir="data/prepared",
                 models_dir="models", reports_dir="reports")


if __name__ == "__main__":
    run_stage(main)
