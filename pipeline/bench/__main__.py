"""Benchmarks: ``python -m pipeline.bench COMMAND ...`` (``COMMAND --help`` for its options).

Each command is a module of ``pipeline.bench``; only the one asked for is imported,
so ``repro`` (which times whole ``dvc repro`` processes) never imports torch.
Compare figures within one run only: a shared machine is noisy.

Example:
    python -m pipeline.bench extract --folder ../shared/data/catsdogs --backbone efficientnet_lite0 --limit 32
"""

from __future__ import annotations

import argparse
import importlib
import sys

PROG = "python -m pipeline.bench"

#: command -> one line of help; the command's code is ``pipeline.bench.<command>`` (add_arguments, run).
COMMANDS = {
    "extract": "images/s of feature extraction: model-only ceilings, the stage's code path, the lesson loop",
    "draft": "effect of reduced-scale JPEG decoding on features and accuracy",
    "incremental": "cost of adding images to an extracted set",
    "process": "the extract stage and the lesson loop as whole processes, start to exit",
    "repro": "what a new C costs: a first dvc repro, then one after a head's edit",
    "heads": "heads on one backbone or several, by outer cross-validation",
    "visualize": "do ideal class images look like their class to another network?",
    "same": "did a change of structure change any result? fp32 features and heads against a git revision",
    "quality": "the quality stage's checks on 5k/10k/25k synthetic feature rows: seconds, peak memory",
    "train_speed": "fine-tuning's training images/s against the model-only ceiling (bf16/fp32, channels_last)",
    "workers": "the finetune stage on 1 and 2 workers (torchrun, Ray Train), and killed then resumed",
    "views": "the finetune stage over photos and over cached views (finetune.cached_views), whole processes",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        sub = parser.add_subparsers(dest="command", required=True)
        for name, text in COMMANDS.items():
            sub.add_parser(name, help=text)
        parser.parse_args(argv[:1])  # prints the help, or names the missing or unknown command; exits
    name = argv[0]
    module = importlib.import_module(f"pipeline.bench.{name}")
    parser = argparse.ArgumentParser(prog=f"{PROG} {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv[1:]))


if __name__ == "__main__":
    main()
