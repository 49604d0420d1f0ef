"""Opening a committed cache for reading: the commit, its inventory check, the zarr group.

Readers never import the writer. The commit object ``<key>/commit.json`` (``layout.commit_key``)
is the manifest with status ``complete`` and the attempt that holds the data. A commit is one
of:

- absent: no object (maybe an attempt in progress: "not committed yet");
- damaged: an object that is not a JSON manifest (truncated, garbled): never "absent", so no
  writer reuses the key's attempts; the fix is ``pipeline cache rm KEY`` and a new extract;
- committed.

Commits record an ``inventory``: per array its shape, chunk (or shard) grid, dtype and the
number of chunk objects written. Opening a cache compares it with one listing of the attempt,
so a deleted chunk (which zarr would read as zeros) or array metadata is refused with one line.
Caches committed before the inventory existed open without that check.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import zarr
from zarr.abc.store import Store

from cache_store import layout
from cache_store import store as st
from cache_store.errors import CacheError
from cache_store.manifest import check_compatible

_ATTEMPT_FIELD = re.compile(rb'"attempt"\s*:\s*"([^"]+)"')


@dataclass
class Commit:
    """What ``<key>/commit.json`` holds: ``status`` is ``absent``, ``damaged`` or ``committed``."""

    key: str
    status: str
    manifest: dict[str, Any] | None = None
    attempt: str | None = None  # the attempt it names (also read from a damaged one if legible)
    reason: str = ""  # why a commit is damaged


def read_commit(store: Store, key: str) -> Commit:
    raw = st.get_bytes(store, layout.commit_key(key))
    if raw is None:
        return Commit(key, "absent")
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict) or not isinstance(meta.get("attempt"), str):
            raise ValueError("no manifest naming an attempt")
    except (ValueError, UnicodeDecodeError) as e:
        found = _ATTEMPT_FIELD.search(raw)
        attempt = layout.attempt_of_ref(found.group(1).decode(errors="replace")) if found else None
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        return Commit(key, "damaged", attempt=attempt, reason=f"{len(raw)} bytes, {reason}")
    return Commit(key, "committed", meta, layout.attempt_of_ref(meta["attempt"]))


def damaged_message(commit: Commit, root: str) -> str:
    return (
        f"cache {commit.key} under {root} is damaged: its {layout.COMMIT} is not a valid commit "
        f"({commit.reason}); remove it with `pipeline cache rm {commit.key}` and extract it again"
    )


@dataclass
class CommittedCache:
    """A committed cache: its manifest and the zarr group of its data."""

    store: Store
    root: str
    key: str
    manifest: dict[str, Any]
    group: zarr.Group
    arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False)

    @property
    def base(self) -> str:
        """The committed attempt's prefix under the root."""
        return f"{self.key}/{self.manifest['attempt']}"

    def array(self, path: str) -> zarr.Array:
        if path not in self.arrays:
            try:
                self.arrays[path] = self.group[path]
            except KeyError:
                raise CacheError(
                    f"cache {self.key} under {self.root} has no array {path}; "
                    f"`pipeline cache verify {self.key}` checks it"
                ) from None
        return self.arrays[path]


def open_cache(
    root: str, key: str, storage_options: dict[str, Any] | None = None, *, check: bool = True
) -> CommittedCache:
    """Open a committed cache for reading; a clear error for a missing, unfinished or damaged
    one, and (``check``) for one whose objects are not those its commit recorded."""
    store = st.open_root(root, storage_options, write=False)
    with st.remote_errors(root):
        cache = open_committed(store, root, key)
        if check:
            problems = inventory_problems(cache)
            if problems:
                more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
                raise CacheError(
                    f"cache {key} under {root} is incomplete: {problems[0]}{more}; "
                    f"`pipeline cache verify {key}` lists the problems, `pipeline cache rm {key}` "
                    "then a new extract (or pull) replaces it"
                )
        return cache


