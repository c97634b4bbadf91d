"""Stage finetune: the backbone plus the logreg head as one network, fine-tuned on the photos."""

from pipeline.cli import run_stage
from pipeline.finetune.train import run_finetune
from pipeline.params import load_params


def main():
    p = load_params()
    run_finetune(
        prepared_dir="data/prepared",
        head_path="models/logreg.joblib",
        out_path="models/finetune.pt",
        live_dir="dvclive",
        backbone=p["backbone"]["name"],
        weights=p["backbone"]["weights"],
        **p["finetune"],
    )


if __name__ == "__main__":
    run_stage(main)
