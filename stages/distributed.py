"""Stage one and stage-two sweeps on a Dask cluster.

    pipeline run extract --task rte --workers 2                  # a local cluster of 2 processes
    pipeline run extract --task rte --scheduler tcp://host:8786  # an existing cluster
    pipeline run train-side --sweep --reduction-factors 8,16 --learning-rates 3e-3,1e-3 --seeds 0,1

Extraction. The coordinating process (the one that runs the command) tokenises, plans the
segments exactly as a single-process run does (``plan_segments``: about one shard of tokens each,
cut at example boundaries), creates the attempt and every array, and cuts each split's segments
into work units: runs of consecutive segments, a few units per worker. A worker runs its unit's
segments with the same batches a single process would use (``segment_states``), so its rows are
bit-identical; it writes every whole shard that lies inside the unit's token range straight into
the attempt, and returns the rows of the shards it shares with its neighbours (at most one at each
end of each stream). The coordinator writes a shared shard once all of its rows have arrived, so
no shard is ever written by two processes. It records progress as a single-process run does (the
prefix of every stream that is on disk), so either kind of run resumes the other's attempt; then
it runs side_init and commits. A worker loads the backbone once per process (``_BACKBONES``) and
checks its digests against the coordinator's.

Faults. A worker that dies mid-unit: the scheduler reruns the unit on another worker (up to
``distributed.scheduler.allowed-failures`` deaths per unit); a unit that raises is retried
``retries`` times. A rerun writes the same whole shards with the same bytes, so nothing needs
undoing, and nothing is committed until every unit has come back.

Sweeps. ``sweep_train_side`` runs one task per (reduction factor, seed, learning rate): each
calls ``train_side`` with a one-trial config, in its own run folder under one sweep folder, from
the shared cache; the coordinator gathers their metrics into ``sweep.json`` and ``sweep.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from tqdm import tqdm

from cache_store import store as st
from cache_store.layout import encode, layer_name, stream_prefix
from cache_store.writer import BackgroundWriter, CacheWriter, StreamWriter
from pipeline.config import Config, apply_overrides
from pipeline.errors import PipelineError
from stages.extract import Extractor, Stream, segment_states, stack_of

if TYPE_CHECKING:
    import torch
    from distributed import Client

    from ladder.backbones import Backbone
    from pipeline.tasks import TaskData

UNITS_PER_WORKER = 4  # work units per worker: load balance and cheap reruns vs shared shards
EXTRACT_RETRIES = 2  # reruns of a unit that raised (worker deaths are counted by the scheduler)
TRAIN_RETRIES = 1
# test hook: a unit that finds this file removes it and kills its own worker process (os._exit)
# right after its first segment is on disk; see tests/test_dask.py
TEST_KILL_ENV = "LST_TEST_KILL_WORKER_FILE"


# --- the cluster ---------------------------------------------------------------------------------


class Cluster:
    """A Dask client: a given one, an existing scheduler's (``scheduler``) or a local cluster's.

    A local cluster (``workers`` processes, one thread each) starts on first use, so a command that
    finds its work already done starts nothing. An existing scheduler is contacted when the
    context is entered, before anything is loaded: one that does not answer within ``timeout``
    seconds is a one-line error.
    """

    def __init__(
        self,
        workers: int | None = None,
        scheduler: str | None = None,
        timeout: float = 30.0,
        client: Client | None = None,
    ) -> None:
        if workers is not None and scheduler is not None:
            raise PipelineError(
                "--workers starts a local Dask cluster and --scheduler uses an existing one; "
                "give one of them"
            )
        if workers is not None and workers < 1:
            raise PipelineError(f"--workers must be at least 1, got {workers}")
        if timeout <= 0:
            raise PipelineError(f"--scheduler-timeout must be positive, got {timeout:g}")
        self.workers, self.scheduler, self.timeout = workers, scheduler, timeout
        self._client = client
        self._owned: list[Any] = []  # what this object started and must close

    def __enter__(self) -> Cluster:
        if self.scheduler is not None:
            self.client  # noqa: B018 - connect now: fail before loading anything
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = self._connect() if self.scheduler else self._local()
        return self._client

    def _connect(self) -> Client:
        from distributed import Client

        address = self.scheduler
        try:
            with _quiet("distributed"):
                client = Client(address, timeout=self.timeout, set_as_default=False)
        except (OSError, TimeoutError):
            raise PipelineError(
                f"scheduler {address} did not answer within {self.timeout:g}s"
            ) from None
        except ValueError as e:
            raise PipelineError(f"bad scheduler address {address!r}: {e}") from None
        self._owned.append(client)
        return client

    def _local(self) -> Client:
        from distributed import Client, LocalCluster

        n = self.workers or 1
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # no dashboard; its HTTP routes on a free local port (not 8787, maybe taken)
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            silence_logs=logging.ERROR,
        )
        self._owned.append(cluster)
        client = Client(cluster, set_as_default=False)
        self._owned.append(client)
        return client

    def n_workers(self) -> int:
        """Workers connected now; waits up to ``timeout`` for a first one."""
        client = self.client
        try:
            client.wait_for_workers(1, timeout=self.timeout)
        except TimeoutError:
            raise PipelineError(
                f"scheduler {client.scheduler.address} has no workers (waited {self.timeout:g}s)"
            ) from None
        return max(1, len(client.scheduler_info(n_workers=-1)["workers"]))

    def close(self) -> None:
        while self._owned:
            obj = self._owned.pop()  # the client first, then its local cluster
            with _quiet("distributed"), contextlib.suppress(Exception):
                obj.close()
        self._client = None


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a logger below ERROR (distributed logs connection retries as warnings)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _raise_killed(e: BaseException, what: str) -> None:
    from distributed import KilledWorker

    if isinstance(e, KilledWorker):
        raise PipelineError(
            f"Dask workers died {what} too often ({e}); nothing was committed; "
            "run the same command again to resume"
        ) from None


# --- the worker side of extraction -------------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
    """How a worker loads the coordinator's backbone, and the digests it must find."""

    name: str
    revision: str | None
    device: str
    dtype: str
    weights_digest: str
    tokenizer_digest: str


