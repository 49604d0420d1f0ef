"""A cache root as a zarr store: a local folder or an fsspec URL (``s3://``, ``gs://``, ``file://``).

Everything the cache writes goes through zarr's store layer, so the same code runs on a local
disk and on an object store. The few small objects of the commit protocol (progress records, the
commit itself) are plain keys written with the store's own ``set``/``set_if_not_exists``.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from zarr.abc.store import Store
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from pipeline.errors import PipelineError

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one of the store's coroutines on zarr's own event loop."""
    return sync(coro)


def is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def open_root(root: str, storage_options: dict[str, Any] | None = None, *, write: bool) -> Store:
    """The store for a cache root; with ``write`` the root is created and checked writable."""
    if not is_remote(root):
        path = Path(root.removeprefix("file://")).expanduser()
        if write:
            try:
                path.mkdir(parents=True, exist_ok=True)
                probe = path / f".write-probe-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise PipelineError(
                    f"cache root {path} is not writable ({e.strerror}); "
                    "choose another with --cache-root or cache.root"
                ) from None
        elif not path.is_dir():
            raise PipelineError(f"cache root {path} does not exist")
        return LocalStore(path, read_only=not write)
    return FsspecStore.from_url(root, storage_options=storage_options or {}, read_only=not write)


def get_bytes(store: Store, key: str) -> bytes | None:
    buf = run(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def get_json(store: Store, key: str) -> Any | None:
    raw = get_bytes(store, key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None  # a torn write of a progress record counts as absent


def set_json(store: Store, key: str, value: Any) -> None:
    run(store.set(key, cpu.Buffer.from_bytes(json.dumps(value, indent=1).encode())))


def set_json_if_absent(store: Store, key: str, value: Any) -> bool:
    """Write ``key`` only if nobody has; True when this call's value is the one stored.

    Local stores create the key exclusively; on stores without an atomic create-if-absent the
    read-back decides (issue: conditional writes on object stores).
    """
    text = json.dumps(value, indent=1)
    run(store.set_if_not_exists(key, cpu.Buffer.from_bytes(text.encode())))
    return get_json(store, key) == json.loads(text)


def exists(store: Store, key: str) -> bool:
    return run(store.exists(key))


def list_dir(store: Store, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_dir(prefix)]

    return sorted(run(collect()))


def list_prefix(store: Store, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sorted(run(collect()))


def delete_dir(store: Store, prefix: str) -> None:
    run(store.delete_dir(prefix))


def size_of(store: Store, prefix: str) -> int:
    return run(store.getsize_prefix(prefix))


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
