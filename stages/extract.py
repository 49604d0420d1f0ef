"""Stage one: run the frozen backbone once over every split and write the activation cache.

    pipeline run extract --task rte --data-dir ../shared/data/glue
    pipeline run extract --task sst2 --dtype int8 --cache-root s3://team/lst

Tokenise with the task's template, plan lengths, cut each split into segments of about one shard
of tokens, group each segment's examples by length into batches (little padding), run the
backbone under ``torch.inference_mode()``, strip padding, and hand the rows to a background
writer that encodes, compresses and writes whole shards. Running it again with the same inputs
does no work and prints the existing key.

Where the segments run is a ``SegmentRunner``: in this process (``run_segments_here``), or on a
Dask cluster (``stages.extract_dask.DaskSegments``); planning, side_init and the commit are the
same either way.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from tqdm import tqdm

from cache_store import layout
from cache_store import store as st
from cache_store.errors import CacheError
from cache_store.layout import (
    FORMAT,
    FORMAT_VERSION,
    rows_per_chunk,
    stack_of,
    stored_numpy_dtype,
)
from cache_store.manifest import cache_key, check_compatible, library_versions, provenance
from cache_store.reader import damaged_message, read_commit
from cache_store.writer import BackgroundWriter, CacheWriter, StreamWriter, raise_write_error
from ladder.backbones import (
    Backbone,
    check_quantization,
    d_model,
    family_of,
    load_backbone,
    load_config_only,
    num_blocks,
    pick_compute_dtype,
    pick_device,
)
from ladder.errors import LadderError
from ladder.families import CAUSAL_FAMILIES
from ladder.side import SideConfig
from ladder.vision import VisionEncoder, load_vision_encoder
from stages.config import StageConfig
from stages.errors import StageError
from stages.images import check_vision_task, vision_key_inputs, write_images
from stages.side_init import write_side_init
from stages.tasks import (
    CAPTION_PROMPT,
    TaskData,
    load_task_of,
    t5_candidates,
    targets_table,
    targets_width,
    verbalised_labels,
)
from stages.tokens import (
    Stream,
    answer_template,
    check_generation_backbone,
    check_verbaliser,
    label_token_ids,
    pad,
    padded_batches,
    plan_segments,
    template_id,
    tokenize_split,
)


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

    The batches are a function of the segment's lengths alone (``padded_batches``), so any process
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
    pad_id = backbone.tokenizer.pad_token_id or 0
    for b in padded_batches(enc, lo, hi, batch_tokens, max_batch_size, pad_id):
        idx, ids, mask = b.index, b.ids, b.mask
        kw: dict[str, Any] = {}
        if b.token_types is not None:
            kw["token_type_ids"] = b.token_types.to(device)
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
    cfg: StageConfig,
    backbone: Backbone,
    data: TaskData,
    compute_dtype: torch.dtype,
    vision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that changes the stored activations (and the derived side_init); ``vision``:
    ``stages.images.vision_key_inputs`` when image features are stored too."""
    ident = {
        "name": cfg.backbone.name,
        "revision": backbone.revision,
        "weights": backbone.weights_digest,
        "tokenizer": backbone.tokenizer_digest,
    }
    if backbone.causal or backbone.quantization is not None:
        # recorded where it is new (decoder-only LLMs, quantised weights), so that the keys of
        # existing encoder and T5 caches stay what they were
        ident.update(family=backbone.family, quantization=backbone.quantization)
    return {
        **({"vision": vision} if vision is not None else {}),
        "backbone": ident,
        "task": {
            "name": data.spec.name,
            "labels": list(data.spec.labels) if data.spec.labels else None,
            "splits": {s: data.fingerprint(s) for s in data.splits},
            # captioning: the encoder's fixed input (recorded there only: other keys unchanged)
            **({"prompt": CAPTION_PROMPT} if data.spec.captioning else {}),
        },
        "max_length": cfg.backbone.max_length,
        "template": template_id(
            backbone, data.spec, answer_template(cfg.train_side.head, data.spec)
        ),
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


def stored_layers(cfg: StageConfig, config: Any) -> dict[str, list[int]]:
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
            raise StageError(
                f"layer index {bad[0]} is out of range for {cfg.backbone.name} "
                f"({_stack_word(config, stack)}): allowed 0 (embeddings) .. {n}"
            )
        out[stack] = layers
    return out


def _stack_word(config: Any, stack: str) -> str:
    if stack == "dec":
        return "decoder"
    return "decoder-only" if family_of(config) in CAUSAL_FAMILIES else "encoder"


def check_quantized(cfg: StageConfig, backbone: Backbone | None) -> None:
    """``backbone.quantization`` can run here, and agrees with a backbone given ready-made.

    A quantised backbone's weights are packed bitsandbytes tensors that neither pruning nor the
    Fisher pass can read, so its extraction computes no side_init (``extract.side_init: []``).
    """
    q = cfg.backbone.quantization
    if backbone is None:
        try:
            check_quantization(q, pick_device(cfg.extract.device))
        except LadderError as e:
            raise StageError(str(e)) from None
    elif (backbone.quantization or "none") != q:
        raise StageError(
            f"the backbone given was loaded with quantization {backbone.quantization or 'none'}, "
            f"but backbone.quantization is {q}; allowed: the same in both"
        )
    if q != "none" and cfg.extract.side_init:
        raise StageError(
            f"extract.side_init={list(cfg.extract.side_init)} needs the backbone's full-precision "
            f"weights, not the {q} ones; allowed: extract.side_init [] (--side-init '') with "
            "backbone.quantization, then train_side.init random"
        )


def check_side_init_factors(cfg: StageConfig, config: Any) -> None:
    """Every side_init reduction factor must suit the backbone (checked before any work)."""
    if not cfg.extract.side_init:
        return
    for r in sorted(set(cfg.extract.reduction_factors)):
        try:
            SideConfig(reduction_factor=r).validate(config)
        except LadderError as e:
            raise StageError(f"extract.reduction_factors has {r}: {e}") from None


def check_generation_task(cfg: StageConfig, data: TaskData, backbone: Backbone | None) -> None:
    """A generation task needs a decoder-only backbone (checked on its config alone, before any
    weights load) and no Fisher side_init (its loss is a classifier's); ``train_side.head: lm``
    on a classification task a decoder-only backbone and label names
    (:func:`stages.tokens.check_verbaliser`); captioning a T5 backbone and a vision encoder."""
    captioning = data.spec.captioning
    if (
        not data.spec.generation
        and not captioning
        and not answer_template(cfg.train_side.head, data.spec)
    ):
        return
    family = backbone.family if backbone is not None else None
    if family is None:
        family = family_of(load_config_only(cfg.backbone.name, cfg.backbone.revision))
    if captioning:
        check_caption_backbone(cfg, family)
        return
    if not data.spec.generation:
        check_verbaliser(cfg.train_side.head, data.spec, family, cfg.backbone.name)
        return
    check_generation_backbone(family, cfg.backbone.name)
    if "fisher" in cfg.extract.side_init:
        raise StageError(
            "--side-init fisher is not built for generation tasks (its loss is a classifier's); "
            "allowed: magnitude, or none"
        )


def check_caption_backbone(cfg: StageConfig, family: str) -> None:
    """Captioning (template ``t5-caption``) needs a T5 backbone, whose decoder states the side
    decoder reads, and a vision encoder (the image is the only input that differs)."""
    if family != "t5":
        raise StageError(
            f"captioning needs a T5 backbone (its decoder states under teacher forcing on the "
            f"caption); {cfg.backbone.name!r} is {family}; allowed: a T5 backbone (e.g. "
            "google-t5/t5-base) with --vision-encoder"
        )
    if cfg.backbone.vision is None:
        raise StageError(
            "captioning needs image features; allowed: --vision-encoder (e.g. "
            "openai/clip-vit-base-patch32) with a T5 backbone"
        )


# --- extraction ----------------------------------------------------------------------------------


@dataclass
class ExtractResult:
    key: str
    root: str
    reused: bool  # True when the cache already existed and no work was done
    manifest: dict[str, Any]


def committed_manifest(store: Any, key: str, root: str) -> dict[str, Any] | None:
    """The key's committed manifest, None when nothing is committed; a damaged commit raises
    (its data is neither reused nor overwritten: ``pipeline cache rm`` first)."""
    commit = read_commit(store, key)
    if commit.status == "damaged":
        raise CacheError(damaged_message(commit, root))
    return commit.manifest


class SplitWork(NamedTuple):
    """What is left of one split: its segments, the first not yet on disk, the rows on disk."""

    split: str
    streams: dict[str, Stream]
    segments: list[int]  # example indices where segments start, and the end
    first: int  # the first segment with rows not yet on disk
    flushed: dict[str, int]  # per stream: rows [0, flushed) are on disk


class SegmentRunner(Protocol):
    """Runs the segments of ``work`` and has their rows written; returns stats for the manifest."""

    def __call__(
        self, ex: Extractor, writer: CacheWriter, work: list[SplitWork], remaining: int
    ) -> dict[str, Any]: ...


class Extractor:
    """Extraction of one task with one backbone into one cache key."""

    def __init__(
        self,
        cfg: StageConfig,
        backbone: Backbone,
        data: TaskData,
        progress: bool = True,
        runner: SegmentRunner | None = None,
        vision: VisionEncoder | None = None,
    ) -> None:
        self.cfg, self.backbone, self.data, self.show_progress = cfg, backbone, data, progress
        self.vision = vision
        self.vision_inputs = None if vision is None else vision_key_inputs(vision, data)
        self.runner: SegmentRunner = runner or run_segments_here
        self.device = backbone.device
        self.layers = stored_layers(cfg, backbone.config)
        check_side_init_factors(cfg, backbone.config)
        self.d = d_model(backbone.config)
        self.dtype = cfg.cache.dtype
        self.chunk_rows = rows_per_chunk(self.d, self.dtype, cfg.cache.chunk_mb)
        self.shard_rows = self.chunk_rows * cfg.cache.shard_chunks
        self.compute_dtype = backbone.dtype
        self.key = cache_key(self.key_inputs())
        # a verbaliser (train_side.head: lm): its label words' first tokens, checked before work
        self.answer = answer_template(cfg.train_side.head, data.spec)
        self.label_tokens = label_token_ids(backbone.tokenizer, data.spec) if self.answer else None
        if self.answer or data.spec.generation:  # a checkpoint without an LM head stops here
            backbone.frozen_tensors(lm_head=True)
        self.targets_width = targets_width(data)  # VQA score targets: their arrays' width
        self.timings: dict[str, float] = {}
        self.stats: dict[str, Any] = {}  # the runner's, recorded in the manifest when any

    def key_inputs(self) -> dict[str, Any]:
        return key_inputs(
            self.cfg, self.backbone, self.data, self.compute_dtype, self.vision_inputs
        )

    def run(self) -> ExtractResult:
        root = self.cfg.cache.resolved_root
        store = st.open_root(root, self.cfg.cache.storage_options, write=True)
        existing = committed_manifest(store, self.key, root)
        if existing is not None:
            check_compatible(existing, self.key)
            return ExtractResult(self.key, root, True, existing)
        t0 = time.perf_counter()
        writer = CacheWriter.begin(store, root, self.key)
        try:
            streams = {
                split: tokenize_split(
                    self.backbone, self.data, split, self.cfg.backbone.max_length, self.answer
                )
                for split in self.data.splits
            }
            self.timings["tokenize_s"] = time.perf_counter() - t0
            work, remaining = self.plan_work(writer, streams)
            t1 = time.perf_counter()
            self.stats = self.runner(self, writer, work, remaining)
            self.timings["extract_s"] = time.perf_counter() - t1
            images = None
            if self.vision is not None:  # once per distinct image, after the text streams
                t1 = time.perf_counter()
                images = write_images(self.cfg, writer, self.vision, self.data, self.show_progress)
                self.timings["images_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            side_init = write_side_init(
                self.cfg,
                self.backbone,
                self.data,
                streams["train"],
                writer,
                self.timings,
                progress=self.show_progress,
            )
            self.timings["side_init_s"] = time.perf_counter() - t1  # fisher_s is part of it
            frozen = self.backbone.frozen_tensors(lm_head=self.data.spec.generation or self.answer)
            for name, t in frozen.items():
                writer.create_array(
                    layout.frozen_path(name),
                    tuple(t.shape),
                    "float32",
                    chunk_rows=4096,
                    data=t.numpy(),
                )
            self.timings["total_s"] = time.perf_counter() - t0
            manifest = self._manifest(streams, side_init, list(frozen))
            if images is not None:
                manifest["images"] = images
            won = writer.commit(manifest)
        except BaseException as e:
            # cleanup must not hide the error (a dead object store fails the release too)
            with contextlib.suppress(Exception):
                writer.release()
            raise_write_error(e, root, self.key)
            raise
        if not won:  # another writer committed the same key first: use theirs
            won_by = committed_manifest(store, self.key, root) or {}
            return ExtractResult(self.key, root, True, won_by)
        return ExtractResult(self.key, root, False, manifest)

    # --- per split ---------------------------------------------------------------------------

    def state_arrays(self, split: str, stream: str) -> dict[str, str]:
        """The state arrays of one stream (int8 scales included): name -> path in the attempt."""
        return layout.state_arrays(split, stream, self.layers[stack_of(stream)], self.dtype)

    def _create_split(self, writer: CacheWriter, split: str, streams: dict[str, Stream]) -> None:
        labels = np.asarray([ex.label for ex in self.data.splits[split]])
        labels = labels.astype(np.float32 if self.data.spec.is_regression else np.int64)
        writer.create_array(
            layout.labels_path(split), labels.shape, labels.dtype, chunk_rows=1 << 20, data=labels
        )
        if self.targets_width is not None:
            classes, scores = targets_table(self.data.splits[split], self.targets_width)
            paths = layout.target_arrays(split)
            for name, x in (("classes", classes), ("scores", scores)):
                writer.create_array(paths[name], x.shape, x.dtype, chunk_rows=1 << 20, data=x)
        for name, s in streams.items():

            def flat(seqs: list[list[int]], dtype: Any, n_tokens: int = s.n_tokens) -> np.ndarray:
                return np.fromiter((t for x in seqs for t in x), dtype=dtype, count=n_tokens)

            meta_arrays = {layout.offsets_path(split, name): s.offsets}
            meta_arrays[layout.input_ids_path(split, name)] = flat(s.ids, np.int32)
            if s.token_types is not None:  # BERT pairs: what online LST and predict feed back
                meta_arrays[layout.token_type_ids_path(split)] = flat(s.token_types, np.int8)
            if s.targets is not None:
                meta_arrays[layout.target_ids_path(split, name)] = flat(s.targets, np.int32)
            for path, a in meta_arrays.items():
                writer.create_array(path, a.shape, a.dtype, chunk_rows=1 << 20, data=a)
            kw = dict(
                chunk_rows=self.chunk_rows, shard_rows=self.shard_rows, codec=self.cfg.cache.codec
            )
            for n in self.layers[stack_of(name)]:
                writer.create_array(
                    layout.state_path(split, name, n),
                    (s.n_tokens, self.d),
                    stored_numpy_dtype(self.dtype),
                    attrs={"dtype": self.dtype, "state": n},
                    **kw,
                )
                if self.dtype == "int8":
                    writer.create_array(
                        layout.scale_path(split, name, n), (s.n_tokens,), "float32", **kw
                    )
        writer.save_progress(split, {"created": True, "flushed": {k: 0 for k in streams}})

    def plan_work(
        self, writer: CacheWriter, all_streams: dict[str, dict[str, Stream]]
    ) -> tuple[list[SplitWork], int]:
        """Per split (created if new): what is left of it; and the tokens still to extract."""
        work = []
        for split, streams in all_streams.items():
            prog = writer.progress(split)
            if prog is None or not prog.get("created"):
                self._create_split(writer, split, streams)
                prog = writer.progress(split)
            segments = plan_segments(streams["enc"].offsets, self.shard_rows)
            first = resume_segment(segments, streams, prog["flushed"])
            work.append(SplitWork(split, streams, segments, first, dict(prog["flushed"])))
        remaining = sum(
            int(w.streams["enc"].n_tokens - w.streams["enc"].offsets[w.segments[w.first]])
            for w in work
            if w.first < len(w.segments) - 1
        )
        return work, remaining

    def segment_rows(
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

    def progress_bar(self, remaining: int, where: str = "") -> tqdm:
        """The extraction's progress bar over the ``remaining`` tokens, in tok/s."""
        return tqdm(
            total=remaining,
            unit="tok",
            unit_scale=True,
            desc=f"extract: backbone states of {self.data.spec.name}{where}",
            disable=not self.show_progress,
        )

    # --- the manifest ---------------------------------------------------------------------------

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
            "key_inputs": self.key_inputs(),
            "backbone": {
                "name": self.cfg.backbone.name,
                "family": self.backbone.family,
                "quantization": self.backbone.quantization,
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
                "candidates": t5_candidates(spec)
                if self.backbone.encoder_decoder and not spec.captioning
                else None,
            },
            **(
                {
                    "verbaliser": {
                        "words": verbalised_labels(spec),
                        "label_tokens": self.label_tokens,
                    }
                }
                if self.label_tokens is not None
                else {}
            ),
            "layers_stored": self.layers,
            "dtype": self.dtype,
            "codec": self.cfg.cache.codec,
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
            "splits": {
                split: {
                    "n_examples": len(self.data.splits[split]),
                    "streams": {name: stream_info(s) for name, s in ss.items()},
                    "fingerprint": self.data.fingerprint(split),
                    **({"targets": self.targets_width} if self.targets_width is not None else {}),
                }
                for split, ss in streams.items()
            },
            "side_init": side_init,
            "frozen": frozen,
            "versions": library_versions(),
            **provenance(),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            **({"distributed": self.stats} if self.stats else {}),
            "status": "complete",
        }


def resume_segment(segments: list[int], streams: dict[str, Stream], flushed: dict[str, int]) -> int:
    """The first segment holding an example with rows not yet on disk in some stream."""
    first = len(segments) - 1
    for name, s in streams.items():
        pos = flushed.get(name, 0)
        if pos < s.n_tokens:
            example = int(np.searchsorted(s.offsets, pos, side="right")) - 1
            first = min(first, bisect.bisect_right(segments, example) - 1)
    return first


def stream_info(s: Stream) -> dict[str, Any]:
    """What the manifest records of a stream (the encoder's: whether it has token type ids, so
    ``cache_store.layout.expected_arrays`` names every array)."""
    info: dict[str, Any] = {"n_tokens": s.n_tokens}
    if s.name == "enc":
        info["token_type_ids"] = s.token_types is not None
        if s.targets is not None:  # generation tasks (recorded only there: older manifests stay)
            info["target_ids"] = True
    return info


def encode_rows(layers: dict[int, torch.Tensor], dtype: str) -> dict[str, np.ndarray]:
    """One segment's states of one stream as stored arrays (int8: codes and per-token scales):
    ``cache_store.layout.encode_rows`` of the states as numpy (float16 kept, else float32; a
    bfloat16 backbone's states widen exactly)."""
    arrays = {
        n: (x if x.dtype == torch.float16 else x.float()).cpu().numpy() for n, x in layers.items()
    }
    return layout.encode_rows(arrays, dtype)


def run_segments_here(
    ex: Extractor, writer: CacheWriter, work: list[SplitWork], remaining: int
) -> dict[str, Any]:
    """The segments in this process; a background thread encodes and writes whole shards."""
    bar = ex.progress_bar(remaining)
    bg = BackgroundWriter()
    t0, n_ex = time.perf_counter(), 0
    try:
        for w in work:
            start = w.segments[w.first]
            bar.set_description(f"extract: backbone states of {ex.data.spec.name} ({w.split})")
            writers = {}
            for name, s in w.streams.items():
                arrays = {k: writer.group[p] for k, p in ex.state_arrays(w.split, name).items()}
                pos = int(s.offsets[start]) if start < len(s.offsets) - 1 else s.n_tokens
                writers[name] = StreamWriter(
                    arrays, s.n_tokens, ex.shard_rows, pos, w.flushed.get(name, 0)
                )
            for k in range(w.first, len(w.segments) - 1):
                lo, hi = w.segments[k], w.segments[k + 1]
                rows = ex.segment_rows(w.streams, lo, hi)
                bg.submit(_write_job(writer, w.split, writers, rows, ex.dtype))
                n_ex += hi - lo
                bar.update(int(w.streams["enc"].offsets[hi] - w.streams["enc"].offsets[lo]))
                bar.set_postfix(ex_s=f"{n_ex / (time.perf_counter() - t0):.0f}")
        bg.close()
    finally:
        bar.close()
    return {}


def _write_job(
    writer: CacheWriter,
    split: str,
    writers: dict[str, StreamWriter],
    rows: dict[str, dict[int, torch.Tensor]],
    dtype: str,
) -> Callable[[], None]:
    def job() -> None:
        for name, layers in rows.items():
            writers[name].append(encode_rows(layers, dtype))
        writer.save_progress(
            split, {"created": True, "flushed": {k: w.flushed for k, w in writers.items()}}
        )

    return job


def extract(
    cfg: StageConfig,
    *,
    backbone: Backbone | None = None,
    data: TaskData | None = None,
    progress: bool = True,
    runner: SegmentRunner | None = None,
    vision: VisionEncoder | None = None,
) -> ExtractResult:
    """Run stage one for ``cfg``; ``backbone``/``data``/``vision`` may be given (tests build tiny
    ones). With ``backbone.vision`` set, the vision encoder also runs once per distinct image.

    ``runner`` runs the segments elsewhere: ``stages.extract_dask.DaskSegments(cluster)`` on Dask
    workers that load the backbone by name; the cache is bit-identical.
    """
    check_quantized(cfg, backbone)  # fail early, before loading or writing anything
    if data is None:
        data = load_task_of(cfg.task)
    check_vision_task(cfg, data)
    check_generation_task(cfg, data, backbone)
    # fail early, before loading anything
    st.open_root(cfg.cache.resolved_root, cfg.cache.storage_options, write=True)
    if vision is None and cfg.backbone.vision is not None:  # a text model here fails early
        vision = load_vision_encoder(
            cfg.backbone.vision,
            device=pick_device(cfg.extract.device),
            pool=cfg.backbone.vision_pool,
        )
    elif vision is not None:  # a given encoder pools as configured (``backbone.vision_pool``)
        vision = dataclasses.replace(vision, pool=cfg.backbone.vision_pool)
    if backbone is None:
        # bad layer indices fail on the config alone, before any weights are loaded
        config = load_config_only(cfg.backbone.name, cfg.backbone.revision)
        stored_layers(cfg, config)
        check_side_init_factors(cfg, config)
        device = pick_device(cfg.extract.device)
        dtype = pick_compute_dtype(cfg.extract.compute_dtype, cfg.cache.dtype, device)
        backbone = load_backbone(
            cfg.backbone.name,
            revision=cfg.backbone.revision,
            device=device,
            dtype=dtype,
            quantization=cfg.backbone.quantization,
        )
    return Extractor(cfg, backbone, data, progress=progress, runner=runner, vision=vision).run()
