"""The cache key (a digest of everything that changes the activations) and the manifest."""

from __future__ import annotations

import getpass
import hashlib
import json
import platform
import re
import socket
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from cache_store.errors import CacheError
from cache_store.layout import FORMAT, FORMAT_VERSION

# bump when the way activations are computed or laid out changes, so old keys are not reused
KEY_SCHEMA = 1


def cache_key(inputs: dict[str, Any]) -> str:
    """``<task>-<backbone>-<digest>``: readable, and equal exactly when the inputs are equal."""
    canonical = json.dumps({"key_schema": KEY_SCHEMA, **inputs}, sort_keys=True, default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    backbone = re.sub(r"[^a-z0-9]+", "-", str(inputs["backbone"]["name"]).lower().rsplit("/")[-1])
    return f"{inputs['task']['name']}-{backbone.strip('-')[:32]}-{digest}"


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("lst-pipeline", "torch", "transformers", "zarr", "numcodecs", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def provenance() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {
        "created_by": f"{user}@{socket.gethostname()}",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def check_compatible(manifest: dict[str, Any], key: str) -> None:
    """Refuse a cache that this version cannot read, with what to do about it."""
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{key} is not an lst-pipeline cache (no '{FORMAT}' manifest)")
    v = manifest.get("format_version")
    if v != FORMAT_VERSION:
        raise CacheError(
            f"cache {key} was written with cache format version {v}; this lst-pipeline reads "
            f"version {FORMAT_VERSION}: re-run extract (or use a matching lst-pipeline)"
        )
