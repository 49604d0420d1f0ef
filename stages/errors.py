"""The error type of the stages: bad input or an unusable environment met while running a stage."""


class StageError(Exception):
    """One line naming what is wrong and what is allowed; the CLI prints it as ``error: ...``."""
