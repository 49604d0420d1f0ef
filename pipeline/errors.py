"""The errors users see: one line naming what is wrong and what is allowed.

Each package raises its own type (``CacheError``, ``LadderError``, ``StageError``, and
``PipelineError`` for the CLI and the configuration file); ``USER_ERRORS`` is all of them, the set
the CLI (and ``bench``) print as one ``error: ...`` line with exit status 2.
"""

from cache_store.errors import CacheError
from ladder.errors import LadderError
from stages.errors import StageError


class PipelineError(Exception):
    """Bad input on the command line or in the configuration file."""


USER_ERRORS: tuple[type[Exception], ...] = (PipelineError, StageError, LadderError, CacheError)
