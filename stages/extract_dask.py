"""Stage one on a Dask cluster: the segments of an extraction as work units on Dask workers.

    pipeline run extract --task rte --workers 2                  # a local cluster of 2 processes
    pipeline run extract --task rte --scheduler tcp://host:8786  # an existing cluster

The coordinating process (the one that runs the command) tokenises, plans the segments exactly as
a single-process run does (``Extractor.plan_work``: about one shard of tokens each, cut at
example boundaries), creates the attempt and every array, and cuts each split's segments into
work units: runs of consecutive segments, a few units per worker. A worker runs its unit's
segments with the same batches a single process would use (``segment_states``), so its rows are
bit-identical; it writes every whole shard that lies inside the unit's token range straight into
the attempt, and returns the rows of the shards it shares with its neighbours (at most one at each
end of each stream). The coordinator writes a shared shard once all of its rows have arrived, so
no shard is ever written by two processes. It records progress as a single-process run does (the
prefix of every stream that is on disk), so either kind of run resumes the other's attempt; the
``Extractor`` then runs side_init and commits. A worker loads the backbone once per process
(``_BACKBONES``) and checks its digests against the coordinator's.

Faults. A worker that dies mid-unit: the scheduler reruns the unit on another worker (up to
``distributed.scheduler.allowed-failures`` deaths per unit); a unit that raises is retried
``retries`` times. A rerun writes the same whole shards with the same bytes, so nothing needs
undoing, and nothing is committed until every unit has come back.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from cache_store import store as st
from cache_store.writer import BackgroundWriter, CacheWriter, StreamWriter
from stages.cluster import TORCH_LOCK, Cluster, absolute_root, raise_killed, worker_address
from stages.config import StageConfig
from stages.errors import StageError
from stages.extract import Extractor, SplitWork, encode_rows, segment_states
from stages.tokens import Stream

if TYPE_CHECKING:
    import torch

    from ladder.backbones import Backbone

UNITS_PER_WORKER = 4  # work units per worker: load balance and cheap reruns vs shared shards
EXTRACT_RETRIES = 2  # reruns of a unit that raised (worker deaths are counted by the scheduler)


@dataclass(frozen=True)
class BackboneSpec:
    """How a worker loads the coordinator's backbone, and the digests it must find."""

    name: str
    revision: str | None
    device: str
    dtype: str
    weights_digest: str
    tokenizer_digest: str
    quantization: str = "none"  # backbone.quantization


_BACKBONES: dict[tuple[Any, ...], Backbone] = {}  # per worker process: loaded once
_BACKBONES_LOCK = threading.Lock()


def worker_backbone(spec: BackboneSpec) -> Backbone:
    """The backbone of ``spec``, loaded on first use in this process and kept."""
    import torch

    from ladder.backbones import load_backbone, pick_device

    memo = (spec.name, spec.revision, spec.device, spec.dtype, spec.quantization)
    with _BACKBONES_LOCK:
        bb = _BACKBONES.get(memo)
        if bb is None:
            _BACKBONES.clear()  # one backbone per process at a time
            bb = load_backbone(
                spec.name,
                revision=spec.revision,
                device=pick_device(spec.device),
                dtype=getattr(torch, spec.dtype),
                quantization=spec.quantization,
            )
            _BACKBONES[memo] = bb
    got = (bb.weights_digest, bb.tokenizer_digest)
    if got != (spec.weights_digest, spec.tokenizer_digest):
        raise StageError(
            f"a Dask worker on {os.uname().nodename} loaded backbone {spec.name!r} with other "
            f"weights/tokenizer ({'/'.join(got)}) than the coordinator "
            f"({spec.weights_digest}/{spec.tokenizer_digest}); give every worker the same model"
        )
    return bb


@dataclass
class UnitStream:
    """One stream of a work unit: its examples' ids and where they go in the split's stream."""

    ids: list[list[int]]
    token_types: list[list[int]] | None
    start: int  # token index (in the split's stream) of the unit's first row
    n_tokens: int  # tokens of the whole stream
    flushed: int  # rows [0, flushed) are already on disk (a resumed attempt)
    arrays: dict[str, str]  # array name in packed rows -> path under the attempt


