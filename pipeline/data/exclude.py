"""The exclude file (``data.exclude``): photos the prepare stage leaves out, and how lines are added to it.

The format, read and written only here: UTF-8 text, one photo a line, written
as ``manifest.csv`` writes its paths (POSIX, relative to the dataset root:
``cat/cat.12.jpg`` for ``data.folder``, ``images/Abyssinian_1.jpg`` for
Oxford-IIIT Pet); blank lines and lines starting with ``#`` are ignored.
``reports/quality/suspects.csv`` writes its paths the same way, so
``python -m pipeline quality exclude`` copies them over as they are.

Excluding never touches a photo: the prepare stage lists the file's photos in
``dataset.json`` (``excluded``) and writes every other one to the manifest,
in the split it would have had anyway (the split is drawn before exclusion, so
the photos that stay keep theirs).

Example:
    >>> read_exclude("data/exclude.txt")            # doctest: +SKIP
    ['cat/cat.12.jpg', 'dog/dog.3_small.jpg']
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_path

#: What a reader of an error needs to fix a line.
FORMAT = ("one photo a line, its path relative to the dataset root as in data/prepared/manifest.csv "
          "(e.g. cat/cat.12.jpg); # starts a comment")


def read_exclude(path: str | Path) -> list[str]:
    """The photos ``path`` lists, in file order, each once.

    Raises:
        PipelineError: the file is missing or is not UTF-8 text.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"data.exclude names {path}, which does not exist; create it ({FORMAT}) "
                            f"or set data.exclude: \"\" in params.yaml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"cannot read the exclude file {path} ({e}); expected UTF-8 text: {FORMAT}") from None
    lines = (line.strip() for line in text.splitlines())
    return list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


def append_exclude(path: str | Path, photos, comment: str) -> tuple[list[str], int]:
    """Add ``photos`` not yet listed to the exclude file ``path`` (created if missing), after ``comment``.

    The file is rewritten whole and atomically, its earlier lines kept as they were.

    Returns:
        ``(added, already)``: the paths added, in order, and how many were listed already.
    """
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    listed = set(read_exclude(path)) if old else set()
    added = [p for p in dict.fromkeys(photos) if p not in listed]
    if added:
        text = old + ("" if not old or old.endswith("\n") else "\n")
        text += f"# {comment}\n" + "".join(f"{p}\n" for p in added)
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return added, len(set(photos)) - len(added)


def apply_exclude(rows: list, exclude: str | Path, known, classes: list[str]) -> tuple[list, list[str]]:
    """``rows`` (``(path, label, split, sha256)`` tuples) without the photos the exclude file lists.

    Args:
        known: every path the dataset's listing found (usable or rejected): a
            line naming anything else is a mistake, reported rather than ignored.
        classes: the class names, each of which must keep a train photo.

    Returns:
        ``(rows kept, the excluded paths, sorted)``.

    Raises:
        PipelineError: lines name photos the dataset does not have (their number
            and the first few), or a class is left without a train photo.
    """
    listed = read_exclude(exclude)
    unknown = [p for p in listed if p not in known]
    if unknown:
        few = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise PipelineError(f"{exclude} (data.exclude) names {len(unknown)} photo{'s' * (len(unknown) != 1)} "
                            f"the dataset does not have ({few}); write {FORMAT}, and remove the lines of "
                            "photos that are gone")
    drop = set(listed)
    kept = [r for r in rows if r[0] not in drop]
    left = {r[1] for r in kept if r[2] == "train"}
    empty = [c for c in classes if c not in left]
    if empty:
        raise PipelineError(f"{exclude} (data.exclude) leaves no train photo in class{'es' * (len(empty) > 1)} "
                            f"{', '.join(empty)}; each class needs one to train on: remove some of "
                            f"{'their' if len(empty) > 1 else 'its'} lines")
    return kept, sorted(drop & {r[0] for r in rows})
