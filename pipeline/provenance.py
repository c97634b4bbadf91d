"""What a model or report was made from, recorded beside it and checked before it is used.

A head records the provenance of the features it was fitted on (backbone,
weights and their sha256, transform, input size, decoder, precision, the
manifest's hash and the cache's content hash: the cache's
:data:`~pipeline.extract.cache.CHECKED_ATTRS`), ``heads.backbones`` and the
git commit of the project. ``evaluate`` compares that record with the cache
it is about to score on and refuses a mismatch, so that a stale graph can
never produce numbers quietly.
"""

from __future__ import annotations

import subprocess

from pipeline.errors import PipelineError
from pipeline.extract.cache import CHECKED_ATTRS


def git_commit(cwd=".") -> str | None:
    """The project's git commit (``HEAD``), or None outside a git repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _features_record(attrs: dict, extra_backbones) -> dict:
    """What a cache with attributes ``attrs`` (and ``heads.backbones``) says about the features: the compared part."""
    record = {k: attrs[k] for k in CHECKED_ATTRS if k in attrs}
    for k, v in record.items():  # numpy scalars from HDF5 attributes, as plain JSON values
        if hasattr(v, "item"):
            record[k] = v.item()
    record["heads_backbones"] = list(extra_backbones)
    return record


def made_from(attrs: dict, extra_backbones=()) -> dict:
    """The record of a head or report made from a cache with attributes ``attrs``.

    ``attrs`` may be several caches' joined (``a + b``, see
    :func:`~pipeline.extract.cache.concatenate`); ``extra_backbones`` is
    ``heads.backbones``, the caches after the first.
    """
    return dict(_features_record(attrs, extra_backbones), git_commit=git_commit())


def check_made_from(recorded: dict, attrs: dict, extra_backbones, what: str, against: str) -> None:
    """Refuse ``what`` (a head) whose record differs from the features ``against`` (a cache) it is scored on.

    The git commit is not compared: it says where a record was made, not what from.

    Raises:
        PipelineError: one line naming the first differing key and both values.
    """
    now = _features_record(attrs, extra_backbones)
    for key in (*CHECKED_ATTRS, "heads_backbones"):
        if key not in now and key not in recorded:
            continue
        have, want = recorded.get(key), now.get(key)
        if str(have) != str(want):
            raise PipelineError(f"{what} was made from {key}={have!r} but {against} has {key}={want!r}; "
                                "the head is stale: run dvc repro")