@dataclass
class Unit:
    """A run of consecutive segments of one split: what one Dask task extracts."""

    split: str
    index: int
    root: str
    storage_options: dict[str, Any]
    prefix: str  # the attempt group
    backbone: BackboneSpec
    layers: dict[str, list[int]]
    segments: list[int]  # example starts relative to the unit, and its end
    streams: dict[str, UnitStream]
    dtype: str
    shard_rows: int
    batch_tokens: int
    max_batch_size: int

    @property
    def enc_tokens(self) -> int:
        return sum(len(x) for x in self.streams["enc"].ids)


@dataclass
class UnitResult:
    split: str
    index: int
    written: dict[str, tuple[int, int] | None]  # per stream: whole shards written by the worker
    edges: dict[str, list[tuple[int, dict[str, np.ndarray]]]]  # per stream: (start, rows)
    seconds: float
    worker: str


class RangeWriter:
    """Rows [start, stop) of one stream, appended in order, on a worker.

    The whole shards inside the range are written to the arrays (``StreamWriter``); the rows of a
    shard the range shares with a neighbour (at most one at each end) are kept as *edges* for the
    coordinator; rows below ``flushed`` are already on disk and dropped.
    """

    def __init__(
        self,
        arrays: dict[str, zarr.Array],
        n_tokens: int,
        shard_rows: int,
        start: int,
        stop: int,
        flushed: int,
    ) -> None:
        S = shard_rows
        self.pos = start
        self.lo = max(start, flushed)
        own_lo = min(max(-(-start // S) * S, flushed), n_tokens)  # flushed: a boundary or the end
        own_hi = stop if stop == n_tokens else stop // S * S
        self.own: tuple[int, int] | None = (own_lo, own_hi) if own_hi > own_lo else None
        self.head_end = own_lo if self.own else stop
        self.tail_start = own_hi if self.own else stop
        self.writer = StreamWriter(arrays, n_tokens, S, own_lo, own_lo) if self.own else None
        self.edges: list[tuple[int, dict[str, np.ndarray]]] = []

    def append(self, rows: dict[str, np.ndarray]) -> None:
        a = self.pos
        b = a + len(next(iter(rows.values())))

        def part(x0: float, x1: float, copy: bool) -> tuple[int, dict[str, np.ndarray]] | None:
            lo, hi = int(max(a, x0)), int(min(b, x1))
            if hi <= lo:
                return None
            cut = {k: v[lo - a : hi - a] for k, v in rows.items()}
            return lo, ({k: v.copy() for k, v in cut.items()} if copy else cut)

        if (head := part(self.lo, self.head_end, True)) is not None:
            self.edges.append(head)
        if self.own is not None and (mid := part(*self.own, False)) is not None:
            assert self.writer is not None
            self.writer.append(mid[1])
        if (tail := part(max(self.lo, self.tail_start), math.inf, True)) is not None:
            self.edges.append(tail)
        self.pos = b

    def merged_edges(self) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The edge rows as few contiguous pieces (one per shared shard, normally)."""
        out: list[tuple[int, dict[str, list[np.ndarray]], int]] = []
        for start, rows in self.edges:
            n = len(next(iter(rows.values())))
            if out and out[-1][2] == start:
                for k, v in rows.items():
                    out[-1][1][k].append(v)
                out[-1] = (out[-1][0], out[-1][1], start + n)
            else:
                out.append((start, {k: [v] for k, v in rows.items()}, start + n))
        return [(s, {k: np.concatenate(v) for k, v in rows.items()}) for s, rows, _ in out]


def run_unit(unit: Unit) -> UnitResult:
    """Extract one work unit on a Dask worker (or anywhere): write its shards, return its edges."""
    t0 = time.perf_counter()
    bb = worker_backbone(unit.backbone)
    store = st.open_root(unit.root, unit.storage_options, write=True)
    group = zarr.open_group(store, path=unit.prefix, mode="r+")
    streams: dict[str, Stream] = {}
    writers: dict[str, RangeWriter] = {}
    for name, us in unit.streams.items():
        s = streams[name] = Stream(name, us.ids, token_types=us.token_types)
        arrays = {k: group[path] for k, path in us.arrays.items()}
        writers[name] = RangeWriter(
            arrays, us.n_tokens, unit.shard_rows, us.start, us.start + s.n_tokens, us.flushed
        )

    def job(rows: dict[str, dict[int, torch.Tensor]]) -> None:
        for name, layers in rows.items():
            writers[name].append(encode_rows(layers, unit.dtype))

    bg = BackgroundWriter()
    try:
        for k in range(len(unit.segments) - 1):
            lo, hi = unit.segments[k], unit.segments[k + 1]
            with TORCH_LOCK:
                rows = segment_states(
                    bb, unit.layers, streams, lo, hi, unit.batch_tokens, unit.max_batch_size
                )
            bg.submit(lambda rows=rows: job(rows))
    finally:
        bg.close()
    return UnitResult(
        split=unit.split,
        index=unit.index,
        written={name: w.own for name, w in writers.items()},
        edges={name: w.merged_edges() for name, w in writers.items()},
        seconds=time.perf_counter() - t0,
        worker=worker_address(),
    )


# --- the coordinator side ---------------------------------------------------------------------


class Stitcher:
    """One stream on the coordinator: which rows are on disk, and the shards units share.

    Workers write the whole shards inside their units; a shard that straddles two units arrives
    here in pieces and is written once all its rows are in. ``flushed`` is the prefix on disk.
    """

    def __init__(
        self, arrays: dict[str, zarr.Array], n_tokens: int, shard_rows: int, flushed: int
    ) -> None:
        self.arrays, self.n, self.S = arrays, n_tokens, shard_rows
        self.done: list[tuple[int, int]] = [(0, flushed)] if flushed else []
        self.pending: dict[int, dict[int, dict[str, np.ndarray]]] = {}
        self.stitched_rows = 0

    def mark(self, a: int, b: int) -> None:
        merged: list[tuple[int, int]] = []
        for x, y in sorted([*self.done, (a, b)]):
            if merged and x <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], y))
            else:
                merged.append((x, y))
        self.done = merged

    @property
    def flushed(self) -> int:
        return self.done[0][1] if self.done and self.done[0][0] == 0 else 0

    @property
    def complete(self) -> bool:
        return self.flushed == self.n

    def add(self, start: int, rows: dict[str, np.ndarray]) -> None:
        """Rows from ``start`` on: kept per shard; a shard whose rows are all in is written."""
        n = len(next(iter(rows.values())))
        pos = start
        while pos < start + n:
            j = pos // self.S
            s0, s1 = j * self.S, min((j + 1) * self.S, self.n)
            end = min(s1, start + n)
            self.pending.setdefault(j, {})[pos] = {
                k: v[pos - start : end - start] for k, v in rows.items()
            }
            pieces = self.pending[j]
            if sum(len(next(iter(p.values()))) for p in pieces.values()) == s1 - s0:
                order = sorted(pieces)
                for k, arr in self.arrays.items():
                    arr[s0:s1] = np.concatenate([pieces[p][k] for p in order])
                del self.pending[j]
                self.mark(s0, s1)
                self.stitched_rows += s1 - s0
            pos = end


def backbone_spec(cfg: StageConfig, backbone: Backbone) -> BackboneSpec:
    """What workers load: the configured backbone, which must be loadable by name or path."""
    if not backbone.path:
        raise StageError(
            f"backbone {backbone.name!r} was built in memory; Dask workers load the backbone "
            "themselves: give a short name, a Hugging Face name or a local model folder"
        )
    return BackboneSpec(
        name=cfg.backbone.name,
        revision=cfg.backbone.revision,
        device=cfg.extract.device,
        dtype=str(backbone.dtype).removeprefix("torch."),
        weights_digest=backbone.weights_digest,
        tokenizer_digest=backbone.tokenizer_digest,
        quantization=cfg.backbone.quantization,
    )


def group_segments(
    segments: list[int], first: int, offsets: np.ndarray, target_tokens: int
) -> list[tuple[int, int]]:
    """Runs [k0, k1) of consecutive segments from ``first`` on, each of about ``target_tokens``."""
    out, k, last = [], first, len(segments) - 1
    while k < last:
        k1 = k + 1
        while k1 < last and offsets[segments[k1]] - offsets[segments[k]] < target_tokens:
            k1 += 1
        out.append((k, k1))
        k = k1
    return out


class DaskSegments:
    """A ``SegmentRunner``: an extraction's segments as work units on a Dask cluster.

    ``unit_task`` is what each Dask task runs (``run_unit``); a test may wrap it to inject faults.
    """

    def __init__(
        self,
        cluster: Cluster,
        retries: int = EXTRACT_RETRIES,
        units_per_worker: int = UNITS_PER_WORKER,
        unit_task: Callable[[Unit], UnitResult] = run_unit,
    ) -> None:
        self.cluster = cluster
        self.retries = retries
        self.units_per_worker = units_per_worker
        self.unit_task = unit_task

    def _unit(
        self,
        ex: Extractor,
        spec: BackboneSpec,
        writer: CacheWriter,
        split: str,
        streams: dict[str, Stream],
        segments: list[int],
        k0: int,
        k1: int,
        flushed: dict[str, int],
        index: int,
    ) -> Unit:
        e0, e1 = segments[k0], segments[k1]
        return Unit(
            split=split,
            index=index,
            root=absolute_root(ex.cfg.cache.resolved_root),
            storage_options=ex.cfg.cache.storage_options,
            prefix=writer.prefix,
            backbone=spec,
            layers=ex.layers,
            segments=[k - e0 for k in segments[k0 : k1 + 1]],
            streams={
                name: UnitStream(
                    ids=s.ids[e0:e1],
                    token_types=None if s.token_types is None else s.token_types[e0:e1],
                    start=int(s.offsets[e0]),
                    n_tokens=s.n_tokens,
                    flushed=flushed.get(name, 0),
                    arrays=ex.state_arrays(split, name),
                )
                for name, s in streams.items()
            },
            dtype=ex.dtype,
            shard_rows=ex.shard_rows,
            batch_tokens=ex.cfg.extract.batch_tokens,
            max_batch_size=ex.cfg.extract.max_batch_size,
        )

    def __call__(
        self, ex: Extractor, writer: CacheWriter, work: list[SplitWork], remaining: int
    ) -> dict[str, Any]:
        spec = backbone_spec(ex.cfg, ex.backbone)
        n_workers = self.cluster.n_workers()
        target = max(ex.shard_rows, -(-remaining // (n_workers * self.units_per_worker)))
        units: list[Unit] = []
        stitchers: dict[str, dict[str, Stitcher]] = {}
        for split, streams, segments, first, flushed in work:
            stitchers[split] = {
                name: Stitcher(
                    {k: writer.group[p] for k, p in ex.state_arrays(split, name).items()},
                    s.n_tokens,
                    ex.shard_rows,
                    flushed.get(name, 0),
                )
                for name, s in streams.items()
            }
            for k0, k1 in group_segments(segments, first, streams["enc"].offsets, target):
                units.append(
                    self._unit(
                        ex, spec, writer, split, streams, segments, k0, k1, flushed, len(units)
                    )
                )
        client = self.cluster.client
        tag = f"{ex.key}-{writer.attempt}-{uuid.uuid4().hex[:6]}"
        futures = [
            client.submit(
                self.unit_task,
                u,
                key=f"lst-extract-{tag}-{u.split}-{u.index}",
                retries=self.retries,
                pure=False,
            )
            for u in units
        ]
        by_key = {f.key: u for f, u in zip(futures, units, strict=True)}
        bar = ex.progress_bar(remaining, f" ({n_workers} workers)")
        from distributed import as_completed

        workers_seen: set[str] = set()
        try:
            for fut, res in as_completed(futures, loop=client.loop, with_results=True):
                unit = by_key[fut.key]
                for name, st_ in stitchers[res.split].items():
                    if res.written[name] is not None:
                        st_.mark(*res.written[name])
                    for start, rows in res.edges[name]:
                        st_.add(start, rows)
                writer.save_progress(
                    res.split,
                    {
                        "created": True,
                        "flushed": {k: v.flushed for k, v in stitchers[res.split].items()},
                    },
                )
                workers_seen.add(res.worker)
                bar.update(unit.enc_tokens)
        except Exception as e:
            raise_killed(e, "while extracting")
            raise
        finally:
            bar.close()
            client.cancel(futures)
        for split, ss in stitchers.items():
            missing = [name for name, s in ss.items() if not s.complete]
            if missing:  # a bug, never a user error: refuse to commit a cache with holes
                raise RuntimeError(f"split {split}: streams {missing} not fully written")
        return {
            "workers": n_workers,
            "workers_used": len(workers_seen),
            "units": len(units),
            "unit_tokens": target,
            "stitched_rows": sum(s.stitched_rows for ss in stitchers.values() for s in ss.values()),
        }
