"""Writing a cache: attempts, aligned shard writes, progress records, and the commit.

Commit protocol (DESIGN.md), the same on a local disk and on an object store:

1. A writer never touches a committed cache. It owns an attempt ``<key>/attempts/<id>`` and
   writes only there: whole shards (objects never shared by two writers' ranges) and, after each
   segment, how far every stream is on disk (``_progress/<split>.json``).
2. It commits by **creating** ``<key>/commit.json`` (the manifest with status ``complete``,
   pointing at the attempt) with an atomic create-if-absent, after every data object is written:
   on a local root a hard link of a finished temporary file (fails if the name exists); on S3 a
   conditional PUT ``If-None-Match: *`` (s3fs ``pipe_file(mode="create")``; AWS S3, MinIO and
   moto >= 5.0 refuse the second create with 412). So of two writers racing on one key both
   finish, exactly one commit wins, and the loser deletes its own attempt and reports the
   winner's cache. A single PUT is atomic, so no reader ever sees a half-written commit.
3. Readers open only ``<key>/commit.json`` and then the attempt it names, whose objects were all
   written before it: they see the committed state or, while a write is in progress, a one-line
   "not committed yet" error; never partial data.
4. Ownership of an attempt, so that a killed run can be resumed without two live writers sharing
   an attempt: on a local root an ``flock`` on ``<id>.lock`` (the kernel drops it with a dead
   process); on an object store, which has no locks, a lease object ``<id>.lease-<generation>``
   that the owner renews from a heartbeat thread (every TTL/4). An attempt whose newest lease is
   older than the TTL (``LST_LEASE_TTL_S``, default 120 s; lease times are the writers' clocks,
   so their skew must stay well below it) is taken over by creating the next generation with the
   same conditional create: of two resumers exactly one wins. An owner that finds a newer
   generation stops before its next progress record or commit.
5. A store without a conditional create (the write probe of ``store.check_remote`` finds out)
   falls back to exists-then-write plus a read-back: correct unless two commits land within one
   round trip; this is the only non-atomic case.

A run killed at any point resumes: the next run takes over the unfinished attempt, skips the
segments whose rows are all on disk, and recomputes the rest with the same batches, so the result
is identical to an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.errors import ContainsGroupError

from cache_store import layout
from cache_store import store as st
from cache_store.errors import CacheError
from cache_store.layout import FORMAT, FORMAT_VERSION, compressors, is_attempt
from cache_store.manifest import provenance
from cache_store.reader import damaged_message, inventory, read_commit


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


def lease_ttl() -> float:
    """Seconds after which an unrenewed lease on an object store counts as abandoned."""
    try:
        return max(0.5, float(os.environ.get("LST_LEASE_TTL_S", "120")))
    except ValueError:
        raise CacheError(
            f"LST_LEASE_TTL_S must be a number of seconds, got {os.environ['LST_LEASE_TTL_S']!r}"
        ) from None


class Lease:
    """Ownership of one attempt on an object store: ``<key>/attempts/<id>.lease-<generation>``.

    Created with the store's atomic create-if-absent and renewed (overwritten) by its owner from
    a heartbeat thread. Taking over an abandoned attempt creates the next generation; an owner
    that sees a newer generation than its own has lost the attempt (``lost``).
    """

    def __init__(self, store: Store, key: str, attempt: str, generation: int) -> None:
        self.store, self.key, self.attempt, self.generation = store, key, attempt, generation
        self.ttl = lease_ttl()
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cache-lease", daemon=True)
        self._thread.start()

    name = staticmethod(layout.lease_key)

    @staticmethod
    def record() -> dict[str, Any]:
        return {"owner": provenance()["created_by"], "pid": os.getpid(), "renewed_at": time.time()}

    generations = staticmethod(layout.lease_generations)

    @classmethod
    def create(cls, store: Store, key: str, attempt: str, generation: int = 0) -> Lease | None:
        if not st.set_json_if_absent(store, cls.name(key, attempt, generation), cls.record()):
            return None
        return cls(store, key, attempt, generation)

    @classmethod
    def take_over(cls, store: Store, key: str, attempt: str, names: list[str]) -> Lease | None:
        """The next generation of ``attempt``'s lease if its newest is older than the TTL."""
        gens = cls.generations(names, attempt)
        if gens:
            rec = st.get_json(store, cls.name(key, attempt, gens[-1]))
            renewed = rec.get("renewed_at", 0) if isinstance(rec, dict) else 0
            if time.time() - float(renewed) < lease_ttl():
                return None
        lease = cls.create(store, key, attempt, (gens[-1] + 1) if gens else 0)
        if lease is not None:
            for g in gens:
                st.delete(store, cls.name(key, attempt, g))
        return lease

    def renew(self) -> None:
        if st.exists(self.store, self.name(self.key, self.attempt, self.generation + 1)):
            self.lost = True
            self._stop.set()
            return
        st.set_json(self.store, self.name(self.key, self.attempt, self.generation), self.record())

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a missed renewal is retried; the TTL has slack
                pass

    def check(self) -> None:
        if self.lost:
            raise CacheError(
                f"cache {self.key}: another writer took over attempt {self.attempt} after this "
                f"run had not renewed its lease for {self.ttl:.0f}s; nothing was committed by "
                "this run"
            )

    def close(self, *, delete: bool = True) -> None:
        self._stop.set()
        self._thread.join()
        if delete and not self.lost:
            st.delete(self.store, self.name(self.key, self.attempt, self.generation))


