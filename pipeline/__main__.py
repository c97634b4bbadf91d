"""Command line.

``python -m pipeline backbones`` lists the backbone registry (``--show NAME``: one in detail);
``python -m pipeline predict PATH ...`` classifies photos with a trained model;
``python -m pipeline export MODEL --format onnx`` writes a model folder as one ONNX graph.
``python -m pipeline quality exclude --kinds KIND,...`` adds the quality stage's suspects to the exclude file.
``python -m pipeline compile`` builds the compiled package the extract stage loads (params.yaml's settings).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.backbones.catalogue import catalogue_text, show_text, timm_text
from pipeline.cli import run_stage
from pipeline.quality.suspects import KINDS as SUSPECT_KINDS
from pipeline.quality.suspects import SUSPECTS_CSV, exclude_suspects
from pipeline.serve.predict import run_predict


def _backbones(args) -> None:
    if args.show:
        print(show_text(args.show, args.weights, args.input_size))
    elif args.timm:
        print(timm_text(args.timm))
    else:
        print(catalogue_text())


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


def _export(args) -> None:
    # Imported on use: the exporter loads onnx, which the other commands never need.
    from pipeline.serve.export import run_export

    run_export(model=args.model, fmt=args.format, out=args.out, check=args.check)


def _quality_exclude(args) -> None:
    exclude_suspects(args.kinds.split(","), args.source, args.dest)


def _compile(args) -> None:
    # Imported on use: the other commands never need torch's compiler.
    import dataclasses

    from pipeline.config import load_config, parse_config
    from pipeline.extract.local import build_package
    from pipeline.extract.stage import cache_dirs

    cfg = load_config(args.params) if args.params else parse_config({})
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    backbone = dataclasses.replace(cfg.backbone, **given(name=args.backbone, weights=args.weights,
                                                          input_size=args.input_size))
    extract = dataclasses.replace(cfg.extract, **given(precision=args.precision, batch_size=args.batch_size,
                                                        device=args.device, store=args.store))
    build_package(backbone, extract, cache_dirs(extract)[1], args.prepared)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "backbones",
        help="list the backbones params.yaml accepts",
        description="List every backbone name, or show one in detail (built with random weights: "
        "nothing is downloaded).",
    )
    b.add_argument("--show", metavar="NAME", help="transform, feature width, weights source, parameters, GFLOPs")
    b.add_argument("--weights", default="DEFAULT", help="with --show: which weights (default DEFAULT)")
    b.add_argument("--input-size", type=int, default=0, help="with --show: backbone.input_size (default 0)")
    b.add_argument("--timm", metavar="PATTERN", help="list the timm names matching a shell pattern, e.g. '*dinov2*'")
    b.set_defaults(func=_backbones)
    p = sub.add_parser(
        "predict",
        help="classify photos with a trained model",
        description="Print the top-k classes of each photo. Unreadable files are listed on stderr "
        "(or under 'failed' with --json) and make the exit status 1; the others are still classified.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders searched recursively")
    p.add_argument(
        "--model",
        metavar="FOLDER",
        help="a model folder (models/logreg, or a copy of one anywhere), or a name in PROJECT/models (logreg, svm, "
        "..., finetune); default: the best in PROJECT/models by the test accuracy its config.json records",
    )
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--project", default=".", help="folder with models/, for a --model name or none (default .)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_predict)
    e = sub.add_parser(
        "export",
        help="write a model folder as one ONNX graph (normalised images -> class probabilities)",
        description="Export backbone + head (or the fine-tuned network) with a dynamic batch dimension. The graph "
        "is kept only if onnxruntime's scores match the model's within 1e-4 with the same top-1, on a random "
        "batch and on the --check photos. Needs the onnx extra: pip install 'transfer-pipeline[onnx]'.",
    )
    e.add_argument("model", metavar="FOLDER", help="a model folder: models/logreg, models/finetune, or a copy")
    e.add_argument("--format", default="onnx", help="onnx (the only format for now)")
    e.add_argument("--out", metavar="FILE", help="the file to write (default: <model name>.onnx here)")
    e.add_argument("--check", nargs="*", default=[], metavar="PATH",
                   help="photos (files or folders) the parity check also runs on")
    e.set_defaults(func=_export)
    q = sub.add_parser("quality", help="act on the quality stage's suspects")
    qsub = q.add_subparsers(dest="action", required=True)
    x = qsub.add_parser(
        "exclude",
        help="add suspects of chosen kinds to the exclude file that the prepare stage honours",
        description="Append the paths of the suspects of the chosen kinds to the exclude file (data.exclude), "
        "each once; photos are never touched. Review the file, commit it, and dvc repro trains without them.",
    )
    x.add_argument("--kinds", required=True, help=f"comma-separated, of: {', '.join(SUSPECT_KINDS)}")
    x.add_argument("--from", dest="source", default=SUSPECTS_CSV, help=f"the suspects file (default {SUSPECTS_CSV})")
    x.add_argument("--to", dest="dest", default=None,
                   help="the exclude file (default: data.exclude of params.yaml, else data/exclude.txt)")
    x.set_defaults(func=_quality_exclude)
    c = sub.add_parser(
        "compile",
        help="build the compiled package that the extract stage loads (data/cache/compiled/)",
        description="Export the backbone and compile it ahead of time (AOTInductor) for the extract stage's "
        "settings in params.yaml, so that every later extraction runs compiled from its first batch. A package "
        "that exists is loaded and checked instead. Options override params.yaml.",
    )
    c.add_argument("--params", default="params.yaml", help="the params file (default params.yaml; \"\": the defaults)")
    c.add_argument("--backbone", help="backbone.name")
    c.add_argument("--weights", help="backbone.weights")
    c.add_argument("--input-size", type=int, help="backbone.input_size")
    c.add_argument("--precision", help="extract.precision")
    c.add_argument("--batch-size", type=int, help="extract.batch_size")
    c.add_argument("--device", help="extract.device")
    c.add_argument("--store", help="extract.store (the packages go beside it, in compiled/)")
    c.add_argument("--prepared", default="data/prepared", help="the manifest's folder (int8 calibrates on it)")
    c.set_defaults(func=_compile)
    args = parser.parse_args(argv)
    run_stage(lambda: args.func(args))


if __name__ == "__main__":
    main(sys.argv[1:])
