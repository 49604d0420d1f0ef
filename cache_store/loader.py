"""Reading a cache for training: whole blocks, a shuffle buffer, length buckets, prefetch.

Random per-example reads are what makes activation caches slow (DESIGN.md): this loader reads
blocks of consecutive examples (about ``block_tokens`` tokens, i.e. whole chunks) of only the
states a side network needs, shuffles block order and then the examples inside a buffer of
blocks, forms length-bucketed batches (little padding), and builds them on a background thread,
so the training step does not wait on I/O. Splits that fit in ``memory_budget`` bytes are read
once and kept (every epoch then shuffles all examples); larger ones stream through a buffer of at
most ``buffer_blocks`` blocks that fits the budget, with blocks of one to four chunks. The order
depends only on the seed, the epoch and the budget.

Threads, not ``DataLoader`` worker processes: zarr 3 under ``fork`` can deadlock once the parent
has used its event loop.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cache_store import layout
from cache_store import store as st
from cache_store.errors import CacheError
from cache_store.layout import decode_numpy, stored_numpy_dtype
from cache_store.reader import CommittedCache, grid_of

if TYPE_CHECKING:
    from cache_store.images import ImageTable


def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim``: batches built on one thread and freed on another leave the
    allocator holding freed pages (RSS grew by 0.5 GB over 80 CoLA batches here); giving them
    back every 16 batches costs a few milliseconds at most. A no-op where glibc is absent."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda *_: None


_TRIM = _malloc_trim()


def bucketed_batches(
    lengths: list[int], batch_size: int, bucket_batches: int, rng: np.random.Generator | None
) -> list[list[int]]:
    """Batches of positions into ``lengths`` with little padding: the loader's batch plan.

    With ``rng`` (training): shuffle the positions, sort each group of ``bucket_batches``
    batches by length, cut the groups into batches of ``batch_size``, shuffle the batches.
    Without (evaluation): sort every position by length and cut. Ties keep their order, so the
    same lengths and the same ``rng`` state give the same batches.
    """
    n = len(lengths)
    if rng is None:
        ordered = sorted(range(n), key=lengths.__getitem__)
        return [ordered[k : k + batch_size] for k in range(0, n, batch_size)]
    order = [int(i) for i in rng.permutation(n)]
    group = batch_size * bucket_batches
    batches: list[list[int]] = []
    for g in range(0, n, group):
        bucket = sorted(order[g : g + group], key=lengths.__getitem__)
        batches += [bucket[k : k + batch_size] for k in range(0, len(bucket), batch_size)]
    return [batches[int(i)] for i in rng.permutation(len(batches))]


# the reads of one block's arrays overlap: object stores answer in parallel, codecs decode in C
_READS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cache-read")


@dataclass
class NumpyBatch:
    """One padded batch, numpy only (``stages.batches.to_torch`` makes torch tensors of it,
    without copies). ``states[stream][n]`` is [B, T_stream, d]: float16 as cached, bfloat16 as
    its bits in uint16 (``state_dtype`` says so), else float32."""

    index: np.ndarray  # [B] int64 example indices in the split
    labels: np.ndarray  # [B] class ids (int64) or scores (float32)
    states: dict[str, dict[int, np.ndarray]]
    masks: dict[str, np.ndarray]  # [B, T_stream] bool
    input_ids: dict[
        str, np.ndarray
    ]  # [B, T_stream] int64 (pad 0): what online LST feeds a backbone
    target_ids: dict[str, np.ndarray] = field(default_factory=dict)  # decoder streams, pad -100
    token_type_ids: np.ndarray | None = None  # [B, T_enc] int64, BERT pairs
    state_dtype: str = "float32"  # the dtype of ``states``: float32, float16 or bfloat16 (bits)
    visual: np.ndarray | None = None  # [B, n_tokens, d_v] image features (``images=``)


@dataclass
class _Block:
    """Examples [lo, hi) of a split: per stream their offsets and the stored rows."""

    lo: int
    hi: int
    offsets: dict[str, np.ndarray]  # relative token offsets, [hi - lo + 1]
    rows: dict[str, dict[int, tuple[np.ndarray, np.ndarray | None]]]  # codes, int8 scale
    ids: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    types: np.ndarray | None = None  # encoder token type ids


def _padded_ids(
    arrays: list[np.ndarray],
    spans: list[tuple[int, int, int]],
    dest: np.ndarray,
    B: int,
    T: int,
    fill: int,
) -> np.ndarray:
    """[B, T] int64 of the rows ``spans`` = [(block, start, end)] of ``arrays`` at ``dest``."""
    out = np.full(B * T, fill, dtype=np.int64)
    out[dest] = np.concatenate([arrays[p][a:z] for p, a, z in spans])
    return out.reshape(B, T)


class CacheLoader:
    """Batches of one split of a committed cache, for the states in ``layers``.

    ``layers`` maps a stream (``enc``, ``dec``, ``cand_K``) to the state numbers to read.
    """

    def __init__(
        self,
        cache: CommittedCache,
        split: str,
        layers: dict[str, list[int]],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        block_tokens: int | None = None,
        buffer_blocks: int = 16,
        bucket_batches: int = 50,
        prefetch: int = 2,
        memory_budget: int = 4 << 30,
        read_states: bool = True,
        images: ImageTable | None = None,
        widen: bool = False,
    ) -> None:
        m = cache.manifest
        if split not in m["splits"]:
            raise CacheError(
                f"cache {cache.key} has no split {split!r}; it has {', '.join(m['splits'])}"
            )
        for stream, states in layers.items():
            if stream not in m["splits"][split]["streams"]:
                raise CacheError(f"cache {cache.key} has no stream {stream!r} in split {split!r}")
            stack = layout.stack_of(stream)
            missing = sorted(set(states) - set(m["layers_stored"][stack]))
            if missing:
                raise CacheError(
                    f"cache {cache.key} lacks layer state {missing[0]} ({stack}) that the side network "
                    f"keeps; it stores {m['layers_stored'][stack]}: re-extract with those layers"
                )
        self.cache, self.split, self.layers = cache, split, layers
        # False: batches carry ids and masks only (online LST computes the states), in the order
        # that reading them would give
        self.read_states = read_states
        self.images = images  # each batch gathers its examples' image features from it
        # float16/bfloat16 states widened to float32 here, on the loader's thread, once per batch:
        # a training step on CPU would otherwise widen each state twice (forward and the weight
        # gradient) for every network that reads it, on the step's own core
        self.widen = widen
        self.dtype = m["dtype"]
        self.d = m["backbone"]["d_model"]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.bucket_batches, self.prefetch = bucket_batches, prefetch
        self.offsets = {
            s: np.asarray(cache.array(layout.offsets_path(split, s))[:]) for s in layers
        }
        self.labels = np.asarray(cache.array(layout.labels_path(split))[:])
        self.has_types = layout.token_type_ids_path(split) in cache.group
        # generation tasks: the encoder stream has targets too (the answer tokens)
        self.has_enc_targets = layout.target_ids_path(split, "enc") in cache.group
        self.n = len(self.labels)
        chunk = m["chunk_rows"]
        self._itemsize = stored_numpy_dtype(self.dtype).itemsize
        total = sum(
            int(self.offsets[s][-1]) * len(states) * self.d * self._itemsize
            for s, states in self.layers.items()
        )
        fits = total <= memory_budget
        if block_tokens is None:  # whole chunks; smaller blocks when the budget is tight
            per_block = memory_budget // max(1, self._token_bytes() * buffer_blocks)
            block_tokens = chunk * int(np.clip(per_block // chunk, 1, 4))
        self.block_tokens = block_tokens
        self.blocks = self._plan_blocks(self.offsets["enc"])
        if fits:  # read once and kept: every epoch shuffles all examples
            self.buffer_blocks = len(self.blocks)
        else:  # stream through a shuffle buffer of as many blocks as the budget holds
            budget_blocks = memory_budget // max(1, self._token_bytes() * self.block_tokens)
            self.buffer_blocks = int(np.clip(budget_blocks, 2, max(2, buffer_blocks)))
        self._kept: dict[int, _Block] | None = {} if fits else None

    def _token_bytes(self) -> int:
        """Stored bytes of one (encoder) token across every state this loader reads."""
        return sum(len(states) for states in self.layers.values()) * self.d * self._itemsize

    def _plan_blocks(self, offsets: np.ndarray) -> list[tuple[int, int]]:
        blocks, lo = [], 0
        while lo < self.n:
            hi = int(np.searchsorted(offsets, offsets[lo] + self.block_tokens, side="left"))
            hi = min(self.n, max(hi, lo + 1))
            blocks.append((lo, hi))
            lo = hi
        return blocks

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    # --- reading ---------------------------------------------------------------------------------

    def _read_block(self, b: int) -> _Block:
        if self._kept is not None and b in self._kept:
            return self._kept[b]
        lo, hi = self.blocks[b]
        spans, reads = {}, {}  # every array of the block, read concurrently (one request each)
        for stream, states in self.layers.items():
            off = self.offsets[stream]
            t0, t1 = int(off[lo]), int(off[hi])
            spans[stream] = (t0, t1)
            reads[(stream, "ids")] = layout.input_ids_path(self.split, stream)
            if stream == "enc" and self.has_types:
                reads[(stream, "types")] = layout.token_type_ids_path(self.split)
            if stream != "enc" or self.has_enc_targets:
                reads[(stream, "targets")] = layout.target_ids_path(self.split, stream)
            for n in states if self.read_states else []:
                reads[(stream, n)] = layout.state_path(self.split, stream, n)
                if self.dtype == "int8":
                    reads[(stream, f"{n}_scale")] = layout.scale_path(self.split, stream, n)

        def read(item: tuple[tuple[str, object], str]) -> np.ndarray:
            (stream, _), path = item
            t0, t1 = spans[stream]
            return self._read(path, t0, t1)

        got = dict(zip(reads, _READS.map(read, reads.items()), strict=True))
        offsets, rows, ids, targets = {}, {}, {}, {}
        for stream, states in self.layers.items():
            off = self.offsets[stream]
            offsets[stream] = off[lo : hi + 1] - off[lo]
            ids[stream] = got[(stream, "ids")]
            if (stream, "targets") in got:
                targets[stream] = got[(stream, "targets")]
            rows[stream] = {
                n: (got[(stream, n)], got.get((stream, f"{n}_scale")))
                for n in states
                if self.read_states
            }
        types = got.get(("enc", "types"))
        block = _Block(lo, hi, offsets, rows, ids, targets, types)
        if self._kept is not None:
            self._kept[b] = block
        return block

    def _read(self, path: str, t0: int, t1: int) -> np.ndarray:
        """Rows [t0, t1) of an array; a chunk that fails to decode (crc32c) is one line."""
        arr = self.cache.array(path)
        try:
            return np.asarray(arr[t0:t1])
        except Exception as e:  # noqa: BLE001 - named below, chunk by chunk
            raise CacheError(self._read_failure(arr, path, t0, t1, e)) from None

    def _read_failure(self, arr: Any, path: str, t0: int, t1: int, error: BaseException) -> str:
        c = self.cache
        rows = grid_of(arr)[0]
        where = f"rows {t0}:{t1}"
        for i in range(t0 // rows, -(-t1 // rows)):  # the first object that fails on its own
            try:
                arr[i * rows : min((i + 1) * rows, arr.shape[0])]
            except Exception as e:  # noqa: BLE001
                where, error = f"chunk {layout.chunk_key(path, (i,) + (0,) * (arr.ndim - 1))}", e
                break
        detail = st.describe(error)
        return (
            f"cache {c.key} under {c.root}: {where} of array {path} cannot be read ({detail}); "
            f"`pipeline cache verify {c.key}` lists every bad chunk, `pipeline cache rm {c.key}` "
            "then a new extract (or pull) replaces the cache"
        )

    # --- batching --------------------------------------------------------------------------------

    def _batch(self, blocks: list[_Block], picks: list[tuple[int, int]]) -> NumpyBatch:
        """Pad the examples ``picks`` = [(block position, example within block)] into a batch."""
        B = len(picks)
        index = np.array([blocks[p].lo + i for p, i in picks], dtype=np.int64)
        states, masks, input_ids, target_ids = {}, {}, {}, {}
        token_types = None
        for stream in self.layers:
            lens = np.array(
                [
                    int(blocks[p].offsets[stream][i + 1] - blocks[p].offsets[stream][i])
                    for p, i in picks
                ]
            )
            T = int(lens.max())
            mask = np.arange(T)[None, :] < lens[:, None]
            masks[stream] = mask
            dest = np.flatnonzero(mask)
            # rows of each pick, in batch order, as slices of its block's arrays
            spans = [
                (p, int(blocks[p].offsets[stream][i]), int(blocks[p].offsets[stream][i + 1]))
                for p, i in picks
            ]

            def gather(arrays: list[np.ndarray], fill: int) -> np.ndarray:
                return _padded_ids(arrays, spans, dest, B, T, fill)  # noqa: B023 - used at once

            input_ids[stream] = gather([blk.ids[stream] for blk in blocks], 0)
            if stream == "enc" and self.has_types:
                token_types = gather([blk.types for blk in blocks], 0)
            if stream != "enc" or self.has_enc_targets:
                target_ids[stream] = gather([blk.targets[stream] for blk in blocks], -100)
            states[stream] = {}
            for n in self.layers[stream] if self.read_states else []:
                codes = np.concatenate([blocks[p].rows[stream][n][0][a:z] for p, a, z in spans])
                scale = None
                if self.dtype == "int8":
                    scale = np.concatenate([blocks[p].rows[stream][n][1][a:z] for p, a, z in spans])
                states[stream][n] = self._padded(codes, scale, dest, B, T)
        labels = self.labels[index]
        narrow = self.dtype in ("float16", "bfloat16") and not self.widen
        state_dtype = self.dtype if narrow else "float32"
        visual = None if self.images is None else self.images.gather(self.split, index)
        return NumpyBatch(
            index, labels, states, masks, input_ids, target_ids, token_types, state_dtype, visual
        )

    def _padded(
        self, codes: np.ndarray, scale: np.ndarray | None, dest: np.ndarray, B: int, T: int
    ) -> np.ndarray:
        """Rows at ``dest`` of a zero [B, T, d] array: float16 and bfloat16 (uint16 bits) as
        stored (the side network widens one state at a time) unless ``widen``, int8 and float32
        decoded to float32."""
        if self.dtype == "bfloat16" and self.widen:  # a bfloat16 is a float32's high half
            out = np.zeros((B * T, self.d), dtype=np.uint32)
            out[dest] = codes.astype(np.uint32) << 16
            return out.view(np.float32).reshape(B, T, self.d)
        if self.dtype in ("float16", "bfloat16"):
            out = np.zeros((B * T, self.d), dtype=np.float32 if self.widen else codes.dtype)
            out[dest] = codes
            return out.reshape(B, T, self.d)
        out = np.zeros((B * T, self.d), dtype=np.float32)
        out[dest] = decode_numpy(codes, scale, self.dtype)
        return out.reshape(B, T, self.d)

    def _plan_epoch(self, epoch: int) -> Iterator[tuple[list[int], list[list[tuple[int, int]]]]]:
        """(blocks of a buffer, batches as picks) in this epoch's order."""
        rng = np.random.default_rng([self.seed, epoch])
        enc = self.offsets["enc"]
        order = rng.permutation(len(self.blocks)) if self.shuffle else np.arange(len(self.blocks))
        for start in range(0, len(order), self.buffer_blocks):
            chosen = [int(b) for b in order[start : start + self.buffer_blocks]]
            picks = [
                (p, i)
                for p, b in enumerate(chosen)
                for i in range(self.blocks[b][1] - self.blocks[b][0])
            ]
            examples = [self.blocks[chosen[p]][0] + i for p, i in picks]
            lengths = [int(enc[ex + 1] - enc[ex]) for ex in examples]
            plan = bucketed_batches(
                lengths, self.batch_size, self.bucket_batches, rng if self.shuffle else None
            )
            batches = [[picks[k] for k in batch] for batch in plan]
            yield chosen, batches

    def epoch(self, epoch: int = 0) -> Iterator[NumpyBatch]:
        """This epoch's batches, built on a background thread."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for chosen, batches in self._plan_epoch(epoch):
                    blocks = [self._read_block(b) for b in chosen]
                    for picks in batches:
                        if stop.is_set():
                            return
                        q.put(self._batch(blocks, picks))
                q.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)

        thread = threading.Thread(target=produce, name="cache-loader", daemon=True)
        thread.start()
        try:
            n = 0
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
                n += 1
                if n % 16 == 0:
                    _TRIM(0)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.01)

    def __iter__(self) -> Iterator[NumpyBatch]:
        return self.epoch(0)
