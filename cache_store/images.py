"""Image features of a vision-and-language cache, for the loader: one row block per distinct
image, gathered per batch by each example's image index. Kept in RAM when they fit the memory
budget (easy-VQA's 4x4-pooled features of 8,000 questions: 11 MB), else read from the store per batch: only the batch's distinct images.

numpy only. ``gather`` gives float32 (float16 as stored), [B, n_tokens, d_v].
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from cache_store import layout
from cache_store.errors import CacheError
from cache_store.layout import decode_numpy
from cache_store.reader import CommittedCache


class ImageTable:
    """The ``images/grid`` features and every split's ``image_index`` of a committed cache.

    ``memory_budget`` (bytes): the features are read whole into RAM when they fit (or with no
    budget), else streamed: each ``gather`` reads the token rows of the batch's distinct images
    (an orthogonal selection of the store's chunks) and decodes them.
    """

    def __init__(self, cache: CommittedCache, memory_budget: int | None = None) -> None:
        m = cache.manifest
        info = m.get("images")
        if not info:
            raise CacheError(f"cache {cache.key} has no image features")
        self.dtype = m["dtype"]
        self.n_images, self.n_tokens, self.d = info["n_images"], info["n_tokens"], info["d"]
        paths = layout.image_arrays(self.dtype)
        self._codes: Any = cache.array(paths["grid"])
        self._scale: Any = None
        if self.dtype == "int8":
            self._scale = cache.array(paths[layout.scale_name("grid")])
        in_ram = self.n_images * self.n_tokens * self.d * (2 if self.dtype == "float16" else 4)
        self.streamed = memory_budget is not None and in_ram > memory_budget
        self.grid: np.ndarray | None = None  # [n_images, n_tokens, d_v] when kept in RAM
        if not self.streamed:
            self.grid = self._decode(slice(None)).reshape(self.n_images, self.n_tokens, self.d)
        self.index = {
            split: np.asarray(cache.array(layout.image_index_path(split))[...])
            for split in m["splits"]
        }

    def _decode(self, rows: Any) -> np.ndarray:
        """Token rows of the store (a slice, or row numbers) decoded: [n, d_v]."""
        if isinstance(rows, slice):
            codes = np.asarray(self._codes[rows])
            scale = None if self._scale is None else np.asarray(self._scale[rows])
        else:
            codes = self._codes.get_orthogonal_selection((rows, slice(None)))
            scale = None
            if self._scale is not None:
                rest = (slice(None),) * (self._scale.ndim - 1)
                scale = self._scale.get_orthogonal_selection((rows, *rest))
        return codes if self.dtype == "float16" else decode_numpy(codes, scale, self.dtype)

    def images(self, rows: np.ndarray) -> np.ndarray:
        """The features of image rows ``rows`` (any order, repeats allowed): [n, n_tokens, d_v]."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.grid is not None:
            return self.grid[rows]
        distinct, back = np.unique(rows, return_inverse=True)
        tokens = (distinct[:, None] * self.n_tokens + np.arange(self.n_tokens)).ravel()
        x = self._decode(tokens).reshape(len(distinct), self.n_tokens, self.d)
        return x[back.reshape(-1)]

    def blocks(self, rows: np.ndarray, per_block: int = 256) -> Iterator[np.ndarray]:
        """The features of image rows ``rows``, ``per_block`` images at a time."""
        for k in range(0, len(rows), per_block):
            yield self.images(rows[k : k + per_block])

    @classmethod
    def of_arrays(cls, grid: np.ndarray, index: dict[str, np.ndarray]) -> ImageTable:
        """A table of features computed elsewhere (a live vision encoder): ``grid`` [n_images,
        n_tokens, d_v], ``index`` per split each example's row(s)."""
        table = cls.__new__(cls)
        table.dtype = str(grid.dtype)
        table.n_images, table.n_tokens, table.d = grid.shape
        table.grid, table.index = grid, index
        table.streamed, table._codes, table._scale = False, None, None
        return table

    def gather(self, split: str, examples: np.ndarray) -> np.ndarray:
        """The visual tokens of examples ``examples`` of ``split``: [B, n_tokens, d_v]; with two
        images per example (``image_index`` [n, 2], NLVR2) the first image's tokens, then the
        second's: [B, 2 * n_tokens, d_v]."""
        idx = self.index[split][examples]  # [B] or [B, 2]
        g = self.images(idx.reshape(-1)).reshape(*idx.shape, self.n_tokens, self.d)
        return g.reshape(len(g), -1, self.d) if g.ndim == 4 else g
