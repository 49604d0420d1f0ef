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

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor of the batch."""
        yield self.index
        yield self.labels
        for d in self.states.values():
            yield from d.values()
        for group in (self.masks, self.input_ids, self.target_ids):
            yield from group.values()
        for t in (self.token_type_ids, self.visual):
            if t is not None:
                yield t

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
    """``batches`` on ``device``, each sent one batch ahead: the copy of the next batch is
    queued before this one is used. On CUDA the copies run on a stream of their own, so the next
    batch's copy overlaps this batch's step; the step waits for its own batch's copy alone (an
    event per batch), and the allocator is told the batch is used on the step's stream. On the
    CPU, the batches as they come."""
    if device.type == "cpu":
        yield from batches
        return
    copies = torch.cuda.Stream(device) if device.type == "cuda" else None
    ahead: tuple[Batch, torch.cuda.Event | None] | None = None
    for b in batches:
        sent = _send(b, device, copies)
        if ahead is not None:
            yield _ready(*ahead)
        ahead = sent
    if ahead is not None:
        yield _ready(*ahead)


def _send(
    b: Batch, device: torch.device, copies: torch.cuda.Stream | None
) -> tuple[Batch, torch.cuda.Event | None]:
    """``b`` sent to ``device``: on the ``copies`` stream (CUDA), with the event that marks its
    end; else as ``Batch.to``."""
    if copies is None:
        return b.to(device), None
    with torch.cuda.stream(copies):
        sent = b.to(device)
        done = torch.cuda.Event()
        done.record(copies)
    return sent, done


def _ready(b: Batch, done: torch.cuda.Event | None) -> Batch:
    """``b`` once the stream that uses it has waited for its copy (``done``)."""
    if done is None:
        return b
    use = torch.cuda.current_stream(b.labels.device)
    use.wait_event(done)
    for t in b.tensors():
        if t.is_cuda:
            t.record_stream(use)  # not reused by the copy stream before the step is done
    return b
