"""Stage visualize: ideal class images, adversarial examples and feature maps of the trained model."""

from pipeline.cli import run_stage
from pipeline.config import load_config
from pipeline.visualize.stage import run_visualize


def main():
    cfg = load_config()
    run_visualize(cfg)


if __name__ == "__main__":
    run_stage(main)
