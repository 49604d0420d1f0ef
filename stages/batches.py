"""Torch batches for the stages, from the cache loader's numpy batches (``cache_store`` has no
torch): ``to_torch`` shares the numpy buffers (``torch.from_numpy``, no copy); bfloat16 states,
which the cache keeps as their bits in uint16, are viewed as ``torch.bfloat16``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from cache_store.loader import NumpyBatch


@dataclass
class Batch:
    """One padded batch. ``states[stream][n]`` is [B, T_stream, d]: float16/bfloat16 as cached,
    else float32."""

    index: torch.Tensor  # [B] example indices in the split
    labels: torch.Tensor  # [B] class ids (int64) or scores (float32)
    states: dict[str, dict[int, torch.Tensor]]
    masks: dict[str, torch.Tensor]  # [B, T_stream] bool
    input_ids: dict[str, torch.Tensor]  # [B, T_stream] (pad 0): what online LST feeds a backbone
    target_ids: dict[str, torch.Tensor] = field(default_factory=dict)  # decoder streams, pad -100
    token_type_ids: torch.Tensor | None = None  # [B, T_enc], BERT pairs
    visual: torch.Tensor | None = None  # [B, n_tokens, d_v] image features (VL caches)

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return Batch(
            self.index,
            self.labels.to(device),
            {
                s: {n: x.to(device, non_blocking=True) for n, x in d.items()}
                for s, d in self.states.items()
            },
            {s: m.to(device) for s, m in self.masks.items()},
            {s: x.to(device) for s, x in self.input_ids.items()},
            {s: x.to(device) for s, x in self.target_ids.items()},
            None if self.token_type_ids is None else self.token_type_ids.to(device),
            None if self.visual is None else self.visual.to(device),
        )


def to_torch(b: NumpyBatch) -> Batch:
    """The torch view of a loader batch: the same memory, no copies."""

    def state(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x)
        return t.view(torch.bfloat16) if b.state_dtype == "bfloat16" else t

    return Batch(
        torch.from_numpy(b.index),
        torch.from_numpy(b.labels),
        {s: {n: state(x) for n, x in d.items()} for s, d in b.states.items()},
        {s: torch.from_numpy(m) for s, m in b.masks.items()},
        {s: torch.from_numpy(x) for s, x in b.input_ids.items()},
        {s: torch.from_numpy(x) for s, x in b.target_ids.items()},
        None if b.token_type_ids is None else torch.from_numpy(b.token_type_ids),
        None if b.visual is None else torch.from_numpy(b.visual),
    )


def torch_batches(batches: Iterable[NumpyBatch]) -> Iterator[Batch]:
    """``to_torch`` of each batch of a loader epoch, as they come."""
    for b in batches:
        yield to_torch(b)
