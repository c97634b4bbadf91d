"""Stage finetune: the backbone plus the logreg head as one network, fine-tuned on the photos."""

from pipeline.cli import run_stage
from pipeline.config import load_config
from pipeline.finetune.stage import run_finetune


def main():
    cfg = load_config()
    run_finetune(cfg, prepared_dir="data/prepared", head_path="models/logreg.joblib",
                 out_path="models/finetune.pt", live_dir="dvclive")


if __name__ == "__main__":
    run_stage(main)