_BACKBONES: dict[tuple[Any, ...], Backbone] = {}  # per worker process: loaded once
_BACKBONES_LOCK = threading.Lock()
# one torch job at a time per process: ``Backbone.states`` hooks the shared model's blocks, and
# ``train_side`` seeds torch's global RNG, so two tasks on threads of one worker would mix
_TORCH_LOCK = threading.Lock()


def worker_backbone(spec: BackboneSpec) -> Backbone:
    """The backbone of ``spec``, loaded on first use in this process and kept."""
    import torch

    from ladder.backbones import load_backbone, pick_device

    memo = (spec.name, spec.revision, spec.device, spec.dtype)
    with _BACKBONES_LOCK:
        bb = _BACKBONES.get(memo)
        if bb is None:
            _BACKBONES.clear()  # one backbone per process at a time
            bb = load_backbone(
                spec.name,
                revision=spec.revision,
                device=pick_device(spec.device),
                dtype=getattr(torch, spec.dtype),
            )
            _BACKBONES[memo] = bb
    got = (bb.weights_digest, bb.tokenizer_digest)
    if got != (spec.weights_digest, spec.tokenizer_digest):
        raise PipelineError(
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


def _encode_rows(layers: dict[int, torch.Tensor], dtype: str) -> dict[str, np.ndarray]:
    packed: dict[str, np.ndarray] = {}
    for n, x in layers.items():
        codes, scale = encode(x, dtype)
        packed[layer_name(n)] = codes
        if scale is not None:
            packed[f"{layer_name(n)}_scale"] = scale
    return packed


def _drain(bg: BackgroundWriter) -> None:
    done = threading.Event()
    bg.submit(done.set)
    done.wait(timeout=600)


def _test_fault(bg: BackgroundWriter) -> None:
    """Test hook (``LST_TEST_KILL_WORKER_FILE``): die once, with some of the unit on disk."""
    path = os.environ.get(TEST_KILL_ENV)
    if not path:
        return
    _drain(bg)
    try:
        os.remove(path)  # whoever removes it dies: once per file the test creates
    except FileNotFoundError:
        return
    os._exit(70)


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
            writers[name].append(_encode_rows(layers, unit.dtype))

    bg = BackgroundWriter()
    try:
        for k in range(len(unit.segments) - 1):
            lo, hi = unit.segments[k], unit.segments[k + 1]
            with _TORCH_LOCK:
                rows = segment_states(
                    bb, unit.layers, streams, lo, hi, unit.batch_tokens, unit.max_batch_size
                )
            bg.submit(lambda rows=rows: job(rows))
            if k == 0:
                _test_fault(bg)
    finally:
        bg.close()
    return UnitResult(
        split=unit.split,
        index=unit.index,
        written={name: w.own for name, w in writers.items()},
        edges={name: w.merged_edges() for name, w in writers.items()},
        seconds=time.perf_counter() - t0,
        worker=_worker_address(),
    )


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


# --- the coordinator side of extraction -------------------------------------------------------


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


def backbone_spec(cfg: Config, backbone: Backbone) -> BackboneSpec:
    """What workers load: the configured backbone, which must be loadable by name or path."""
    if not backbone.path:
        raise PipelineError(
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


def absolute_root(root: str) -> str:
    """A local root as an absolute path (workers may run in another directory)."""
    return root if st.is_remote(root) else str(Path(root.removeprefix("file://")).resolve())


class DistributedExtractor(Extractor):
    """``Extractor`` whose segments run on Dask workers; this process stitches and commits."""

    def __init__(
        self,
        cfg: Config,
        backbone: Backbone,
        data: TaskData,
        cluster: Cluster,
        progress: bool = True,
        retries: int = EXTRACT_RETRIES,
        units_per_worker: int = UNITS_PER_WORKER,
    ) -> None:
        super().__init__(cfg, backbone, data, progress=progress)
        self.cluster = cluster
        self.retries = retries
        self.units_per_worker = units_per_worker
        self.spec = backbone_spec(cfg, backbone)
        self.stats: dict[str, Any] = {}

    def _array_paths(self, split: str, name: str) -> dict[str, str]:
        names = [layer_name(n) for n in self.layers[stack_of(name)]]
        if self.dtype == "int8":
            names += [f"{n}_scale" for n in names]
        return {n: f"{stream_prefix(split, name)}/{n}" for n in names}

    def _unit(
        self,
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
            root=absolute_root(self.cfg.cache_root),
            storage_options=self.cfg.cache.storage_options,
            prefix=writer.prefix,
            backbone=self.spec,
            layers=self.layers,
            segments=[k - e0 for k in segments[k0 : k1 + 1]],
            streams={
                name: UnitStream(
                    ids=s.ids[e0:e1],
                    token_types=None if s.token_types is None else s.token_types[e0:e1],
                    start=int(s.offsets[e0]),
                    n_tokens=s.n_tokens,
                    flushed=flushed.get(name, 0),
                    arrays=self._array_paths(split, name),
                )
                for name, s in streams.items()
            },
            dtype=self.dtype,
            shard_rows=self.shard_rows,
            batch_tokens=self.cfg.extract.batch_tokens,
            max_batch_size=self.cfg.extract.max_batch_size,
        )

    def _extract_all(self, writer: CacheWriter, all_streams: dict[str, dict[str, Stream]]) -> None:
        plans, remaining = self._plan_work(writer, all_streams)
        t0 = time.perf_counter()
        n_workers = self.cluster.n_workers()
        target = max(self.shard_rows, -(-remaining // (n_workers * self.units_per_worker)))
        units: list[Unit] = []
        stitchers: dict[str, dict[str, Stitcher]] = {}
        for split, streams, segments, first, flushed in plans:
            stitchers[split] = {
                name: Stitcher(
                    {k: writer.group[p] for k, p in self._array_paths(split, name).items()},
                    s.n_tokens,
                    self.shard_rows,
                    flushed.get(name, 0),
                )
                for name, s in streams.items()
            }
            for k0, k1 in group_segments(segments, first, streams["enc"].offsets, target):
                units.append(
                    self._unit(writer, split, streams, segments, k0, k1, flushed, len(units))
                )
        client = self.cluster.client
        tag = f"{self.key}-{writer.attempt}-{uuid.uuid4().hex[:6]}"
        futures = [
            client.submit(
                run_unit,
                u,
                key=f"lst-extract-{tag}-{u.split}-{u.index}",
                retries=self.retries,
                pure=False,
            )
            for u in units
        ]
        by_key = {f.key: u for f, u in zip(futures, units, strict=True)}
        bar = tqdm(
            total=remaining,
            unit="tok",
            unit_scale=True,
            desc=f"extract {self.key} ({n_workers} workers)",
            disable=not self.show_progress,
        )
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
            _raise_killed(e, "while extracting")
            raise
        finally:
            bar.close()
            client.cancel(futures)
        for split, ss in stitchers.items():
            missing = [name for name, s in ss.items() if not s.complete]
            if missing:  # a bug, never a user error: refuse to commit a cache with holes
                raise RuntimeError(f"split {split}: streams {missing} not fully written")
        self.timings["extract_s"] = time.perf_counter() - t0
        self.stats = {
            "workers": n_workers,
            "workers_used": len(workers_seen),
            "units": len(units),
            "unit_tokens": target,
            "stitched_rows": sum(s.stitched_rows for ss in stitchers.values() for s in ss.values()),
        }

    def _manifest(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {**super()._manifest(*args, **kwargs), "distributed": self.stats}


# --- stage two: a sweep of side-network trainings ---------------------------------------------


@dataclass
class SweepResult:
    folder: Path
    cache_key: str
    task: str
    metric: str
    rows: list[dict[str, Any]] = field(default_factory=list)


SWEEP_COLUMNS = (
    "trial", "r", "seed", "lr", "best_epoch", "validation", "test", "trainable_parameters",
    "compute_s", "wall_s", "run", "worker",
)  # fmt: skip


def run_trial(cfg: Config, cache_key: str, run_name: str) -> dict[str, Any]:
    """One side network (``cfg`` has a one-trial grid) trained from the cache; its summary row."""
    from stages.train_side import train_side

    t0 = time.perf_counter()
    with _TORCH_LOCK:
        result = train_side(cfg, cache_key=cache_key, run_name=run_name, progress=False)
    ((name, net),) = result.metrics["networks"].items()
    return {
        "trial": name,
        "r": net["r"],
        "seed": net["seed"],
        "lr": net["lr"],
        "best_epoch": net["best_epoch"],
        "validation": net["best_validation"],
        "test": (net.get("test") or {}).get("score"),
        "trainable_parameters": net["trainable_parameters"],
        "compute_s": round(net["compute_s"], 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "run": str(result.folder),
        "worker": _worker_address(),
        "test_metrics": net.get("test"),
        "epochs": net["epochs"],
    }


def sweep_trials(cfg: Config) -> int:
    t = cfg.train_side
    return len(t.reduction_factors) * len(t.seeds) * len(t.learning_rates)


def sweep_train_side(
    cfg: Config,
    cluster: Cluster,
    *,
    cache_key: str | None = None,
    sweep_name: str | None = None,
    progress: bool = True,
    retries: int = TRAIN_RETRIES,
) -> SweepResult:
    """One Dask task per (r, seed, lr) of ``cfg.train_side``; metrics gathered into one table."""
    from stages.train_side import (
        backbone_config_of,
        load_side_init,
        resolve_cache,
        run_signature,
        side_config,
        task_spec_of,
        trials_of,
    )

    cache = resolve_cache(cfg, cache_key)
    spec = task_spec_of(cache)
    bcfg = backbone_config_of(cache)
    trials = trials_of(cfg)
    if len(set(trials)) != len(trials):
        raise PipelineError("the sweep grid has repeated trials; list each value once")
    for r in sorted({tr.r for tr in trials}):  # every trial's config is valid before any work
        side_config(cfg, r, spec).validate(bcfg)
        if cfg.train_side.init != "random":
            load_side_init(cache, r, cfg.train_side.init)
    signature = run_signature(cfg, cache.key, None)
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:8]
    folder = Path(cfg.train_side.run_dir).expanduser().resolve() / (
        sweep_name or f"sweep-{cache.key}-{digest}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    root = absolute_root(cfg.cache_root)
    client = cluster.client
    cluster.n_workers()
    tag = uuid.uuid4().hex[:6]
    futures = {}
    for tr in trials:
        tcfg = apply_overrides(
            cfg,
            {
                "cache.root": root,
                "train_side.run_dir": str(folder),
                "train_side.reduction_factors": [tr.r],
                "train_side.seeds": [tr.seed],
                "train_side.learning_rates": [tr.lr],
            },
        )
        fut = client.submit(
            run_trial,
            tcfg,
            cache.key,
            tr.name,
            key=f"lst-train-{folder.name}-{tr.name}-{tag}",
            retries=retries,
            pure=False,
        )
        futures[fut.key] = (fut, tr)
    from distributed import as_completed

    rows: dict[Any, dict[str, Any]] = {}
    bar = tqdm(total=len(trials), unit="trial", desc=f"sweep {folder.name}", disable=not progress)
    try:
        for fut, row in as_completed(
            [f for f, _ in futures.values()], loop=client.loop, with_results=True
        ):
            rows[futures[fut.key][1]] = row
            bar.update(1)
            bar.set_postfix(last=f"{row['trial']} {row['validation']:.1f}")
    except Exception as e:
        _raise_killed(e, "while training")
        raise
    finally:
        bar.close()
        client.cancel([f for f, _ in futures.values()])
    result = SweepResult(folder, cache.key, spec.name, spec.metric, [rows[tr] for tr in trials])
    write_sweep(result)
    return result


def write_sweep(result: SweepResult) -> None:
    """sweep.json (every row, with per-epoch history) and sweep.csv (the table) in the folder."""
    payload = {
        "cache": result.cache_key,
        "task": result.task,
        "metric": result.metric,
        "trials": result.rows,
    }
    tmp = result.folder / "sweep.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    tmp.replace(result.folder / "sweep.json")
    tmp = result.folder / "sweep.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(result.rows)
    tmp.replace(result.folder / "sweep.csv")
