"""Image features of a vision-and-language cache, for the loader: kept in RAM (images are few:
one row block per distinct image), gathered per batch by each example's image index.

numpy only. ``gather`` gives float32 (float16 as stored), [B, n_tokens, d_v].
"""

from __future__ import annotations

import numpy as np

from cache_store import layout
from cache_store.errors import CacheError
from cache_store.layout import decode_numpy
from cache_store.reader import CommittedCache


class ImageTable:
    """The ``images/grid`` features and every split's ``image_index`` of a committed cache."""

    def __init__(self, cache: CommittedCache) -> None:
        m = cache.manifest
        info = m.get("images")
        if not info:
            raise CacheError(f"cache {cache.key} has no image features")
        self.dtype = m["dtype"]
        self.n_images, self.n_tokens, self.d = info["n_images"], info["n_tokens"], info["d"]
        paths = layout.image_arrays(self.dtype)
        codes = np.asarray(cache.array(paths["grid"])[...])
        scale = None
        if self.dtype == "int8":
            scale = np.asarray(cache.array(paths[layout.scale_name("grid")])[...])
        grid = codes if self.dtype == "float16" else decode_numpy(codes, scale, self.dtype)
        self.grid = grid.reshape(self.n_images, self.n_tokens, self.d)
        self.index = {
            split: np.asarray(cache.array(layout.image_index_path(split))[...])
            for split in m["splits"]
        }

    @classmethod
    def of_arrays(cls, grid: np.ndarray, index: dict[str, np.ndarray]) -> ImageTable:
        """A table of features computed elsewhere (a live vision encoder): ``grid`` [n_images,
        n_tokens, d_v], ``index`` per split each example's row(s)."""
        table = cls.__new__(cls)
        table.dtype = str(grid.dtype)
        table.n_images, table.n_tokens, table.d = grid.shape
        table.grid, table.index = grid, index
        return table

    def gather(self, split: str, examples: np.ndarray) -> np.ndarray:
        """The visual tokens of examples ``examples`` of ``split``: [B, n_tokens, d_v]; with two
        images per example (``image_index`` [n, 2], NLVR2) the first image's tokens, then the
        second's: [B, 2 * n_tokens, d_v]."""
        g = self.grid[self.index[split][examples]]
        return g.reshape(len(g), -1, self.d) if g.ndim == 4 else g