class CacheWriter:
    """One attempt at writing cache ``key`` under ``store``."""

    def __init__(self, store: Store, root: str, key: str, attempt: str, lock: Any = None) -> None:
        self.store = store
        self.root = root
        self.key = key
        self.attempt = attempt
        self.prefix = layout.attempt_prefix(key, attempt)
        self._lock = lock
        self.group = zarr.open_group(store, path=self.prefix, mode="a")

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def begin(cls, store: Store, root: str, key: str, prefer: str | None = None) -> CacheWriter:
        """Take over an unfinished attempt nobody holds, else start a new one.

        ``prefer`` names the attempt to try first (a pull resumes the copy it left behind); with
        ``prefer`` set, only that attempt is taken over and a new attempt is named after it.
        An attempt that the key's commit names is never taken over (it is the cache), and a key
        whose commit is damaged is refused: nothing can be committed over it, and its data must
        not be reused or deleted.
        """
        commit = read_commit(store, key)
        if commit.status == "damaged":
            raise CacheError(damaged_message(commit, root))
        attempts = layout.attempts_prefix(key)
        if not st.exists(store, f"{attempts}/zarr.json"):
            try:
                zarr.open_group(store, path=attempts, mode="a")
            except ContainsGroupError:  # another writer created it in between: as good
                pass
        names = st.list_dir(store, f"{attempts}/")
        candidates = [a for a in names if is_attempt(a)]
        if prefer is not None:
            candidates = [prefer]
        candidates = [a for a in candidates if a != commit.attempt]
        for attempt in candidates:
            lock = cls._claim(store, root, key, attempt, names)
            if lock is not None:
                return cls(store, root, key, attempt, lock)
        base = prefer or f"{os.getpid()}"
        attempt = f"{base}-{uuid.uuid4().hex[:8]}"
        lock = cls._claim(store, root, key, attempt, [])
        if lock is None:
            raise CacheError(f"cache {key}: could not claim a fresh attempt {attempt}")
        return cls(store, root, key, attempt, lock)

    @staticmethod
    def _claim(store: Store, root: str, key: str, attempt: str, names: list[str]) -> Any:
        """Ownership of ``attempt``: an flock on a local root, a lease on an object store."""
        if st.is_remote(root):
            return Lease.take_over(store, key, attempt, names)
        path = st.local_path(root) / layout.attempts_prefix(key) / layout.lock_name(attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        f = path.open("a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    def check_owner(self) -> None:
        """Raise when another writer has taken this attempt over (object stores only)."""
        if isinstance(self._lock, Lease):
            self._lock.check()

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
        """Create (or, on resume, reopen) an array; rows chunked, whole trailing dims per chunk.
        ``data`` is written whole in both cases: a run killed between creating an array and
        writing it must not commit the fill value."""
        if st.exists(self.store, f"{self.prefix}/{path}/zarr.json"):  # one request on S3
            arr = self.group[path]
            if data is not None:
                arr[...] = data
            return arr
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
        return st.get_json(self.store, layout.progress_key(self.prefix, split))

    def save_progress(self, split: str, record: dict[str, Any]) -> None:
        self.check_owner()
        st.set_json(self.store, layout.progress_key(self.prefix, split), record)

    # --- committing ------------------------------------------------------------------------

    def commit(self, manifest: dict[str, Any]) -> bool:
        """Publish this attempt under the key if nobody has; False when another writer won."""
        self.group.attrs.update({"manifest": manifest})
        return self.publish(manifest)

    def publish(self, manifest: dict[str, Any]) -> bool:
        """Create the commit object (written last); False when another commit won the race.

        The commit records the inventory of the attempt's arrays (shape, grid, dtype, chunk
        objects written; see ``cache_store.reader``) from one listing made now. The winner
        deletes the abandoned attempts (those nobody holds); a loser deletes its own attempt,
        unless the winning commit names this very attempt (a taken-over writer) or cannot be
        read (a damaged commit: nothing is deleted).
        """
        self.check_owner()
        listing = st.list_sizes(self.store, f"{self.prefix}/")
        meta = {
            **manifest,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "status": "complete",
            "inventory": inventory(self.group, listing, self.prefix),
            "attempt": layout.attempt_ref(self.attempt),
        }
        won = st.set_json_if_absent(self.store, layout.commit_key(self.key), meta)
        if won:
            try:  # tidying after the commit: what a failure leaves is unreferenced, harmless
                self._drop_other_attempts()
            except Exception:  # noqa: BLE001
                pass
        else:
            winner = read_commit(self.store, self.key)
            if winner.status == "committed" and winner.attempt != self.attempt:
                self.abandon()
        self.release()
        return won

    def _drop_other_attempts(self) -> None:
        names = st.list_dir(self.store, f"{layout.attempts_prefix(self.key)}/")
        for attempt in names:
            if attempt == self.attempt or not is_attempt(attempt):
                continue
            lock = self._claim(self.store, self.root, self.key, attempt, names)
            if lock is not None:  # nobody holds it: a killed or abandoned attempt
                st.delete_dir(self.store, layout.attempt_prefix(self.key, attempt))
                lock.close()
        st.delete_dir(self.store, layout.progress_prefix(self.prefix))

    def abandon(self) -> None:
        st.delete_dir(self.store, self.prefix)

    def release(self) -> None:
        """Give up ownership (the attempt, if not committed, stays for a resume)."""
        lock, self._lock = self._lock, None
        if isinstance(lock, Lease):
            lock.close()
        elif lock not in (None, True):
            lock.close()


def raise_write_error(e: BaseException, root: str, key: str) -> None:
    """Turn a failed write into one line; a full disk keeps what is done for a resume."""
    remote = st.describe_remote_error(e, root) if st.is_remote(root) else None
    if remote is not None:
        raise CacheError(
            f"writing cache {key} failed: {remote}; nothing was committed (run the same "
            "command again to resume)"
        ) from None
    if st.is_disk_full(e):
        raise CacheError(
            f"no space left writing cache {key} under {root}: nothing was committed; free some "
            "space and run the same command again to resume"
        ) from None
    if isinstance(e, PermissionError):
        raise CacheError(f"cannot write cache {key} under {root}: {e}") from None
    raise e
