"""Which params keys a process really reads, recorded for the test that keeps dvc.yaml honest.

A stage re-runs when a params key under its ``params`` in dvc.yaml changes,
so that list must hold every key the stage's code reads, and no other. Text
search cannot tell which keys a stage reads (a whole section is passed down,
a key is read in a library function three calls away), so the sections
record the reads themselves: with ``TL_RECORD_PARAMS`` set to a folder,
:func:`pipeline.config.load_config` turns recording on, every read of a leaf
key of a section built from params.yaml is noted as ``section.key`` (reads
while the file is parsed and checked do not count), and at exit the process
writes ``{"argv": [...], "keys": [...]}`` to a file of that folder.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

ENV = "TL_RECORD_PARAMS"

_reads: set[str] | None = None


def start() -> None:
    """Record from now on, if ``TL_RECORD_PARAMS`` names a folder; write the record at exit."""
    global _reads
    folder = os.environ.get(ENV)
    if not folder or _reads is not None:
        return
    _reads = set()

    def write():
        Path(folder).mkdir(parents=True, exist_ok=True)
        record = {"argv": [Path(sys.argv[0]).as_posix(), *sys.argv[1:]], "keys": sorted(_reads)}
        Path(folder, f"{os.getpid()}.json").write_text(json.dumps(record), encoding="utf-8")

    atexit.register(write)


class Recorded:
    """Mixin of the sections: a read of a leaf field, once recording is on, is noted as ``<where>.<field>``.

    ``_where`` is the section's key path (``extract.ray``), set when it is built
    from params.yaml; a section built in code (``BackboneConfig(name=...)``) has
    none, and its reads are not params reads.
    """

    _where = ""

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if _reads is not None and not name.startswith("_"):
            where = object.__getattribute__(self, "_where")
            fields = type(self).__dataclass_fields__
            # A sub-section (or a mapping of them) is not a read: its fields are.
            if where and name in fields and not isinstance(value, Recorded) and not (
                    isinstance(value, dict) and value and all(isinstance(v, Recorded) for v in value.values())):
                _reads.add(f"{where}.{name}")
        return value
