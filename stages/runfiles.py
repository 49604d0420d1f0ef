"""Files of run and sweep folders: written whole or not at all, with nothing secret in them.

``write_atomic`` writes a file under a temporary name beside it, flushes it to disk (fsync),
renames it over the target and syncs the folder: a reader, or a run resumed after ``kill -9`` or
a power cut, sees the old file or the new one, never half of one. A full disk is one
``DiskFull`` error naming the file. ``redact`` hides credentials before a configuration is saved.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.errors import StageError

SECRET_NAME = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)
REDACTED = "***"


class DiskFull(StageError):
    """No space (or quota) left while writing a run-folder file."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create ``path`` through ``write(tmp)`` (which writes the whole file at ``tmp``): fsync, rename.

    The temporary name is ``.<name>.tmp`` in the same folder (one writer per run folder).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on the device while writing {path}") from None
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write_atomic(path, write)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_bytes_atomic(path, json.dumps(obj, indent=1, default=float).encode())


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redact(obj: Any) -> Any:
    """``obj`` with the value of every key named like a credential replaced by ``"***"``."""
    if isinstance(obj, dict):
        return {
            k: (REDACTED if is_secret_name(str(k)) and v not in (None, "") else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


def redact_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A dumped configuration as a run folder may keep it: ``cache.storage_options`` redacted.

    Only the storage options hold credentials; the other sections have keys such as
    ``batch_tokens`` that merely look like them.
    """
    out = dict(cfg)
    if isinstance(out.get("cache"), dict):
        cache = dict(out["cache"])
        cache["storage_options"] = redact(cache.get("storage_options") or {})
        out["cache"] = cache
    return out


def make_private_dir(folder: Path, private: bool) -> None:
    """``mkdir -p folder``; readable by its owner only when ``private`` (it may hold secrets)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
    if private:
        os.chmod(folder, 0o700)
