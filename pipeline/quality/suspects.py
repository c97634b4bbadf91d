"""``reports/quality/suspects.csv``: its columns, written and read only here, and the exclude action.

One row per suspect: ``path`` (as the manifest writes it, relative to the
dataset root), ``split``, ``class`` (the given label), ``kind``, ``score``
(the higher, the more suspect; its meaning per kind in
:class:`pipeline.quality.checks.Suspect`), ``suggested`` (a class, where the
evidence points to one) and ``partner`` (the copy kept, for duplicates and leaks).
Rows are ordered by kind, then most suspect first.

Example:
    $ python -m pipeline quality exclude --kinds label_issue,near_duplicate
    quality exclude: 14 photos added to data/exclude.txt (0 listed already); review it, commit it, dvc repro
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.data.exclude import append_exclude
from pipeline.errors import PipelineError

SUSPECTS_CSV = "reports/quality/suspects.csv"
HEADER = ["path", "split", "class", "kind", "score", "suggested", "partner"]
#: The kinds of suspect, in the order the reports list them (pipeline.quality.checks finds them).
KINDS = ("label_issue", "near_duplicate", "train_test_leak", "outlier")
DEFAULT_EXCLUDE = "data/exclude.txt"


def read_suspects(path: str | Path = SUSPECTS_CSV) -> list[dict]:
    """The rows of a suspects file, as dicts of :data:`HEADER`.

    Raises:
        PipelineError: the file is missing or has other columns.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found; run the quality stage first (dvc repro quality)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != HEADER:
            raise PipelineError(f"{path}: expected the columns {','.join(HEADER)}, found "
                                f"{','.join(reader.fieldnames or [])}; run dvc repro quality again")
        return list(reader)


def exclude_suspects(kinds, source: str | Path = SUSPECTS_CSV, dest: str | Path | None = None) -> list[str]:
    """Append the suspects of ``kinds`` to the exclude file ``dest``; never touches a photo.

    Args:
        kinds: names of :data:`KINDS`.
        dest: the exclude file; ``None``: params.yaml's ``data.exclude``, or
            :data:`DEFAULT_EXCLUDE` where that is empty.

    Returns:
        the paths added (those listed already are not repeated).
    """
    kinds = [k.strip() for k in kinds if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise PipelineError(f"--kinds must name one or more of {', '.join(KINDS)} (comma-separated), "
                            f"found {','.join(unknown) or 'none'}")
    hint = ""
    if dest is None:
        from pipeline.config import load_config

        dest = load_config().data.exclude
        if not dest:
            dest = DEFAULT_EXCLUDE
            hint = f"; set data.exclude: {dest} in params.yaml so that the prepare stage reads it"
    rows = [r for r in read_suspects(source) if r["kind"] in kinds]
    added, already = append_exclude(dest, [r["path"] for r in rows], f"quality suspects ({', '.join(kinds)}) "
                                    f"from {source}")
    print(f"quality exclude: {len(added)} photo{'s' * (len(added) != 1)} added to {dest} ({already} listed "
          f"already); review it, commit it, then dvc repro{hint}", flush=True)
    return added
