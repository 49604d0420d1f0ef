"""Stage one: run the frozen backbone once over every split and write the activation cache.

    pipeline run extract --task rte --data-dir ../shared/data/glue
    pipeline run extract --task sst2 --dtype int8 --cache-root s3://team/lst

Tokenise with the task's template, plan lengths, cut each split into segments of about one shard
of tokens, group each segment's examples by length into batches (little padding), run the
backbone under ``torch.inference_mode()``, strip padding, and hand the rows to a background
writer that encodes, compresses and writes whole shards. Running it again with the same inputs
does no work and prints the existing key.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from cache_store import store as st
from cache_store.layout import (
    FORMAT,
    FORMAT_VERSION,
    encode,
    layer_name,
    meta_prefix,
    rows_per_chunk,
    stored_numpy_dtype,
    stream_prefix,
)
from cache_store.manifest import cache_key, check_compatible, library_versions, provenance
from cache_store.writer import (
    BackgroundWriter,
    CacheWriter,
    StreamWriter,
    key_meta,
    raise_write_error,
)
from ladder.backbones import (
    Backbone,
    d_model,
    family_of,
    load_config_only,
    num_blocks,
    pick_compute_dtype,
    pick_device,
)
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.tasks import TaskData, t5_candidates, t5_source, t5_target

if TYPE_CHECKING:
    from stages.distributed import Cluster

TEMPLATE_VERSION = 1  # bump when tokenisation templates change


# --- tokenisation and planning ---------------------------------------------------------------


@dataclass
class Stream:
    """One token axis of a split: per-example token ids, and T5 decoder targets."""

    name: str
    ids: list[list[int]]  # encoder: input ids; decoder: decoder *input* ids (shifted right)
    token_types: list[list[int]] | None = None
    targets: list[list[int]] | None = None  # decoder: the labels the side network predicts
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        lengths = np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])


def tokenize_split(
    backbone: Backbone, data: TaskData, split: str, max_length: int
) -> dict[str, Stream]:
    """The streams of one split: ``enc``, and for T5 ``dec`` plus ``cand_K`` for evaluation."""
    spec, examples = data.spec, data.splits[split]
    tok = backbone.tokenizer
    if not backbone.encoder_decoder:
        columns = list(zip(*(ex.texts for ex in examples), strict=True))
        enc = tok(*columns[:2], truncation=True, max_length=max_length)
        types = enc.get("token_type_ids")
        return {"enc": Stream("enc", enc["input_ids"], token_types=types)}
    sources = [t5_source(spec, ex) for ex in examples]
    enc = tok(sources, truncation=True, max_length=max_length)
    streams = {"enc": Stream("enc", enc["input_ids"])}
    start = backbone.config.decoder_start_token_id or 0

    def teacher(targets: list[list[int]], name: str) -> Stream:
        return Stream(name, [[start, *t[:-1]] for t in targets], targets=targets)

    targets = tok([t5_target(spec, ex.label) for ex in examples])["input_ids"]
    streams["dec"] = teacher(targets, "dec")
    if split != "train":
        for k, cand in enumerate(t5_candidates(spec)):
            ids = tok([cand])["input_ids"][0]
            streams[f"cand_{k}"] = teacher([ids] * len(examples), f"cand_{k}")
    return streams


def plan_segments(offsets: np.ndarray, segment_tokens: int) -> list[int]:
    """Example indices where segments start (plus the end): about one shard of tokens each."""
    starts, n = [0], len(offsets) - 1
    while starts[-1] < n:
        target = offsets[starts[-1]] + segment_tokens
        nxt = int(np.searchsorted(offsets, target, side="left"))
        starts.append(min(n, max(nxt, starts[-1] + 1)))
    return starts


def plan_batches(lengths: list[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Length-grouped batches (indices into ``lengths``): longest first, padded tokens bounded."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * width > batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = True
    return ids, mask


def stack_of(stream: str) -> str:
    """The backbone stack a stream's states come from: ``enc``, else the decoder (``dec``)."""
    return "enc" if stream == "enc" else "dec"


