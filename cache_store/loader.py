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

import numpy as np
import torch

from cache_store.layout import decode_numpy, layer_name, meta_prefix, stored_numpy_dtype
from cache_store.registry import CommittedCache
from pipeline.errors import PipelineError


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
        )


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
    ) -> None:
        m = cache.manifest
        if split not in m["splits"]:
            raise PipelineError(
                f"cache {cache.key} has no split {split!r}; it has {', '.join(m['splits'])}"
            )
        for stream, states in layers.items():
            if stream not in m["splits"][split]["streams"]:
                raise PipelineError(
                    f"cache {cache.key} has no stream {stream!r} in split {split!r}"
                )
            stack = "enc" if stream == "enc" else "dec"
            missing = sorted(set(states) - set(m["layers_stored"][stack]))
            if missing:
                raise PipelineError(
                    f"cache {cache.key} lacks layer state {missing[0]} ({stack}) that the side network "
                    f"keeps; it stores {m['layers_stored'][stack]}: re-extract with those layers"
                )
        self.cache, self.split, self.layers = cache, split, layers
        # False: batches carry ids and masks only (online LST computes the states), in the order
        # that reading them would give
        self.read_states = read_states
        self.dtype = m["dtype"]
        self.d = m["backbone"]["d_model"]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.bucket_batches, self.prefetch = bucket_batches, prefetch
        self.offsets = {
            s: np.asarray(cache.array(f"{meta_prefix(split, s)}/offsets")[:]) for s in layers
        }
        self.labels = np.asarray(cache.array(f"{split}/labels")[:])
        self.has_types = f"{split}/token_type_ids" in cache.group
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
            meta = meta_prefix(self.split, stream)
            reads[(stream, "ids")] = f"{meta}/input_ids"
            if stream == "enc" and self.has_types:
                reads[(stream, "types")] = f"{meta}/token_type_ids"
            if stream != "enc":
                reads[(stream, "targets")] = f"{meta}/target_ids"
            for n in states if self.read_states else []:
                path = f"{self.split}/{stream}/{layer_name(n)}"
                reads[(stream, n)] = path
                if self.dtype == "int8":
                    reads[(stream, f"{n}_scale")] = path + "_scale"

        def read(item: tuple[tuple[str, object], str]) -> np.ndarray:
            (stream, _), path = item
            t0, t1 = spans[stream]
            return np.asarray(self.cache.array(path)[t0:t1])

        got = dict(zip(reads, _READS.map(read, reads.items()), strict=True))
        offsets, rows, ids, targets = {}, {}, {}, {}
        for stream, states in self.layers.items():
            off = self.offsets[stream]
            offsets[stream] = off[lo : hi + 1] - off[lo]
            ids[stream] = got[(stream, "ids")]
            if stream != "enc":
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

    # --- batching --------------------------------------------------------------------------------

    def _batch(self, blocks: list[_Block], picks: list[tuple[int, int]]) -> Batch:
        """Pad the examples ``picks`` = [(block position, example within block)] into a batch."""
        B = len(picks)
        index = torch.tensor([blocks[p].lo + i for p, i in picks])
        states, masks, input_ids, target_ids = {}, {}, {}, {}
        token_types = None
        for stream in self.layers:
            lens = [
                int(blocks[p].offsets[stream][i + 1] - blocks[p].offsets[stream][i])
                for p, i in picks
            ]
            T = max(lens)
            mask = torch.zeros(B, T, dtype=torch.bool)
            for b, n in enumerate(lens):
                mask[b, :n] = True
            masks[stream] = mask
            dest = mask.view(-1).nonzero().squeeze(1)
            dest_np = dest.numpy()
            # rows of each pick, in batch order, as slices of its block's arrays
            spans = [
                (p, int(blocks[p].offsets[stream][i]), int(blocks[p].offsets[stream][i + 1]))
                for p, i in picks
            ]
            ids = torch.zeros(B * T, dtype=torch.long)
            ids[dest] = torch.from_numpy(
                np.concatenate([blocks[p].ids[stream][a:z] for p, a, z in spans]).astype(np.int64)
            )
            input_ids[stream] = ids.view(B, T)
            if stream == "enc" and self.has_types:
                tt = np.zeros(B * T, dtype=np.int64)
                tt[dest_np] = np.concatenate([blocks[p].types[a:z] for p, a, z in spans])
                token_types = torch.from_numpy(tt).view(B, T)
            if stream != "enc":
                tgt = torch.full((B * T,), -100, dtype=torch.long)
                tgt[dest] = torch.from_numpy(
                    np.concatenate([blocks[p].targets[stream][a:z] for p, a, z in spans]).astype(
                        np.int64
                    )
                )
                target_ids[stream] = tgt.view(B, T)
            states[stream] = {}
            for n in self.layers[stream] if self.read_states else []:
                codes = np.concatenate([blocks[p].rows[stream][n][0][a:z] for p, a, z in spans])
                scale = None
                if self.dtype == "int8":
                    scale = np.concatenate([blocks[p].rows[stream][n][1][a:z] for p, a, z in spans])
                states[stream][n] = self._padded(codes, scale, dest_np, B, T)
        labels = torch.from_numpy(self.labels[index.numpy()])
        return Batch(index, labels, states, masks, input_ids, target_ids, token_types)

    def _padded(
        self, codes: np.ndarray, scale: np.ndarray | None, dest: np.ndarray, B: int, T: int
    ) -> torch.Tensor:
        """Rows at ``dest`` of a zero [B, T, d] tensor: float16 and bfloat16 as stored (the side
        network widens one state at a time), int8 and float32 decoded to float32."""
        if self.dtype in ("float16", "bfloat16"):
            out = np.zeros((B * T, self.d), dtype=codes.dtype)
            out[dest] = codes
            t = torch.from_numpy(out)
            return (t.view(torch.bfloat16) if self.dtype == "bfloat16" else t).view(B, T, self.d)
        out = np.zeros((B * T, self.d), dtype=np.float32)
        out[dest] = decode_numpy(codes, scale, self.dtype)
        return torch.from_numpy(out).view(B, T, self.d)

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

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
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

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
