"""The one exception type users see: a one-line message naming what is wrong and what is allowed."""


class PipelineError(Exception):
    """Bad input or an unusable environment; the CLI prints it on one line and exits with 2."""
