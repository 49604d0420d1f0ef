"""Cache layout: every path in a cache, chunk and shard sizes, codec presets and the codecs.

This module owns the on-disk layout: every reader and writer builds its paths here.

::

    <root>/<key>/commit.json                   the commit: the manifest, status complete, written last
    <root>/<key>/attempts/<id>/                one writer's attempt (a zarr group, attrs = manifest)
        <split>/offsets      int64 [n+1]       token offsets of the encoder stream
        <split>/labels       int64|float32 [n]
        <split>/input_ids    int32 [n_tokens]
        <split>/token_type_ids int8 [n_tokens] BERT pairs
        <split>/enc/layer_NN [n_tokens, d]     NN = 00 (embeddings) .. L
        <split>/enc/layer_NN_scale float32 [n_tokens]   int8 only: per-token absmax scale
        <split>/dec/...      T5: decoder stream under teacher forcing on the target
                             (its own offsets, input_ids, target_ids and layer_NN)
        <split>/cand_K/...   T5, validation/test: decoder stream on candidate label string K
        <split>/target_classes int32 [n, K]    VQA score tasks: each example's scored answers (class
        <split>/target_scores float64 [n, K]   ids, -1 = none) and their scores (K: the most any has)
        <split>/image_index  int32 [n]         vision-and-language: each example's image (row of images/)
                             ([n, 2] when each example names two images: NLVR2)
        images/grid          [n_images * n_tok, d_v]   the vision encoder's last hidden state,
                             n_tok rows per distinct image (stored once per image, not per example)
        images/pooled        [n_images, d_v]   its pooled feature
        images/*_scale       float32           int8 only: per-row absmax scale
        frozen/<name>        frozen tensors the side network needs (T5: lm_head)
        side_init/r<R>/<method>/<canonical name>   pruned backbone weights for a side network
        _progress/<split>.json                     what this attempt has flushed
    <root>/<key>/attempts/<id>.lock            local roots: the owner's flock
    <root>/<key>/attempts/<id>.lease-<gen>     object stores: the owner's lease

Each stream (``enc``, ``dec``, ``cand_K``) has its own token axis, offsets and ids. A decoder-only
(Llama family, GPT-2) backbone has one causal stream over its input tokens, stored as ``enc`` (as
:data:`CAUSAL_STREAM` says): the classification side network reads it as the encoder-only one
does. DESIGN.md's ``lm`` name is kept for the prompt/answer stream of generation tasks, which
has not been built. Layer arrays
are chunked over whole rows of ``d`` (a few MB of tokens) and sharded (a few chunks per object);
every chunk ends with a crc32c checksum so ``pipeline cache verify`` finds corruption.

The codecs are numpy only (no torch here): ``encode`` gives the same codes as torch's casts
(bfloat16: round to nearest even; int8: ``torch.round``, i.e. half to even).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from cache_store.errors import CacheError

FORMAT = "lst-cache"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16", "int8")
CODECS = ("raw", "lz4", "zstd")

CAUSAL_STREAM = "enc"  # a decoder-only backbone's input tokens: the same paths as an encoder's
SCALE_SUFFIX = "_scale"
COMMIT = "commit.json"
ATTEMPTS = "attempts"
PROGRESS = "_progress"
LEASE = ".lease-"


# --- streams and array paths inside a cache (relative to the committed attempt) ---------------


def layer_name(n: int) -> str:
    return f"layer_{n:02d}"


def scale_name(name: str) -> str:
    """The int8 per-token scale array beside state array ``name``."""
    return f"{name}{SCALE_SUFFIX}"


def cand_stream(k: int) -> str:
    """The decoder stream on candidate label string ``k`` (T5 evaluation)."""
    return f"cand_{k}"


def cand_streams(n: int) -> list[str]:
    return [cand_stream(k) for k in range(n)]


def stack_of(stream: str) -> str:
    """Which stack's states a stream holds: ``enc`` for the encoder stream, else ``dec``."""
    return "enc" if stream == "enc" else "dec"


def stream_prefix(split: str, stream: str) -> str:
    return f"{split}/{stream}"


def meta_prefix(split: str, stream: str) -> str:
    """Where a stream's offsets and ids live: the split itself for ``enc`` (DESIGN.md layout)."""
    return split if stream == "enc" else f"{split}/{stream}"


def state_path(split: str, stream: str, n: int) -> str:
    return f"{stream_prefix(split, stream)}/{layer_name(n)}"


def scale_path(split: str, stream: str, n: int) -> str:
    return scale_name(state_path(split, stream, n))


def state_names(layers: Iterable[int], dtype: str) -> list[str]:
    """Array names of a stream's states (``layer_NN``, then ``layer_NN_scale`` for int8)."""
    names = [layer_name(n) for n in layers]
    return names + [scale_name(n) for n in names] if dtype == "int8" else names


def state_arrays(split: str, stream: str, layers: Iterable[int], dtype: str) -> dict[str, str]:
    """A stream's state arrays for ``layers`` and ``dtype``: array name -> path in the cache.

    The names are those of ``encode_rows``, so its output can be written array by array."""
    return {n: f"{stream_prefix(split, stream)}/{n}" for n in state_names(layers, dtype)}


