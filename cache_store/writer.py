"""Writing a cache: attempts, aligned shard writes, progress records, and the commit.

Commit protocol (DESIGN.md): a writer never touches a committed cache. It writes into its own
attempt group ``<key>/attempts/<id>``, records after each segment how far every stream is on disk
(``_progress/<split>.json``), and commits by creating ``<key>/commit.json`` (the manifest,
pointing at the attempt; also the attempt group's attrs) only if nobody has. Readers open only ``<key>/commit.json``,
so they never see a partial cache; two racing writers both finish and exactly one commit wins.

A run killed at any point resumes: the next run takes over the unfinished attempt (on a local
root the attempt's lock is an ``flock`` that the kernel drops with the dead process), skips the
segments whose rows are all on disk, and recomputes the rest with the same batches, so the result
is identical to an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store

from cache_store import store as st
from cache_store.layout import FORMAT, FORMAT_VERSION, compressors
from pipeline.errors import PipelineError


def key_meta(key: str) -> str:
    """The commit object: the manifest, pointing at the attempt that holds the data."""
    return f"{key}/commit.json"


class StreamWriter:
    """Appends consecutive token rows of one stream and writes whole shards only.

    Rows below ``flushed`` are already on disk (a resumed run) and are dropped; a shard is
    written once all its rows are buffered, and the last, partial shard at the end of the
    stream. Whole-shard writes never read back what is on disk, so ranges written by different
    processes never overlap.
    """

    def __init__(
        self, arrays: dict[str, zarr.Array], n_tokens: int, shard_rows: int, pos: int, flushed: int
    ) -> None:
        self.arrays = arrays
        self.n_tokens = n_tokens
        self.shard_rows = shard_rows
        self.pos = pos  # token index of the next appended row
        self.flushed = flushed  # rows [0, flushed) are on disk
        self.buf: dict[str, list[np.ndarray]] = {name: [] for name in arrays}
        self.buffered = 0

    def append(self, rows: dict[str, np.ndarray]) -> None:
        n = len(next(iter(rows.values())))
        skip = min(n, max(0, self.flushed - self.pos))
        if skip < n:
            for name, a in rows.items():
                self.buf[name].append(a[skip:])
            self.buffered += n - skip
        self.pos += n
        end = (
            self.pos if self.pos == self.n_tokens else self.pos // self.shard_rows * self.shard_rows
        )
        if end > self.flushed:
            self._write(end)

    def _write(self, end: int) -> None:
        take = end - self.flushed
        for name, arr in self.arrays.items():
            data = np.concatenate(self.buf[name]) if len(self.buf[name]) > 1 else self.buf[name][0]
            arr[self.flushed : end] = data[:take]
            self.buf[name] = [data[take:]] if len(data) > take else []
        self.buffered -= take
        self.flushed = end


class BackgroundWriter:
    """One thread that runs write jobs in order, so compression stays off the compute thread."""

    def __init__(self, depth: int = 2) -> None:
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="cache-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._q.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._q.put(job)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._raise()


class CacheWriter:
    """One attempt at writing cache ``key`` under ``store``."""

    def __init__(self, store: Store, root: str, key: str, attempt: str, lock: Any = None) -> None:
        self.store = store
        self.root = root
        self.key = key
        self.attempt = attempt
        self.prefix = f"{key}/attempts/{attempt}"
        self._lock = lock
        self.group = zarr.open_group(store, path=self.prefix, mode="a")

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def begin(cls, store: Store, root: str, key: str) -> CacheWriter:
        """Take over an unfinished attempt nobody holds, else start a new one."""
        if not st.exists(store, f"{key}/attempts/zarr.json"):
            zarr.open_group(store, path=f"{key}/attempts", mode="a")
        for attempt in st.list_dir(store, f"{key}/attempts/"):
            if attempt.endswith(".lock") or attempt == "zarr.json":
                continue
            lock = cls._try_lock(root, key, attempt)
            if lock is not None:
                return cls(store, root, key, attempt, lock)
        attempt = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        lock = cls._try_lock(root, key, attempt)
        return cls(store, root, key, attempt, lock)

    @staticmethod
    def _try_lock(root: str, key: str, attempt: str) -> Any:
        """An exclusive flock on a local root; remote roots resume the first attempt listed."""
        if st.is_remote(root):
            return True
        path = (
            Path(root.removeprefix("file://")).expanduser() / key / "attempts" / f"{attempt}.lock"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        f = path.open("a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    # --- writing ---------------------------------------------------------------------------

    def create_array(
        self,
        path: str,
        shape: tuple[int, ...],
        dtype: Any,
        *,
        chunk_rows: int,
        shard_rows: int | None = None,
        codec: str = "raw",
        attrs: dict[str, Any] | None = None,
        data: np.ndarray | None = None,
    ) -> zarr.Array:
        """Create (or, on resume, reopen) an array; rows chunked, whole trailing dims per chunk."""
        if path in self.group:
            return self.group[path]
        chunks = (max(1, min(chunk_rows, shape[0] or 1)), *shape[1:])
        shards = None
        if shard_rows is not None and shape[0] > chunks[0]:
            shards = (shard_rows, *shape[1:])
        arr = self.group.create_array(
            name=path,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=compressors(codec),
            fill_value=0,
            attributes=attrs or {},
            # activation chunks are never all zero: skip zarr's empty-chunk scan (1.6x faster writes)
            config={"write_empty_chunks": True},
        )
        if data is not None:
            arr[...] = data
        return arr

    def progress(self, split: str) -> dict[str, Any] | None:
        return st.get_json(self.store, f"{self.prefix}/_progress/{split}.json")

    def save_progress(self, split: str, record: dict[str, Any]) -> None:
        st.set_json(self.store, f"{self.prefix}/_progress/{split}.json", record)

    # --- committing ------------------------------------------------------------------------

    def commit(self, manifest: dict[str, Any]) -> bool:
        """Publish this attempt under the key if nobody has; False when another writer won."""
        self.group.attrs.update({"manifest": manifest})
        meta = {
            **manifest,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "status": "complete",
            "attempt": f"attempts/{self.attempt}",
        }
        won = st.set_json_if_absent(self.store, key_meta(self.key), meta)
        if won:
            self._drop_other_attempts()
        else:
            self.abandon()
        self.release()
        return won

    def _drop_other_attempts(self) -> None:
        for attempt in st.list_dir(self.store, f"{self.key}/attempts/"):
            if attempt not in (self.attempt, "zarr.json") and not attempt.endswith(".lock"):
                if self._try_lock(self.root, self.key, attempt) is not None:
                    st.delete_dir(self.store, f"{self.key}/attempts/{attempt}")
        st.delete_dir(self.store, f"{self.prefix}/_progress")

    def abandon(self) -> None:
        st.delete_dir(self.store, self.prefix)

    def release(self) -> None:
        if self._lock not in (None, True):
            self._lock.close()
        self._lock = None


def raise_write_error(e: BaseException, root: str, key: str) -> None:
    """Turn a failed write into one line; a full disk keeps what is done for a resume."""
    if st.is_disk_full(e):
        raise PipelineError(
            f"no space left writing cache {key} under {root}: nothing was committed; free some "
            "space and run the same command again to resume"
        ) from None
    if isinstance(e, PermissionError):
        raise PipelineError(f"cannot write cache {key} under {root}: {e}") from None
    raise e
