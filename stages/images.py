"""Images in both stages: the frozen vision encoder run once per distinct image (stage one), and
which image features a side network reads (stage two).

Stage one (``write_images``) runs after the text streams: every distinct image of the task's
splits (in order of first use: train, validation, test) is decoded, preprocessed and encoded once,
however many questions name it; its grid features (the encoder's last hidden state) and pooled
feature go to the shared ``images/`` group, and each split gets ``<split>/image_index``, the row of
each example's image. The text backbone never sees an image, so the text streams are the same with
or without images. The images are encoded ``BATCH`` at a time and each batch is written at its
rows, in the cache's dtype and codec, before the next is read (stage one holds one batch of
features); a killed run redoes the whole pass in its resumed attempt, rewriting every row, and
nothing is committed before the end.

Stage two: ``visual_of`` says whether a run uses a cache's image features (``backbone.vision``
set, and the cache made with that encoder); in online LST too the visual tokens come from the
cache, because the vision encoder is frozen and never in the gradient path.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from cache_store import layout
from cache_store.layout import rows_per_chunk, stored_numpy_dtype
from cache_store.reader import CommittedCache
from cache_store.writer import CacheWriter
from ladder.vision import VisionEncoder
from stages.config import StageConfig
from stages.errors import StageError
from stages.tasks import VL_TASKS, TaskData

PROGRESS = "images"  # the attempt's progress record of the image stage (no split has this name)
BATCH = 64  # images per vision-encoder batch


def check_vision_task(cfg: StageConfig, data: TaskData) -> None:
    """A vision encoder needs a vision-and-language task (one whose examples name images)."""
    if cfg.backbone.vision is not None and not data.spec.images:
        raise StageError(
            f"task {data.spec.name!r} has no images, but a vision encoder "
            f"({cfg.backbone.vision!r}) was given; vision-and-language tasks: {', '.join(VL_TASKS)}"
        )


def distinct_images(data: TaskData) -> tuple[list[str], dict[str, np.ndarray]]:
    """The distinct image keys in order of first use, and per split each example's row: int32
    [n], or [n, 2] when the task's examples name two images (NLVR2: img0, img1)."""
    rows: dict[str, int] = {}
    index = {}
    two = any(ex.image2 is not None for v in data.splits.values() for ex in v)
    for split, examples in data.splits.items():
        idx = []
        for n, ex in enumerate(examples):
            if ex.image is None:
                raise StageError(f"example {n} of split {split!r} names no image")
            if two and ex.image2 is None:
                raise StageError(
                    f"example {n} of split {split!r} names one image; every example of task "
                    f"{data.spec.name!r} needs two"
                )
            keys = (ex.image, ex.image2) if two else (ex.image,)
            idx.append([rows.setdefault(k, len(rows)) for k in keys])  # type: ignore[arg-type]
        shape = (len(idx), 2 if two else 1)
        index[split] = np.asarray(idx, dtype=np.int32).reshape(shape)
        if not two:
            index[split] = index[split][:, 0]
    if not rows:
        raise StageError(f"task {data.spec.name!r} ({data.source}) names no image")
    return list(rows), index


def image_file(data: TaskData, key: str) -> str:
    path = data.images.get(key)
    if path is None:
        raise StageError(f"image {key!r} has no file in the task data ({data.source})")
    return path


