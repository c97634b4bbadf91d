"""Stage finetune: the backbone plus its own warm-start head as one network, fine-tuned and scored on the test split."""

from pipeline.cli import run_stage
from pipeline.config import load_config
from pipeline.finetune.stage import run_finetune


def main():
    cfg = load_config()
    run_finetune(cfg, prepared_dir="data/prepared", features_dir="data/features", out_dir="models/finetune",
                 live_dir="dvclive", reports_dir="reports", cache_dir="data/cache/finetune")


if __name__ == "__main__":
    run_stage(main)
