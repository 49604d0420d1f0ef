"""What ``pipeline cache ls | info | verify | rm`` do: list, describe, check and delete caches."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store

from cache_store import store as st
from cache_store.manifest import check_compatible
from cache_store.writer import key_meta
from pipeline.errors import PipelineError


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
    meta = st.get_json(store, key_meta(key))
    if meta is None:
        if st.list_dir(store, f"{key}/attempts/"):
            raise PipelineError(
                f"cache {key} under {root} is not committed yet (a write is in progress or was interrupted)"
            )
        raise PipelineError(f"no cache {key} under {root}; `pipeline cache ls` lists what is there")
    manifest = meta
    check_compatible(manifest, key)
    group = zarr.open_group(store, path=f"{key}/{manifest['attempt']}", mode="r")
    return CommittedCache(store, root, key, manifest, group)


def list_caches(root: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One summary row per key under ``root``: committed ones and unfinished attempts."""
    store = st.open_root(root, storage_options, write=False)
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
    base = f"{key}/{cache.manifest['attempt']}"
    problems: list[str] = []
    n_objects = 0
    for path, arr in _arrays(cache.group):
        grid = arr.shards or arr.chunks
        counts = [max(1, -(-s // c)) for s, c in zip(arr.shape, grid, strict=True)]
        for idx in itertools.product(*(range(n) for n in counts)):
            n_objects += 1
            obj = f"{path}/c/{'/'.join(map(str, idx))}"
            if not st.exists(cache.store, f"{base}/{obj}"):
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
    for split, s in cache.manifest["splits"].items():
        for stream, info in s["streams"].items():
            offsets_path = f"{split}/offsets" if stream == "enc" else f"{split}/{stream}/offsets"
            try:
                off = np.asarray(cache.array(offsets_path)[:])
            except Exception:  # noqa: BLE001 - already reported above
                continue
            if (
                len(off) != s["n_examples"] + 1
                or off[-1] != info["n_tokens"]
                or np.any(np.diff(off) < 1)
            ):
                problems.append(f"inconsistent offsets {offsets_path}")
    return {"key": key, "ok": not problems, "objects": n_objects, "problems": problems}


def remove_cache(root: str, key: str, storage_options: dict[str, Any] | None = None) -> None:
    store = st.open_root(root, storage_options, write=True)
    if not st.exists(store, key_meta(key)) and not st.list_dir(store, f"{key}/"):
        raise PipelineError(f"no cache {key} under {root}; `pipeline cache ls` lists what is there")
    # the commit object goes first: from then on no reader opens the key
    st.run(store.delete(key_meta(key)))
    st.delete_dir(store, key)
