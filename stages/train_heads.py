"""Stage train_heads@<head>: one head of heads.train on the cached features (``-m stages.train_heads logreg``)."""

import sys

from pipeline.cli import run_stage
from pipeline.config import load_config
from pipeline.extract.cache import head_features_paths
from pipeline.heads.train import train_head


def main():
    cfg = load_config()
    heads = cfg.heads
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m stages.train_heads HEAD  (HEAD: {' | '.join(heads.train)})")
    name = sys.argv[1]
    head = heads.head(name)
    train_head(
        name=name,
        kind=head.kind,
        features_file=head_features_paths("data/features", cfg.backbone.name, heads.backbones),
        extra_backbones=heads.backbones,
        heads_dir="data/heads",
        C=list(head.C),
        max_iter=head.max_iter,
        cv_folds=heads.cv_folds,
        seed=heads.seed,
        report_path=f"reports/cv_{name}.json",
        out_of_core=heads.out_of_core,
        chunk_rows=heads.chunk_rows,
        epochs=heads.epochs,
    )


if __name__ == "__main__":
    run_stage(main)