def segment_states(
    backbone: Backbone,
    layers: dict[str, list[int]],
    streams: dict[str, Stream],
    lo: int,
    hi: int,
    batch_tokens: int,
    max_batch_size: int,
) -> dict[str, dict[int, torch.Tensor]]:
    """Hidden states of examples [lo, hi) per stream and state, padding stripped, in order.

    The batches are a function of the segment's lengths alone (``plan_batches``), so any process
    that runs the same segment gets bit-identical rows (Dask workers rely on this).
    """
    enc = streams["enc"]
    d, device, compute_dtype = backbone.d_model, backbone.device, backbone.dtype
    bufs: dict[str, dict[int, torch.Tensor]] = {}
    for name, s in streams.items():
        n_tok = int(s.offsets[hi] - s.offsets[lo])
        bufs[name] = {
            n: torch.empty((n_tok, d), dtype=compute_dtype) for n in layers[stack_of(name)]
        }
    lengths = [enc.length(i) for i in range(lo, hi)]
    pad_id = backbone.tokenizer.pad_token_id or 0
    for batch in plan_batches(lengths, batch_tokens, max_batch_size):
        idx = [lo + b for b in batch]
        ids, mask = pad([enc.ids[i] for i in idx], pad_id)
        kw: dict[str, Any] = {}
        if enc.token_types is not None:
            kw["token_type_ids"] = pad([enc.token_types[i] for i in idx], 0)[0].to(device)
        dec_masks = {}
        if backbone.encoder_decoder:
            dec = {}
            for name, s in streams.items():
                if name != "enc":
                    dec[name], dec_masks[name] = pad([s.ids[i] for i in idx], pad_id)
                    dec[name] = dec[name].to(device)
            kw["decoder_inputs"] = dec
        states = backbone.states(ids.to(device), mask.to(device), layers=layers["enc"], **kw)
        for name, s in streams.items():
            m = mask if name == "enc" else dec_masks[name]
            dest = torch.cat([torch.arange(s.offsets[i], s.offsets[i + 1]) for i in idx]) - int(
                s.offsets[lo]
            )
            for n, buf in bufs[name].items():
                h = states[name][n]
                buf[dest] = h[m.to(h.device)].to("cpu", non_blocking=False)
    return bufs


# --- the key -------------------------------------------------------------------------------------


def key_inputs(
    cfg: Config, backbone: Backbone, data: TaskData, compute_dtype: torch.dtype
) -> dict[str, Any]:
    """Everything that changes the stored activations (and the derived side_init)."""
    return {
        "backbone": {
            "name": cfg.backbone.name,
            "revision": backbone.revision,
            "weights": backbone.weights_digest,
            "tokenizer": backbone.tokenizer_digest,
        },
        "task": {
            "name": data.spec.name,
            "labels": list(data.spec.labels) if data.spec.labels else None,
            "splits": {s: data.fingerprint(s) for s in data.splits},
        },
        "max_length": cfg.backbone.max_length,
        "template": f"{'t5-prefix' if backbone.encoder_decoder else 'pair'}-v{TEMPLATE_VERSION}",
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "dtype": cfg.cache.dtype,
        "codec": cfg.cache.codec,
        "layers": cfg.extract.layers,
        "side_init": {
            "reduction_factors": sorted(set(cfg.extract.reduction_factors)),
            "methods": sorted(set(cfg.extract.side_init)),
            "fisher_samples": cfg.extract.fisher_samples,
            "seed": cfg.extract.seed,
        },
    }


def stored_layers(cfg: Config, config: Any) -> dict[str, list[int]]:
    """State numbers to store per stack; checks ``extract.layers`` against the backbone config."""
    out = {}
    n_enc, n_dec = num_blocks(config)
    for stack, n in (("enc", n_enc), ("dec", n_dec)):
        if stack == "dec" and family_of(config) != "t5":
            continue
        layers = (
            list(range(n + 1)) if cfg.extract.layers is None else sorted(set(cfg.extract.layers))
        )
        bad = [i for i in layers if not 0 <= i <= n]
        if bad:
            raise PipelineError(
                f"layer index {bad[0]} is out of range for {cfg.backbone.name} "
                f"({'decoder' if stack == 'dec' else 'encoder'}): allowed 0 (embeddings) .. {n}"
            )
        out[stack] = layers
    return out


# --- extraction ----------------------------------------------------------------------------------


@dataclass
class ExtractResult:
    key: str
    root: str
    reused: bool  # True when the cache already existed and no work was done
    manifest: dict[str, Any]


def committed_manifest(store: Any, key: str) -> dict[str, Any] | None:
    meta = st.get_json(store, key_meta(key))
    return meta


