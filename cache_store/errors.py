"""The cache's own error: a one-line message naming what is wrong and what is allowed.

The CLI prints it as ``error: ...`` and exits with 2, like ``pipeline.errors.PipelineError``;
``cache_store`` does not import ``pipeline``.
"""


class CacheError(Exception):
    """A missing, unfinished, damaged or unreadable cache, or a bad cache setting."""
