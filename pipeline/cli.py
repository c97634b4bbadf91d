"""Running a stage: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from typing import Callable

from pipeline.errors import PipelineError


def say(line: str) -> None:
    """A stage's log line, flushed at once: DVC and a pipe would otherwise hold it until the stage ends."""
    print(line, flush=True)


def run_stage(main: Callable[[], object]) -> None:
    """Call ``main``; a :class:`PipelineError` prints ``error: ...`` and exits 1.

    Anything else is a bug and keeps its traceback.
    """
    try:
        main()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was kept, run the stage again", file=sys.stderr)
        sys.exit(130)