class Extractor:
    """Extraction of one task with one backbone into one cache key."""

    def __init__(
        self, cfg: Config, backbone: Backbone, data: TaskData, progress: bool = True
    ) -> None:
        self.cfg, self.backbone, self.data, self.show_progress = cfg, backbone, data, progress
        self.device = backbone.device
        self.layers = stored_layers(cfg, backbone.config)
        self.d = d_model(backbone.config)
        self.dtype = cfg.cache.dtype
        self.chunk_rows = rows_per_chunk(self.d, self.dtype, cfg.cache.chunk_mb)
        self.shard_rows = self.chunk_rows * cfg.cache.shard_chunks
        self.compute_dtype = backbone.dtype
        self.key = cache_key(key_inputs(cfg, backbone, data, self.compute_dtype))
        self.timings: dict[str, float] = {}

    def run(self) -> ExtractResult:
        root = self.cfg.cache_root
        store = st.open_root(root, self.cfg.cache.storage_options, write=True)
        existing = committed_manifest(store, self.key)
        if existing is not None:
            check_compatible(existing, self.key)
            return ExtractResult(self.key, root, True, existing)
        t0 = time.perf_counter()
        writer = CacheWriter.begin(store, root, self.key)
        try:
            streams = {
                split: tokenize_split(self.backbone, self.data, split, self.cfg.backbone.max_length)
                for split in self.data.splits
            }
            self.timings["tokenize_s"] = time.perf_counter() - t0
            self._extract_all(writer, streams)
            t1 = time.perf_counter()
            side_init = self._side_init(writer, streams["train"])
            self.timings["side_init_s"] = time.perf_counter() - t1  # fisher_s is part of it
            frozen = self.backbone.frozen_tensors()
            for name, t in frozen.items():
                writer.create_array(
                    f"frozen/{name}", tuple(t.shape), "float32", chunk_rows=4096, data=t.numpy()
                )
            self.timings["total_s"] = time.perf_counter() - t0
            manifest = self._manifest(streams, side_init, list(frozen))
            won = writer.commit(manifest)
        except BaseException as e:
            writer.release()
            raise_write_error(e, root, self.key)
            raise
        if not won:  # another writer committed the same key first: use theirs
            return ExtractResult(self.key, root, True, committed_manifest(store, self.key) or {})
        return ExtractResult(self.key, root, False, manifest)

    # --- per split ---------------------------------------------------------------------------

    def _stack(self, stream: str) -> str:
        return stack_of(stream)

    def _create_split(self, writer: CacheWriter, split: str, streams: dict[str, Stream]) -> None:
        labels = np.asarray([ex.label for ex in self.data.splits[split]])
        labels = labels.astype(np.float32 if self.data.spec.is_regression else np.int64)
        writer.create_array(
            f"{split}/labels", labels.shape, labels.dtype, chunk_rows=1 << 20, data=labels
        )
        for name, s in streams.items():
            meta = meta_prefix(split, name)
            writer.create_array(
                f"{meta}/offsets", s.offsets.shape, "int64", chunk_rows=1 << 20, data=s.offsets
            )
            flat = np.fromiter((t for x in s.ids for t in x), dtype=np.int32, count=s.n_tokens)
            writer.create_array(
                f"{meta}/input_ids", flat.shape, "int32", chunk_rows=1 << 20, data=flat
            )
            if s.token_types is not None:  # BERT pairs: what online LST and predict feed back
                tt = np.fromiter((t for x in s.token_types for t in x), np.int8, count=s.n_tokens)
                writer.create_array(
                    f"{meta}/token_type_ids", tt.shape, "int8", chunk_rows=1 << 20, data=tt
                )
            if s.targets is not None:
                tgt = np.fromiter(
                    (t for x in s.targets for t in x), dtype=np.int32, count=s.n_tokens
                )
                writer.create_array(
                    f"{meta}/target_ids", tgt.shape, "int32", chunk_rows=1 << 20, data=tgt
                )
            for n in self.layers[self._stack(name)]:
                kw = dict(
                    chunk_rows=self.chunk_rows,
                    shard_rows=self.shard_rows,
                    codec=self.cfg.cache.codec,
                )
                attrs = {"dtype": self.dtype, "state": n}
                writer.create_array(
                    f"{stream_prefix(split, name)}/{layer_name(n)}",
                    (s.n_tokens, self.d),
                    stored_numpy_dtype(self.dtype),
                    attrs=attrs,
                    **kw,
                )
                if self.dtype == "int8":
                    writer.create_array(
                        f"{stream_prefix(split, name)}/{layer_name(n)}_scale",
                        (s.n_tokens,),
                        "float32",
                        **kw,
                    )
        writer.save_progress(split, {"created": True, "flushed": {k: 0 for k in streams}})

    def _plan_work(
        self, writer: CacheWriter, all_streams: dict[str, dict[str, Stream]]
    ) -> tuple[list[tuple[str, dict[str, Stream], list[int], int, dict[str, int]]], int]:
        """Per split (created if new): its segments, the first one not yet flushed, and the
        flushed token counts; and the tokens still to extract."""
        work = []
        for split, streams in all_streams.items():
            prog = writer.progress(split)
            if prog is None or not prog.get("created"):
                self._create_split(writer, split, streams)
                prog = writer.progress(split)
            segments = plan_segments(streams["enc"].offsets, self.shard_rows)
            first = self._resume_segment(segments, streams, prog["flushed"])
            work.append((split, streams, segments, first, dict(prog["flushed"])))
        remaining = sum(
            int(s["enc"].n_tokens - s["enc"].offsets[seg[first]])
            for _, s, seg, first, _ in work
            if first < len(seg) - 1
        )
        return work, remaining

    def _extract_all(self, writer: CacheWriter, all_streams: dict[str, dict[str, Stream]]) -> None:
        work, total = self._plan_work(writer, all_streams)
        bar = tqdm(
            total=total,
            unit="tok",
            unit_scale=True,
            desc=f"extract {self.key}",
            disable=not self.show_progress,
        )
        bg = BackgroundWriter()
        t0, n_ex = time.perf_counter(), 0
        try:
            for split, streams, segments, first, flushed in work:
                writers = self._stream_writers(writer, split, streams, segments[first], flushed)
                for k in range(first, len(segments) - 1):
                    lo, hi = segments[k], segments[k + 1]
                    rows = self._run_segment(streams, lo, hi)
                    bg.submit(self._write_job(writer, split, writers, rows))
                    n_ex += hi - lo
                    bar.update(int(streams["enc"].offsets[hi] - streams["enc"].offsets[lo]))
                    bar.set_postfix(split=split, ex_s=f"{n_ex / (time.perf_counter() - t0):.0f}")
            bg.close()
        finally:
            bar.close()
        self.timings["extract_s"] = time.perf_counter() - t0

    @staticmethod
    def _resume_segment(
        segments: list[int], streams: dict[str, Stream], flushed: dict[str, int]
    ) -> int:
        """The first segment holding an example with rows not yet on disk in some stream."""
        first = len(segments) - 1
        for name, s in streams.items():
            pos = flushed.get(name, 0)
            if pos < s.n_tokens:
                example = int(np.searchsorted(s.offsets, pos, side="right")) - 1
                first = min(first, bisect.bisect_right(segments, example) - 1)
        return first

    def _stream_writers(
        self,
        writer: CacheWriter,
        split: str,
        streams: dict[str, Stream],
        start_example: int,
        flushed: dict[str, int],
    ) -> dict[str, StreamWriter]:
        out = {}
        for name, s in streams.items():
            names = [layer_name(n) for n in self.layers[self._stack(name)]]
            if self.dtype == "int8":
                names += [f"{n}_scale" for n in names]
            arrays = {n: writer.group[f"{stream_prefix(split, name)}/{n}"] for n in names}
            pos = (
                int(s.offsets[start_example]) if start_example < len(s.offsets) - 1 else s.n_tokens
            )
            out[name] = StreamWriter(arrays, s.n_tokens, self.shard_rows, pos, flushed.get(name, 0))
        return out

    def _write_job(
        self,
        writer: CacheWriter,
        split: str,
        writers: dict[str, StreamWriter],
        rows: dict[str, dict[int, torch.Tensor]],
    ) -> Callable[[], None]:
        def job() -> None:
            for name, layers in rows.items():
                packed: dict[str, np.ndarray] = {}
                for n, x in layers.items():
                    codes, scale = encode(x, self.dtype)
                    packed[layer_name(n)] = codes
                    if scale is not None:
                        packed[f"{layer_name(n)}_scale"] = scale
                writers[name].append(packed)
            writer.save_progress(
                split, {"created": True, "flushed": {k: w.flushed for k, w in writers.items()}}
            )

        return job

    def _run_segment(
        self, streams: dict[str, Stream], lo: int, hi: int
    ) -> dict[str, dict[int, torch.Tensor]]:
        """Hidden states of examples [lo, hi) per stream and state, padding stripped, in order."""
        return segment_states(
            self.backbone,
            self.layers,
            streams,
            lo,
            hi,
            self.cfg.extract.batch_tokens,
            self.cfg.extract.max_batch_size,
        )

    # --- side_init and manifest -----------------------------------------------------------------

    def _side_init(self, writer: CacheWriter, train: Stream) -> dict[str, list[str]]:
        from stages.side_init import write_side_init

        return write_side_init(
            self.cfg, self.backbone, self.data, train, writer, timings=self.timings
        )

    def _manifest(
        self,
        streams: dict[str, dict[str, Stream]],
        side_init: dict[str, list[str]],
        frozen: list[str],
    ) -> dict[str, Any]:
        spec = self.data.spec
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "key_inputs": key_inputs(self.cfg, self.backbone, self.data, self.compute_dtype),
            "backbone": {
                "name": self.cfg.backbone.name,
                "family": self.backbone.family,
                "model_type": self.backbone.config.model_type,
                "config": self.backbone.config.to_dict(),
                "d_model": self.d,
                "n_layers": self.backbone.n_layers,
                "n_dec_layers": self.backbone.n_dec_layers,
                "pad_token_id": self.backbone.tokenizer.pad_token_id,
            },
            "task": {
                "name": spec.name,
                "labels": list(spec.labels) if spec.labels else None,
                "metric": spec.metric,
                "text_fields": list(spec.text_fields),
                "source": self.data.source,
                "candidates": t5_candidates(spec) if self.backbone.encoder_decoder else None,
            },
            "layers_stored": self.layers,
            "dtype": self.dtype,
            "codec": self.cfg.cache.codec,
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
            "splits": {
                split: {
                    "n_examples": len(self.data.splits[split]),
                    "streams": {name: {"n_tokens": s.n_tokens} for name, s in ss.items()},
                    "fingerprint": self.data.fingerprint(split),
                }
                for split, ss in streams.items()
            },
            "side_init": side_init,
            "frozen": frozen,
            "versions": library_versions(),
            **provenance(),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "status": "complete",
        }


