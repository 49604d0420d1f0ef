"""Fault injection for the Dask tests, installed from the test side (no hook in the product).

Dask workers import this module by name (the test session's ``sys.path`` reaches them), so it
imports only what a worker needs.
"""

from __future__ import annotations

import os

from stages.extract_dask import Unit, UnitResult, run_unit


def die_once_after_unit(trigger: str, unit: Unit) -> UnitResult:
    """``run_unit``, except that the first worker to remove ``trigger`` dies right after writing
    its unit's shards and before returning them: the unit's data is on disk, its result lost."""
    result = run_unit(unit)
    try:
        os.remove(trigger)  # whoever removes it dies: once per file the test creates
    except FileNotFoundError:
        return result
    os._exit(70)
