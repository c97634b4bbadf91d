"""Stage evaluate: test-split metrics, per-class table and confusion data."""

from pipeline.cli import run_stage
from pipeline.evaluate import run_evaluate
from pipeline.features import features_path
from pipeline.params import load_params


def main():
    p = load_params()
    run_evaluate(
        features_file=features_path("data/features", p["backbone"]["name"]),
        models_dir="models",
        top_k=p["evaluate"]["top_k"],
        reports_dir="reports",
    )


if __name__ == "__main__":
    run_stage(main)
