"""What ``pipeline cache ls | info | verify | rm | pull | push`` do.

List, describe, check, delete and copy caches, on a local root or an object store alike. A copy
(``pull``: object store to a local root, ``push``: the reverse) follows the commit protocol of
``cache_store.writer``: it copies the committed attempt's objects into an attempt it owns at the
destination, checks every object's size and every chunk's crc32c there, and only then creates
the destination's commit object, so a copy killed at any point leaves nothing committed (and the
next copy resumes it, skipping objects already there with the right size).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store

from cache_store import store as st
from cache_store.manifest import check_compatible, provenance
from cache_store.writer import CacheWriter, key_meta
from cache_store.errors import CacheError


@dataclass
class CommittedCache:
    """A committed cache: its manifest and the zarr group of its data."""

    store: Store
    root: str
    key: str
    manifest: dict[str, Any]
    group: zarr.Group

    def array(self, path: str) -> zarr.Array:
        return self.group[path]


def open_cache(
    root: str, key: str, storage_options: dict[str, Any] | None = None
) -> CommittedCache:
    """Open a committed cache for reading; a clear error for a missing or unfinished one."""
    store = st.open_root(root, storage_options, write=False)
    with st.remote_errors(root):
        return _open_committed(store, root, key)


def _open_committed(store: Store, root: str, key: str) -> CommittedCache:
    meta = st.get_json(store, key_meta(key))
    if meta is None:
        if st.list_dir(store, f"{key}/attempts/"):
            raise CacheError(
                f"cache {key} under {root} is not committed yet (a write is in progress or was interrupted)"
            )
        raise CacheError(f"no cache {key} under {root}; `pipeline cache ls` lists what is there")
    manifest = meta
    check_compatible(manifest, key)
    group = zarr.open_group(store, path=f"{key}/{manifest['attempt']}", mode="r")
    return CommittedCache(store, root, key, manifest, group)


def list_caches(root: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One summary row per key under ``root``: committed ones and unfinished attempts."""
    store = st.open_root(root, storage_options, write=False)
    with st.remote_errors(root):
        return _list(store)


def _list(store: Store) -> list[dict[str, Any]]:
    rows = []
    for key in st.list_dir(store, ""):
        if key.startswith(".") or "." in key:
            continue
        meta = st.get_json(store, key_meta(key))
        if meta is None:
            if st.list_dir(store, f"{key}/attempts/"):
                rows.append({"key": key, "status": "incomplete"})
            continue
        m = meta
        rows.append(
            {
                "key": key,
                "status": m.get("status", "unknown"),
                "task": m.get("task", {}).get("name"),
                "backbone": m.get("backbone", {}).get("name"),
                "dtype": m.get("dtype"),
                "codec": m.get("codec"),
                "examples": sum(s["n_examples"] for s in m.get("splits", {}).values()),
                "bytes": st.size_of(store, f"{key}/{m.get('attempt', '')}"),
                "created_by": m.get("created_by"),
                "created_at": m.get("created_at"),
                "format_version": m.get("format_version"),
            }
        )
    return rows