def images_digest(data: TaskData) -> str:
    """A digest of every used image's key and file bytes (part of the cache key)."""
    h = hashlib.sha256()
    for key in distinct_images(data)[0]:
        path = image_file(data, key)
        try:
            with open(path, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            raise StageError(f"image file {path} (image {key!r}) is missing") from None
        except OSError as e:
            raise StageError(f"image file {path} (image {key!r}) cannot be read ({e})") from None
        h.update(key.encode() + b"\0" + hashlib.sha256(content).digest())
    return h.hexdigest()[:16]


def vision_key_inputs(vision: VisionEncoder, data: TaskData) -> dict[str, Any]:
    """What the image features depend on: the encoder (name, revision, weights, preprocessing)
    and the image files."""
    return {**vision.key_inputs(), "images": images_digest(data)}


def open_image(data: TaskData, key: str) -> Any:
    """The decoded image; a missing or undecodable file is one line naming it."""
    from PIL import Image, UnidentifiedImageError

    path = image_file(data, key)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise StageError(f"image file {path} (image {key!r}) is missing") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise StageError(
            f"image file {path} (image {key!r}) cannot be read as an image ({detail})"
        ) from None


def image_batches(
    vision: VisionEncoder, data: TaskData, keys: list[str], progress: bool = False
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first image's row, grid float32 [b, n_tokens, d_v], pooled [b, d_v]) for the images
    ``keys`` through the frozen vision encoder, ``BATCH`` at a time: only a batch is held."""
    with tqdm(total=len(keys), unit="image", desc="extract: image features", disable=not progress,
              leave=False) as bar:  # fmt: skip
        for k in range(0, len(keys), BATCH):
            g, p = vision.features([open_image(data, key) for key in keys[k : k + BATCH]])
            yield k, g.numpy(), p.numpy()
            bar.update(min(BATCH, len(keys) - k))


def encode_images(
    vision: VisionEncoder, data: TaskData
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Every distinct image of the task's splits through the frozen vision encoder, once:
    grid features float32 [n_images, n_tokens, d_v], pooled [n_images, d_v] and per split each
    example's row (``distinct_images``); in memory (evaluate's few images)."""
    keys, index = distinct_images(data)
    grids, pooled = zip(*((g, p) for _, g, p in image_batches(vision, data, keys)), strict=True)
    return np.concatenate(grids), np.concatenate(pooled), index


def write_images(
    cfg: StageConfig,
    writer: CacheWriter,
    vision: VisionEncoder,
    data: TaskData,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode every distinct image once and write ``images/`` and each ``<split>/image_index``;
    returns the manifest's ``images`` entry. Done once per attempt (a resumed run skips it).
    Streamed: each batch of images is encoded and written at its rows before the next is read,
    so stage one holds one batch of features, however many images the task has."""
    prog = writer.progress(PROGRESS)
    if prog is not None and prog.get("done"):
        return prog["manifest"]
    t0 = time.perf_counter()
    keys, index = distinct_images(data)
    n_images = len(keys)
    dtype, codec = cfg.cache.dtype, cfg.cache.codec
    paths = layout.image_arrays(dtype)
    arrays: dict[str, Any] = {}
    n_tokens = d = 0
    for start, grid, pooled in image_batches(vision, data, keys, progress):
        b, n_tokens, d = grid.shape
        values = {"grid": grid.reshape(b * n_tokens, d), "pooled": pooled}
        per = {"grid": n_tokens, "pooled": 1}  # rows per image
        for name, x in values.items():
            codes, scale = layout.encode(x, dtype)
            parts = (
                {name: codes} if scale is None else {name: codes, layout.scale_name(name): scale}
            )
            for part, v in parts.items():
                if part not in arrays:  # shapes are known from the first batch
                    chunk = rows_per_chunk(d, dtype, cfg.cache.chunk_mb)
                    arrays[part] = writer.create_array(
                        paths[part], (n_images * per[name], *v.shape[1:]),
                        stored_numpy_dtype(dtype) if part == name else "float32",
                        attrs={"dtype": dtype} if part == name else None,
                        chunk_rows=chunk, shard_rows=chunk * cfg.cache.shard_chunks, codec=codec,
                    )  # fmt: skip
                row = start * per[name]
                arrays[part][row : row + len(v)] = v
    for split, idx in index.items():
        writer.create_array(
            layout.image_index_path(split), idx.shape, idx.dtype, chunk_rows=1 << 20, data=idx
        )
    entry = {
        "encoder": vision.key_inputs(),
        "n_images": n_images,
        "n_tokens": n_tokens,
        "d": d,
        "encode_s": round(time.perf_counter() - t0, 3),
    }
    writer.save_progress(PROGRESS, {"done": True, "manifest": entry})
    return entry


def visual_of(cfg: StageConfig, cache: CommittedCache) -> dict[str, Any] | None:
    """The cache's ``images`` entry when this run reads visual tokens (``backbone.vision`` set),
    else None (a text-only side network; a cache's images, if any, are not read). A cache
    without images, or made with another vision encoder, is one line."""
    want = cfg.backbone.vision
    if want is None:
        return None
    have = cache.manifest.get("images")
    if not have:
        raise StageError(
            f"cache {cache.key} has no image features (extracted without a vision encoder), but "
            f"vision encoder {want!r} was asked for: run `pipeline run extract` with "
            f"--vision-encoder {want}, or train without --vision-encoder (text alone)"
        )
    if have["encoder"]["name"] != want:
        raise StageError(
            f"cache {cache.key} holds image features of vision encoder "
            f"{have['encoder']['name']!r}, but {want!r} was asked for"
        )
    pool = have["encoder"].get("pool")
    if pool != cfg.backbone.vision_pool:
        raise StageError(
            f"cache {cache.key} holds image features pooled {pool or 'none'}, but vision_pool "
            f"{cfg.backbone.vision_pool or 'none'} was asked for: extract with that pooling"
        )
    return have


def vision_mismatch(cfg: StageConfig, manifest: dict[str, Any]) -> str | None:
    """How a cache's vision encoder differs from the configured one (None: it suits)."""
    want = cfg.backbone.vision
    if want is None:
        return None
    encoder = (manifest.get("images") or {}).get("encoder", {})
    have = encoder.get("name")
    if have != want:
        return f"vision encoder ({have!r}, asked {want!r})"
    pool, asked = encoder.get("pool"), cfg.backbone.vision_pool
    return None if pool == asked else f"vision pool ({pool or 'none'}, asked {asked or 'none'})"


def images_per_example(cache: CommittedCache) -> int:
    """How many images each example of a VL cache names: 2 where ``image_index`` is [n, 2]
    (NLVR2), else 1."""
    shape = cache.array(layout.image_index_path(next(iter(cache.manifest["splits"])))).shape
    return 1 if len(shape) == 1 else int(shape[1])


def image_layout(caches: Sequence[CommittedCache]) -> tuple[int, int | None]:
    """The images per example a network reading these caches' image features is built for (the
    most any of them has), and, where they differ (a task list mixing one-image tasks and
    NLVR2), the tokens per image that tell a batch's images apart (else None)."""
    counts = {images_per_example(c) for c in caches}
    if len(counts) == 1:
        return counts.pop(), None
    return max(counts), int(caches[0].manifest["images"]["n_tokens"])