def extract(
    cfg: Config,
    *,
    backbone: Backbone | None = None,
    data: TaskData | None = None,
    progress: bool = True,
    cluster: Cluster | None = None,
) -> ExtractResult:
    """Run stage one for ``cfg``; ``backbone``/``data`` may be given (tests build tiny ones).

    With a ``cluster`` (``stages.distributed.Cluster``: ``--workers N`` or ``--scheduler``), the
    segments run on Dask workers that load the backbone by name; the result is bit-identical.
    """
    from ladder.backbones import load_backbone
    from pipeline.tasks import CustomTask, load_task

    if data is None:
        custom = None
        if cfg.task.name == "custom":
            custom = CustomTask(
                files=cfg.task.files,
                text_columns=tuple(cfg.task.text_columns),
                label_column=cfg.task.label_column,
                problem=cfg.task.problem,
                metric=cfg.task.metric,
            )
        data = load_task(
            cfg.task.name,
            data_dir=cfg.task.data_dir,
            custom=custom,
            split_seed=cfg.task.split_seed,
            limit=cfg.task.limit,
        )
    st.open_root(
        cfg.cache_root, cfg.cache.storage_options, write=True
    )  # fail early, before loading
    if backbone is None:
        # bad layer indices fail on the config alone, before any weights are loaded
        stored_layers(cfg, load_config_only(cfg.backbone.name, cfg.backbone.revision))
        device = pick_device(cfg.extract.device)
        dtype = pick_compute_dtype(cfg.extract.compute_dtype, cfg.cache.dtype, device)
        backbone = load_backbone(
            cfg.backbone.name, revision=cfg.backbone.revision, device=device, dtype=dtype
        )
    if cluster is None:
        return Extractor(cfg, backbone, data, progress=progress).run()
    from stages.distributed import DistributedExtractor

    return DistributedExtractor(cfg, backbone, data, cluster, progress=progress).run()