def offsets_path(split: str, stream: str) -> str:
    return f"{meta_prefix(split, stream)}/offsets"


def input_ids_path(split: str, stream: str) -> str:
    return f"{meta_prefix(split, stream)}/input_ids"


def token_type_ids_path(split: str) -> str:
    """BERT pairs: the encoder stream's token type ids."""
    return f"{meta_prefix(split, 'enc')}/token_type_ids"


def target_ids_path(split: str, stream: str) -> str:
    """Decoder streams: the labels the side network predicts."""
    return f"{meta_prefix(split, stream)}/target_ids"


def labels_path(split: str) -> str:
    return f"{split}/labels"


def target_arrays(split: str) -> dict[str, str]:
    """Tasks scored by the VQA score: each example's scored answers, ``classes`` int32 [n, K]
    (-1 pads) and ``scores`` float64 [n, K]; the manifest's ``splits.<split>.targets`` is K."""
    return {"classes": f"{split}/target_classes", "scores": f"{split}/target_scores"}


IMAGES = "images"


def image_index_path(split: str) -> str:
    """Vision-and-language caches: each example's row in ``images/`` (int32 [n])."""
    return f"{split}/image_index"


def image_arrays(dtype: str) -> dict[str, str]:
    """The image feature arrays (``grid``, ``pooled``, and their int8 scales): name -> path.

    ``grid`` holds ``n_tokens`` consecutive rows per image (image i: rows
    ``[i * n_tokens, (i + 1) * n_tokens)``); ``pooled`` one row per image."""
    names = ["grid", "pooled"]
    if dtype == "int8":
        names += [scale_name(n) for n in names]
    return {n: f"{IMAGES}/{n}" for n in names}


def frozen_path(name: str) -> str:
    return f"frozen/{name}"


def side_init_prefix(r: int | str, method: str) -> str:
    """``side_init/r<R>/<method>``; ``r`` as a number or as the manifest's ``r<R>`` key."""
    r = str(r).removeprefix("r")
    return f"side_init/r{r}/{method}"


def side_init_path(r: int | str, method: str, name: str) -> str:
    return f"{side_init_prefix(r, method)}/{name}"


def chunk_key(path: str, index: Iterable[int]) -> str:
    """The object of chunk (or shard) ``index`` of array ``path`` (zarr v3 default encoding)."""
    return f"{path}/c/{'/'.join(map(str, index))}"


def array_of_object(name: str) -> str | None:
    """The array a stored object (relative to the attempt) belongs to: ``<array>/c/...`` or
    ``<array>/zarr.json``; None for anything else."""
    head, sep, _ = name.partition("/c/")
    if sep:
        return head
    if name.endswith("/zarr.json"):
        return name.removesuffix("/zarr.json")
    return None


def expected_arrays(manifest: dict[str, Any]) -> set[str]:
    """Every array a committed cache with this manifest holds, except the ``side_init`` weights
    (their names come from the backbone; see ``side_init_prefixes``).

    ``token_type_ids`` is expected where the manifest's encoder stream records it (caches
    written before that was recorded: see ``optional_arrays``)."""
    dtype = manifest["dtype"]
    stored = manifest["layers_stored"]
    out: set[str] = set()
    for split, s in manifest["splits"].items():
        out.add(labels_path(split))
        if s.get("targets"):
            out |= set(target_arrays(split).values())
        for stream, info in s["streams"].items():
            out |= {offsets_path(split, stream), input_ids_path(split, stream)}
            if stream == "enc":
                if info.get("token_type_ids"):
                    out.add(token_type_ids_path(split))
                if info.get("target_ids"):  # generation tasks: the answer tokens
                    out.add(target_ids_path(split, stream))
            else:
                out.add(target_ids_path(split, stream))
            out |= set(state_arrays(split, stream, stored[stack_of(stream)], dtype).values())
    out |= {frozen_path(name) for name in manifest.get("frozen") or []}
    if manifest.get("images"):
        out |= set(image_arrays(dtype).values())
        out |= {image_index_path(split) for split in manifest["splits"]}
    return out


def optional_arrays(manifest: dict[str, Any]) -> set[str]:
    """Arrays a cache may hold beyond ``expected_arrays``: token type ids where the manifest
    does not say (older caches)."""
    return {
        token_type_ids_path(split)
        for split, s in manifest["splits"].items()
        if "token_type_ids" not in s["streams"].get("enc", {})
    }


def side_init_prefixes(manifest: dict[str, Any]) -> list[str]:
    return [
        side_init_prefix(r, method)
        for r, methods in (manifest.get("side_init") or {}).items()
        for method in methods
    ]


def is_layout_array(manifest: dict[str, Any], path: str) -> bool:
    """Whether the layout names ``path`` as an array of a cache with this manifest."""
    if path in expected_arrays(manifest) or path in optional_arrays(manifest):
        return True
    return any(path.startswith(p + "/") for p in side_init_prefixes(manifest))


