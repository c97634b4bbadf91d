"""Stage visualize: ideal class images, adversarial examples and feature maps of the trained model."""

from pipeline.cli import run_stage
from pipeline.extract.local import features_path
from pipeline.params import load_params
from pipeline.visualize.stage import run_visualize


def main():
    p = load_params()
    run_visualize(
        prepared_dir="data/prepared",
        features_file=features_path("data/features", p["backbone"]["name"]),
        models_dir="models",
        backbone=p["backbone"]["name"],
        weights=p["backbone"]["weights"],
        out_dir="reports/visualize",
        **p["visualize"],
    )


if __name__ == "__main__":
    run_stage(main)
