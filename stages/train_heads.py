"""Stage train_heads@<head>: one scikit-learn head on the cached features."""

import sys

from pipeline.cli import run_stage
from pipeline.extract.local import features_path
from pipeline.heads.batch import HEADS, check_head, train_head
from pipeline.params import load_params


def main():
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m stages.train_heads HEAD  (HEAD: {' | '.join(HEADS)})")
    name = check_head(sys.argv[1])
    p = load_params()
    h = p["heads"]

    train_head(
        name=name,
        features_file=features_path("data/features", p["backbone"]["name"]),
        models_dir="models",
        C=h[name]["C"],
        max_iter=h[name]["max_iter"],
        cv_folds=h["cv_folds"],
        seed=h["seed"],
        report_path=f"reports/cv_{name}.json",
        out_of_core=h["out_of_core"],
        chunk_rows=h["chunk_rows"],
        epochs=h["epochs"],
    )


if __name__ == "__main__":
    run_stage(main)