# --- the key's objects (relative to the root) -------------------------------------------------


def commit_key(key: str) -> str:
    """The commit object: the manifest, pointing at the attempt that holds the data."""
    return f"{key}/{COMMIT}"


def attempts_prefix(key: str) -> str:
    return f"{key}/{ATTEMPTS}"


def attempt_ref(attempt: str) -> str:
    """How a commit names its attempt (relative to the key)."""
    return f"{ATTEMPTS}/{attempt}"


def attempt_of_ref(ref: str) -> str:
    return ref.removeprefix(f"{ATTEMPTS}/")


def attempt_prefix(key: str, attempt: str) -> str:
    return f"{key}/{attempt_ref(attempt)}"


def is_attempt(name: str) -> bool:
    """Attempt folders have no dot; ``zarr.json``, ``<id>.lock`` and ``<id>.lease-N`` do."""
    return "." not in name


def progress_key(attempt_base: str, split: str) -> str:
    """An attempt's record of what it has flushed for ``split`` (``attempt_base``: its prefix)."""
    return f"{progress_prefix(attempt_base)}/{split}.json"


def progress_prefix(attempt_base: str) -> str:
    return f"{attempt_base}/{PROGRESS}"


def lock_name(attempt: str) -> str:
    """Local roots: the file (in the attempts folder) whose flock owns ``attempt``."""
    return f"{attempt}.lock"


def lease_key(key: str, attempt: str, generation: int) -> str:
    """Object stores: generation ``generation`` of ``attempt``'s lease."""
    return f"{attempts_prefix(key)}/{attempt}{LEASE}{generation:06d}"


def lease_generations(names: list[str], attempt: str) -> list[int]:
    """The lease generations of ``attempt`` among the names of the attempts folder, sorted."""
    out = []
    for n in names:
        head, sep, gen = n.rpartition(LEASE)
        if sep and head == attempt and gen.isdigit():
            out.append(int(gen))
    return sorted(out)


# --- chunking and codecs ----------------------------------------------------------------------


def compressors(codec: str) -> list[Any]:
    """Bytes-to-bytes codecs of a preset, always ending with a crc32c checksum."""
    if codec == "raw":
        return [Crc32cCodec()]
    if codec == "lz4":
        return [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"), Crc32cCodec()]
    if codec == "zstd":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()]
    raise CacheError(f"unknown codec {codec!r}; allowed: {', '.join(CODECS)}")


def _unsupported(dtype: str) -> CacheError:
    return CacheError(f"unsupported dtype {dtype!r}; allowed: {', '.join(DTYPES)}")


def stored_numpy_dtype(dtype: str) -> np.dtype:
    """What a layer array holds on disk (zarr 3.1 has no bfloat16: its bits go in uint16)."""
    try:
        return np.dtype({"float32": "f4", "float16": "f2", "bfloat16": "u2", "int8": "i1"}[dtype])
    except KeyError:
        raise _unsupported(dtype) from None


def rows_per_chunk(d: int, dtype: str, chunk_mb: float) -> int:
    """Token rows per chunk: a power of two near ``chunk_mb`` of one layer."""
    target = max(1, int(chunk_mb * 2**20 / (d * stored_numpy_dtype(dtype).itemsize)))
    return 1 << max(4, target.bit_length() - 1)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even as torch does; NaN -> 0x7FC0
    (torch's scalar path; its vector path gives 0xFFFF: both decode to NaN)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """[n, d] float32/float16 states -> (stored codes, per-token scale or None)."""
    if dtype not in DTYPES:
        raise _unsupported(dtype)
    x = np.asarray(x)
    if dtype == "float16" and x.dtype == np.float16:
        return x, None
    x = x.astype(np.float32, copy=False)
    if dtype == "float32":
        return x, None
    if dtype == "float16":
        with np.errstate(over="ignore"):  # as torch: out of range is inf
            return x.astype(np.float16), None
    if dtype == "bfloat16":
        return bfloat16_bits(x), None
    scale = np.maximum(np.abs(x).max(axis=-1, initial=0), np.float32(1e-12)) / np.float32(127.0)
    with np.errstate(invalid="ignore"):  # NaN/inf states have no int8 code (as torch)
        codes = np.clip(np.round(x / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale.astype(np.float32, copy=False)


def encode_rows(layers: dict[int, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """States per layer -> the stream's arrays (``state_arrays`` names): codes and scales."""
    packed: dict[str, np.ndarray] = {}
    for n, x in layers.items():
        codes, scale = encode(x, dtype)
        packed[layer_name(n)] = codes
        if scale is not None:
            packed[scale_name(layer_name(n))] = scale
    return packed


def decode_numpy(codes: np.ndarray, scale: np.ndarray | None, dtype: str) -> np.ndarray:
    """Stored codes -> float32 array [n, d] (numpy: no thread-pool overhead on small blocks)."""
    if dtype == "bfloat16":
        return (np.asarray(codes).astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        return codes.astype(np.float32) * scale[:, None]
    return codes.astype(np.float32, copy=False)