def cache_info(
    root: str, key: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    cache = open_cache(root, key, storage_options)
    info = dict(cache.manifest)
    with st.remote_errors(root):
        info["bytes"] = st.size_of(cache.store, f"{key}/{cache.manifest['attempt']}")
    info["backbone"] = {k: v for k, v in info["backbone"].items() if k != "config"}
    return info


def _arrays(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
    out = []
    for name, node in sorted(group.members()):
        path = f"{prefix}{name}"
        if isinstance(node, zarr.Array):
            out.append((path, node))
        else:
            out.extend(_arrays(node, path + "/"))
    return out


def verify_cache(
    root: str, key: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read every stored object back: a missing or corrupt chunk is named in ``problems``."""
    cache = open_cache(root, key, storage_options)
    with st.remote_errors(root):
        problems, n_objects = verify_group(
            cache.store, f"{key}/{cache.manifest['attempt']}", cache.group, cache.manifest
        )
    return {"key": key, "ok": not problems, "objects": n_objects, "problems": problems}


def verify_group(
    store: Store, base: str, group: zarr.Group, manifest: dict[str, Any]
) -> tuple[list[str], int]:
    """Problems of the cache data under ``base`` (decoding checks every chunk's crc32c)."""
    problems: list[str] = []
    n_objects = 0
    present = set(st.list_sizes(store, f"{base}/"))
    for path, arr in _arrays(group):
        grid = arr.shards or arr.chunks
        counts = [max(1, -(-s // c)) for s, c in zip(arr.shape, grid, strict=True)]
        for idx in itertools.product(*(range(n) for n in counts)):
            n_objects += 1
            obj = f"{path}/c/{'/'.join(map(str, idx))}"
            if f"{base}/{obj}" not in present:
                problems.append(f"missing chunk {obj}")
                continue
            region = tuple(
                slice(i * c, min((i + 1) * c, s))
                for i, c, s in zip(idx, grid, arr.shape, strict=True)
            )
            try:
                arr[region]
            except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt chunk
                problems.append(
                    f"corrupt chunk {obj} ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                )
    for split, s in manifest["splits"].items():
        for stream, info in s["streams"].items():
            offsets_path = f"{split}/offsets" if stream == "enc" else f"{split}/{stream}/offsets"
            try:
                off = np.asarray(group[offsets_path][:])
            except Exception:  # noqa: BLE001 - already reported above
                continue
            if (
                len(off) != s["n_examples"] + 1
                or off[-1] != info["n_tokens"]
                or np.any(np.diff(off) < 1)
            ):
                problems.append(f"inconsistent offsets {offsets_path}")
    return problems, n_objects


def remove_cache(root: str, key: str, storage_options: dict[str, Any] | None = None) -> None:
    store = st.open_root(root, storage_options, write=True)
    with st.remote_errors(root):
        if not st.exists(store, key_meta(key)) and not st.list_dir(store, f"{key}/"):
            raise CacheError(
                f"no cache {key} under {root}; `pipeline cache ls` lists what is there"
            )
        # the commit object goes first: from then on no reader opens the key
        st.delete(store, key_meta(key))
        st.delete_dir(store, key)


def copy_cache(
    src_root: str,
    dst_root: str,
    key: str,
    storage_options: dict[str, Any] | None = None,
    *,
    progress: bool = True,
    verb: str = "copy",
) -> dict[str, Any]:
    """Copy committed cache ``key`` from ``src_root`` to ``dst_root``; its commit is made last.

    Steps: open the source commit; claim an attempt at the destination named as the source's
    (resuming a copy a killed run left there); copy the objects missing there (or of another
    size); check the destination's object list and sizes against the source and decode every
    chunk (crc32c); then create the destination's commit object. Returns what was done.
    """
    from tqdm import tqdm

    if src_root.rstrip("/") == dst_root.rstrip("/"):
        raise CacheError(f"source and destination are the same cache root {src_root}")
    src = open_cache(src_root, key, storage_options)
    dst = st.open_root(dst_root, storage_options, write=True)
    side = dst_root if st.is_remote(dst_root) else src_root
    t0 = time.perf_counter()
    result: dict[str, Any] = {"key": key, "from": src_root, "to": dst_root}
    with st.remote_errors(side):
        existing = st.get_json(dst, key_meta(key))
        if existing is not None:
            return {**result, "copied": False, "already_committed": True, "objects": 0, "bytes": 0}
        src_base = f"{key}/{src.manifest['attempt']}"
        sizes = {
            k.removeprefix(src_base + "/"): n
            for k, n in st.list_sizes(src.store, f"{src_base}/").items()
            if not k.removeprefix(src_base + "/").startswith("_progress/")
        }
        source_attempt = src.manifest["attempt"].removeprefix("attempts/")
        writer = CacheWriter.begin(dst, dst_root, key, prefer=source_attempt)
        try:
            dst_base = writer.prefix
            have = {
                k.removeprefix(dst_base + "/"): n
                for k, n in st.list_sizes(dst, f"{dst_base}/").items()
            }
            todo = [k for k, n in sizes.items() if have.get(k) != n or k == "zarr.json"]
            total = sum(sizes[k] for k in todo)
            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"{verb} {key}",
                disable=not progress,
            )
            try:
                _copy(src.store, dst, src_base, dst_base, {k: sizes[k] for k in todo}, bar)
            finally:
                bar.close()
            problems = _check_copy(dst, dst_base, sizes, src.manifest)
            if problems:
                raise CacheError(
                    f"the copy of cache {key} at {dst_root} failed verification ({problems[0]}"
                    f"{f'; +{len(problems) - 1} more' if len(problems) > 1 else ''}); nothing was "
                    "committed: run the same command again"
                )
            meta = {k: v for k, v in src.manifest.items() if k != "attempt"}
            stamp = provenance()
            meta["copied_from"] = src_root
            meta["copied_by"], meta["copied_at"] = stamp["created_by"], stamp["created_at"]
            won = writer.publish(meta)
        except BaseException as e:
            writer.release()
            if st.is_disk_full(e):
                raise CacheError(
                    f"no space left copying cache {key} to {dst_root}: nothing was committed; "
                    "free some space and run the same command again to resume"
                ) from None
            raise
    return {
        **result,
        "copied": won,
        "already_committed": not won,
        "objects": len(todo),
        "bytes": total,
        "verified_objects": len(sizes),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _copy(
    src: Store, dst: Store, src_base: str, dst_base: str, sizes: dict[str, int], bar: Any
) -> None:
    """Copy objects ``sizes`` (names relative to the bases), smallest first."""
    order = sorted(sizes, key=lambda n: (sizes[n], n))
    pairs = {f"{src_base}/{n}": f"{dst_base}/{n}" for n in order}
    st.copy_objects(src, dst, pairs, on_copied=lambda _k, n: bar.update(n))


def _check_copy(
    dst: Store, dst_base: str, sizes: dict[str, int], manifest: dict[str, Any]
) -> list[str]:
    """Object names and sizes as at the source, then every chunk decoded (crc32c)."""
    got = {k.removeprefix(dst_base + "/"): n for k, n in st.list_sizes(dst, f"{dst_base}/").items()}
    problems = [
        f"{name}: {got.get(name, 'no')} bytes, {n} at the source"
        for name, n in sorted(sizes.items())
        if got.get(name) != n
    ]
    if problems:
        return problems
    group = zarr.open_group(dst, path=dst_base, mode="r")
    return verify_group(dst, dst_base, group, manifest)[0]
