"""The one error type of the model code."""

from __future__ import annotations


class LadderError(Exception):
    """Bad input to the model code (a config value, a backbone, a tensor); the message names the
    value and what is allowed. The CLI prints it as one ``error:`` line and exits with status 2."""
