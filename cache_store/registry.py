"""What ``pipeline cache ls | info | verify | rm | pull | push`` do.

List, describe, check, delete and copy caches, on a local root or an object store alike. A copy
(``pull``: object store to a local root, ``push``: the reverse) follows the commit protocol of
``cache_store.writer``: it copies the committed attempt's objects into an attempt it owns at the
destination, checks every object's size and every chunk's crc32c there, and only then creates
the destination's commit object, so a copy killed at any point leaves nothing committed (and the
next copy resumes it, skipping objects already there with the right size).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store

from cache_store import layout
from cache_store import store as st
from cache_store.errors import CacheError
from cache_store.manifest import provenance
from cache_store.reader import (
    CommittedCache,
    damaged_message,
    grid_indices,
    grid_of,
    objects_by_array,
    open_cache,
    read_commit,
)

__all__ = ["CommittedCache", "open_cache", "list_caches", "cache_info", "verify_cache"]


def list_caches(root: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One summary row per key under ``root``: committed, damaged and unfinished ones."""
    store = st.open_root(root, storage_options, write=False)
    with st.remote_errors(root):
        return _list(store)


def _list(store: Store) -> list[dict[str, Any]]:
    rows = []
    for key in st.list_dir(store, ""):
        if key.startswith(".") or "." in key:
            continue
        commit = read_commit(store, key)
        if commit.status == "damaged":
            rows.append(
                {
                    "key": key,
                    "status": "damaged",
                    "fix": f"pipeline cache rm {key}, then extract it again",
                }
            )
            continue
        if commit.status == "absent":
            if st.list_dir(store, f"{layout.attempts_prefix(key)}/"):
                rows.append({"key": key, "status": "incomplete"})
            continue
        m = commit.manifest
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
    cache = open_cache(root, key, storage_options, check=False)
    info = {k: v for k, v in cache.manifest.items() if k != "inventory"}
    if "inventory" in cache.manifest:
        info["arrays"] = len(cache.manifest["inventory"])
    with st.remote_errors(root):
        info["bytes"] = st.size_of(cache.store, cache.base)
    info["backbone"] = {k: v for k, v in info["backbone"].items() if k != "config"}
    return info


def verify_cache(
    root: str, key: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read every stored object back: a missing or corrupt chunk, or missing or unreadable array
    metadata, is named in ``problems``."""
    cache = open_cache(root, key, storage_options, check=False)
    with st.remote_errors(root):
        problems, n_objects = verify_group(cache.store, cache.base, cache.group, cache.manifest)
    return {"key": key, "ok": not problems, "objects": n_objects, "problems": problems}


def verify_group(
    store: Store, base: str, group: zarr.Group, manifest: dict[str, Any]
) -> tuple[list[str], int]:
    """Problems of the cache data under ``base`` (decoding checks every chunk's crc32c).

    The arrays checked are those the commit's inventory records, those the layout expects of the
    manifest, and any array with chunks in the listing; each must have readable metadata (with
    the recorded shape and dtype) and every chunk object, each decoding cleanly."""
    problems: list[str] = []
    n_objects = 0
    present = set(st.list_sizes(store, f"{base}/"))
    inv = manifest.get("inventory") or {}
    paths = set(inv) | layout.expected_arrays(manifest) | set(objects_by_array(present, base))
    paths |= {p for p in layout.optional_arrays(manifest) if f"{base}/{p}/zarr.json" in present}
    for path in sorted(paths):
        if f"{base}/{path}/zarr.json" not in present:
            problems.append(f"missing array metadata {path}/zarr.json")
            continue
        try:
            arr = zarr.open_array(store, path=f"{base}/{path}", mode="r")
        except Exception as e:  # noqa: BLE001 - garbled metadata
            problems.append(f"unreadable array metadata {path}/zarr.json ({st.describe(e)})")
            continue
        rec = inv.get(path)
        if rec is not None and (list(arr.shape) != rec["shape"] or str(arr.dtype) != rec["dtype"]):
            problems.append(
                f"array {path} is {list(arr.shape)} {arr.dtype}; its commit recorded "
                f"{rec['shape']} {rec['dtype']}"
            )
            continue
        grid = grid_of(arr)
        for idx in grid_indices(arr.shape, grid):
            n_objects += 1
            obj = layout.chunk_key(path, idx)
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
                problems.append(f"corrupt chunk {obj} ({st.describe(e)})")
    for split, s in manifest["splits"].items():
        for stream, info in s["streams"].items():
            offsets_path = layout.offsets_path(split, stream)
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
        if not st.exists(store, layout.commit_key(key)) and not st.list_dir(store, f"{key}/"):
            raise CacheError(
                f"no cache {key} under {root}; `pipeline cache ls` lists what is there"
            )
        # the commit object goes first: from then on no reader opens the key
        st.delete(store, layout.commit_key(key))
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

    from cache_store.writer import CacheWriter  # only copies write: readers never import it

    if src_root.rstrip("/") == dst_root.rstrip("/"):
        raise CacheError(f"source and destination are the same cache root {src_root}")
    src = open_cache(src_root, key, storage_options)
    dst = st.open_root(dst_root, storage_options, write=True)
    side = dst_root if st.is_remote(dst_root) else src_root
    t0 = time.perf_counter()
    result: dict[str, Any] = {"key": key, "from": src_root, "to": dst_root}
    with st.remote_errors(side):
        existing = read_commit(dst, key)
        if existing.status == "damaged":
            raise CacheError(damaged_message(existing, dst_root))
        if existing.status == "committed":
            return {**result, "copied": False, "already_committed": True, "objects": 0, "bytes": 0}
        src_base = src.base
        sizes = {
            k.removeprefix(src_base + "/"): n
            for k, n in st.list_sizes(src.store, f"{src_base}/").items()
            if not k.removeprefix(src_base + "/").startswith(layout.PROGRESS + "/")
        }
        source_attempt = layout.attempt_of_ref(src.manifest["attempt"])
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
            meta = {k: v for k, v in src.manifest.items() if k not in ("attempt", "inventory")}
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
