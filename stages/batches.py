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
        """The batch on ``device`` (itself on the CPU). To CUDA from pinned memory without
        blocking: the copy runs beside the work already queued (:func:`on_device`). ``index``
        stays on the CPU, where predictions are gathered."""
        if device.type == "cpu":
            return self

        def send(x: torch.Tensor) -> torch.Tensor:
            if x.device == device:
                return x
            pinned = device.type == "cuda" and x.device.type == "cpu"
            return (x.pin_memory() if pinned else x).to(device, non_blocking=pinned)

        return Batch(
            self.index,
            send(self.labels),
            {s: {n: send(x) for n, x in d.items()} for s, d in self.states.items()},
            {s: send(m) for s, m in self.masks.items()},
            {s: send(x) for s, x in self.input_ids.items()},
            {s: send(x) for s, x in self.target_ids.items()},
            None if self.token_type_ids is None else send(self.token_type_ids),
            None if self.visual is None else send(self.visual),
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


def on_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """``batches`` on ``device``, each sent one batch ahead: on CUDA the copy of the next batch
    is queued before this one is used, so it overlaps this batch's step. On the CPU, as they
    come."""
    if device.type == "cpu":
        yield from batches
        return
    ahead: Batch | None = None
    for b in batches:
        sent = b.to(device)
        if ahead is not None:
            yield ahead
        ahead = sent
    if ahead is not None:
        yield ahead
