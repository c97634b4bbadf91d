"""Stage evaluate: test-split metrics, per-class table and confusion data of the heads."""

from pipeline.cli import run_stage
from pipeline.config import load_config
from pipeline.evaluate import run_evaluate


def main():
    cfg = load_config()
    # The fine-tuned network scores itself in the finetune stage (reports/finetune_metrics.json).
    run_evaluate(cfg, features_dir="data/features", models_dir="models", reports_dir="reports")


if __name__ == "__main__":
    run_stage(main)