def open_committed(store: Store, root: str, key: str) -> CommittedCache:
    commit = read_commit(store, key)
    if commit.status == "damaged":
        raise CacheError(damaged_message(commit, root))
    if commit.status == "absent":
        if st.list_dir(store, f"{layout.attempts_prefix(key)}/"):
            raise CacheError(
                f"cache {key} under {root} is not committed yet (a write is in progress or was interrupted)"
            )
        raise CacheError(f"no cache {key} under {root}; `pipeline cache ls` lists what is there")
    manifest = commit.manifest
    assert manifest is not None
    check_compatible(manifest, key)
    group = zarr.open_group(store, path=f"{key}/{manifest['attempt']}", mode="r")
    return CommittedCache(store, root, key, manifest, group)


# --- arrays, chunk grids and the inventory ------------------------------------------------------


def walk_arrays(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
    """Every array under ``group`` with its path, sorted."""
    out = []
    with warnings.catch_warnings():  # an attempt's ``_progress`` records are not zarr nodes
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        members = sorted(group.members())
    for name, node in members:
        path = f"{prefix}{name}"
        if isinstance(node, zarr.Array):
            out.append((path, node))
        else:
            out.extend(walk_arrays(node, path + "/"))
    return out


def grid_of(arr: zarr.Array) -> tuple[int, ...]:
    """The shape of an array's stored objects: its shards, else its chunks."""
    return tuple(arr.shards or arr.chunks)


def grid_indices(shape: Any, grid: Any) -> list[tuple[int, ...]]:
    """Indices of an array's chunk (shard) objects when every chunk is written, in order."""
    counts = [-(-s // c) for s, c in zip(shape, grid, strict=True)]
    return list(itertools.product(*(range(n) for n in counts)))


def grid_keys(path: str, shape: Any, grid: Any) -> list[str]:
    """The chunk (shard) objects of an array with every chunk written, in order."""
    return [layout.chunk_key(path, idx) for idx in grid_indices(shape, grid)]


def objects_by_array(listing: list[str] | set[str] | dict[str, int], base: str) -> dict[str, set]:
    """Chunk objects per array (relative names) in a listing of the attempt ``base``."""
    out: dict[str, set[str]] = {}
    for name in listing:
        rel = name.removeprefix(base + "/")
        head, sep, _ = rel.partition("/c/")
        if sep:
            out.setdefault(head, set()).add(rel)
    return out


def inventory(group: zarr.Group, listing: dict[str, int], base: str) -> dict[str, Any]:
    """What a commit records of its arrays: shape, grid, dtype and chunk objects written."""
    objects = objects_by_array(listing, base)
    return {
        path: {
            "shape": list(arr.shape),
            "grid": list(grid_of(arr)),
            "dtype": str(arr.dtype),
            "objects": len(objects.get(path, ())),
        }
        for path, arr in walk_arrays(group)
        if not path.startswith(layout.PROGRESS)
    }


def inventory_problems(cache: CommittedCache) -> list[str]:
    """What one listing of the attempt finds missing against the commit's inventory (none when
    the commit has no inventory: a cache written before it was recorded)."""
    inv = cache.manifest.get("inventory")
    if not inv:
        return []
    listing = set(st.list_sizes(cache.store, f"{cache.base}/"))
    objects = objects_by_array(listing, cache.base)
    problems = []
    for path, rec in sorted(inv.items()):
        if f"{cache.base}/{path}/zarr.json" not in listing:
            problems.append(f"array {path} has no metadata ({path}/zarr.json is missing)")
        have = objects.get(path, set())
        if len(have) < rec["objects"]:
            missing = sorted(set(grid_keys(path, rec["shape"], rec["grid"])) - have)
            what = f"chunk {missing[0]}" if missing else f"{rec['objects'] - len(have)} chunks"
            problems.append(f"array {path} is missing {what}")
    return problems
