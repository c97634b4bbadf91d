"""User-facing errors.

A :class:`PipelineError` carries a one-line message that says what was expected,
what was found and what to do. Stage scripts print it without a traceback and
exit non-zero; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A problem with the user's input, configuration or environment."""


class BadImage(PipelineError):
    """A file that cannot be used as an image; ``reason`` is short and readable."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")
