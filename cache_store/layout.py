"""Cache layout: array names, chunk and shard sizes, codec presets and the storage dtypes.

::

    <root>/<key>/commit.json                   the commit: the manifest, status complete, written last
    <root>/<key>/attempts/<id>/                one writer's attempt (a zarr group, attrs = manifest)
        <split>/offsets      int64 [n+1]       token offsets of the encoder stream
        <split>/labels       int64|float32 [n]
        <split>/input_ids    int32 [n_tokens]
        <split>/enc/layer_NN [n_tokens, d]     NN = 00 (embeddings) .. L
        <split>/enc/layer_NN_scale float32 [n_tokens]   int8 only: per-token absmax scale
        <split>/dec/...      T5: decoder stream under teacher forcing on the target
        <split>/cand_K/...   T5, validation/test: decoder stream on candidate label string K
        frozen/<name>        frozen tensors the side network needs (T5: lm_head)
        side_init/r<R>/<method>/<canonical name>   pruned backbone weights for a side network
        _progress/<split>.json                     what this attempt has flushed

Each stream (``enc``, ``dec``, ``cand_K``) has its own token axis, offsets and ids. Layer arrays
are chunked over whole rows of ``d`` (a few MB of tokens) and sharded (a few chunks per object);
every chunk ends with a crc32c checksum so ``pipeline cache verify`` finds corruption.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec

from cache_store.errors import CacheError

FORMAT = "lst-cache"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16", "int8")
CODECS = ("raw", "lz4", "zstd")


def layer_name(n: int) -> str:
    return f"layer_{n:02d}"


def stream_prefix(split: str, stream: str) -> str:
    return f"{split}/{stream}"


def meta_prefix(split: str, stream: str) -> str:
    """Where a stream's offsets and ids live: the split itself for ``enc`` (DESIGN.md layout)."""
    return split if stream == "enc" else f"{split}/{stream}"


def compressors(codec: str) -> list[Any]:
    """Bytes-to-bytes codecs of a preset, always ending with a crc32c checksum."""
    if codec == "raw":
        return [Crc32cCodec()]
    if codec == "lz4":
        return [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"), Crc32cCodec()]
    if codec == "zstd":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()]
    raise CacheError(f"unknown codec {codec!r}; allowed: {', '.join(CODECS)}")


def stored_numpy_dtype(dtype: str) -> np.dtype:
    """What a layer array holds on disk (zarr 3.1 has no bfloat16: its bits go in uint16)."""
    try:
        return np.dtype({"float32": "f4", "float16": "f2", "bfloat16": "u2", "int8": "i1"}[dtype])
    except KeyError:
        raise CacheError(f"unsupported dtype {dtype!r}; allowed: {', '.join(DTYPES)}") from None


def rows_per_chunk(d: int, dtype: str, chunk_mb: float) -> int:
    """Token rows per chunk: a power of two near ``chunk_mb`` of one layer."""
    target = max(1, int(chunk_mb * 2**20 / (d * stored_numpy_dtype(dtype).itemsize)))
    return 1 << max(4, target.bit_length() - 1)


def encode(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """[n, d] float states -> (stored codes, per-token scale or None)."""
    if dtype == "float32":
        return x.float().cpu().numpy(), None
    if dtype == "float16":
        return x.half().cpu().numpy(), None
    if dtype == "bfloat16":
        return x.bfloat16().view(torch.int16).cpu().numpy().view(np.uint16), None
    if dtype == "int8":
        x = x.float()
        scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
        codes = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return codes.cpu().numpy(), scale.cpu().numpy()
    raise CacheError(f"unsupported dtype {dtype!r}; allowed: {', '.join(DTYPES)}")


def decode_numpy(codes: np.ndarray, scale: np.ndarray | None, dtype: str) -> np.ndarray:
    """Stored codes -> float32 array [n, d] (numpy: no thread-pool overhead on small blocks)."""
    if dtype == "bfloat16":
        return (codes.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        return codes.astype(np.float32) * scale[:, None]
    return codes.astype(np.float32, copy=False)


def decode(codes: np.ndarray, scale: np.ndarray | None, dtype: str) -> torch.Tensor:
    """Stored codes -> float32 tensor [n, d] (the side network computes in float32)."""
    return torch.from_numpy(np.ascontiguousarray(decode_numpy(codes, scale, dtype)))
