"""Stage evaluate: test-split metrics, per-class table and confusion data."""

from pipeline.cli import run_stage
from pipeline.evaluate import run_evaluate
from pipeline.extract.local import features_path
from pipeline.params import load_params


def main():
    p = load_params()
    run_evaluate(
        features_file=features_path("data/features", p["backbone"]["name"]),
        models_dir="models",
        top_k=p["evaluate"]["top_k"],
        reports_dir="reports",
        # dvc.yaml runs the finetune stage first; its network is scored beside the heads.
        finetuned_model="models/finetune.pt",
        prepared_dir="data/prepared",
        out_of_core=p["heads"]["out_of_core"],
        chunk_rows=p["heads"]["chunk_rows"],
    )


if __name__ == "__main__":
    run_stage(main)
