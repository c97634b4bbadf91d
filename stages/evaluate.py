"""Stage evaluate: test-split metrics, per-class table and confusion data of every model."""

from pipeline.cli import run_stage
from pipeline.config import load_config
from pipeline.evaluate import run_evaluate


def main():
    cfg = load_config()
    # dvc.yaml runs the finetune stage first; its network is scored beside the heads.
    run_evaluate(cfg, features_dir="data/features", models_dir="models", reports_dir="reports",
                 prepared_dir="data/prepared")


if __name__ == "__main__":
    run_stage(main)
