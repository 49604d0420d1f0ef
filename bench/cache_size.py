"""Cache size per storage dtype and codec, reconstruction error, and encode+write throughput.

    python -m bench.cache_size --quick --json bench/results/cache_size.json
    python -m bench.cache_size --json bench/results/cache_size_full.json

The default backbone runs once per task on a sample of training examples (quick: 100, full:
1000; RTE's long pairs and SST-2's short sentences), every state (embeddings .. last block) is
kept in float32 in memory, and each dtype x codec combination is written with the cache's own
array creation (``CacheWriter.create_array``: ``rows_per_chunk`` chunks, ``shard_chunks`` per
shard, ``compressors(codec)`` ending in crc32c), exactly as ``extract`` lays it out. Stored bytes
are the sizes of the chunk/shard files on disk (zarr metadata documents excluded; int8 includes
its per-token scale array). Ratios: float32 raw bytes / stored bytes, and the dtype's own raw
bytes (int8: codes + float32 scales) / stored bytes. Reconstruction error: relative Frobenius
error ``||decode(encode(x)) - x|| / ||x||`` over all states, and the worst single state.
Throughput: float32 megabytes per second through ``encode`` + the zarr write (arrays created
beforehand), repetitions interleaved over all combinations (rotating order), medians, and the
ratio to float32/raw measured in the same rounds.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common  # sets HF_HUB_OFFLINE before transformers is imported
from cache_store import store as st
from cache_store.layout import (
    CODECS,
    DTYPES,
    attempt_prefix,
    decode_numpy,
    encode,
    layer_name,
    rows_per_chunk,
    scale_name,
    stored_numpy_dtype,
)
from cache_store.writer import CacheWriter
from ladder.backbones import Backbone, d_model, load_backbone
from pipeline.config import Config, apply_overrides
from stages.extract import segment_states
from stages.tasks import TaskData, load_task
from stages.tokens import tokenize_split

QUICK_SAMPLES = 100
FULL_SAMPLES = 1000


def sample_states(
    backbone: Backbone, data: TaskData, n: int, seed: int, cfg: Config
) -> tuple[list[torch.Tensor], int]:
    """Float32 states [n_tokens, d] of every state number for ``n`` random training examples."""
    train = data.splits["train"]
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(train), size=min(n, len(train)), replace=False))
    sub = TaskData(data.spec, {"train": [train[i] for i in idx]}, data.source)
    enc = tokenize_split(backbone, sub, "train", cfg.backbone.max_length)["enc"]
    # stage one's own batch loop (one segment holding every sampled example)
    states = list(range(backbone.n_layers + 1))
    rows = segment_states(
        backbone,
        {"enc": states},
        {"enc": enc},
        0,
        len(enc.ids),
        cfg.extract.batch_tokens,
        cfg.extract.max_batch_size,
    )["enc"]
    return [rows[n].float() for n in states], len(idx)


def array_bytes(root: Path, path: str) -> int:
    """Bytes of an array's chunk/shard files (its zarr.json metadata excluded)."""
    folder = root / path
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json")


def recon_error(states: list[torch.Tensor], dtype: str) -> tuple[float, list[float]]:
    """Relative Frobenius error over all states, and per state."""
    num = den = 0.0
    per = []
    for x in states:
        codes, scale = encode(x.float().numpy(), dtype)
        err = float(((torch.from_numpy(decode_numpy(codes, scale, dtype)) - x) ** 2).sum())
        ref = float((x.double() ** 2).sum())
        per.append((err / ref) ** 0.5)
        num, den = num + err, den + ref
    return (num / den) ** 0.5, per


class Writer:
    """Creates one set of layer arrays per (dtype, codec, round) the way ``extract`` does."""

    def __init__(self, root: Path, cfg: Config, d: int) -> None:
        self.root, self.cfg, self.d = root, cfg, d
        store = st.open_root(str(root), write=True)
        self.cw = CacheWriter(store, str(root), "bench", "a")
        self.prefix = root / attempt_prefix("bench", "a")

    def create(self, group: str, n_tokens: int, n_states: int, dtype: str, codec: str) -> list:
        chunk_rows = rows_per_chunk(self.d, dtype, self.cfg.cache.chunk_mb)
        kw: dict[str, Any] = dict(
            chunk_rows=chunk_rows, shard_rows=chunk_rows * self.cfg.cache.shard_chunks, codec=codec
        )
        arrays = []
        for n in range(n_states):
            codes = self.cw.create_array(
                f"{group}/{layer_name(n)}", (n_tokens, self.d), stored_numpy_dtype(dtype), **kw
            )
            scale = None
            if dtype == "int8":
                scale = self.cw.create_array(
                    scale_name(f"{group}/{layer_name(n)}"), (n_tokens,), "float32", **kw
                )
            arrays.append((codes, scale))
        return arrays

    def stored_bytes(self, group: str) -> int:
        return array_bytes(self.prefix, group)

    def drop(self, group: str) -> None:
        shutil.rmtree(self.prefix / group)


def encode_write(states: list[torch.Tensor], arrays: list, dtype: str) -> None:
    for x, (codes_arr, scale_arr) in zip(states, arrays, strict=True):
        codes, scale = encode(x.float().numpy(), dtype)
        codes_arr[...] = codes
        if scale_arr is not None:
            scale_arr[...] = scale


def measure_task(
    name: str,
    states: list[torch.Tensor],
    writer: Writer,
    dtypes: list[str],
    codecs: list[str],
    reps: int,
) -> dict[str, Any]:
    n_tok, d = states[0].shape
    n_states = len(states)
    f32_bytes = n_tok * d * 4 * n_states
    combos = [(dt, c) for dt in dtypes for c in codecs]
    times: dict[tuple[str, str], list[float]] = {k: [] for k in combos}
    stored: dict[tuple[str, str], int] = {}
    for rnd in range(reps):
        shift = rnd % len(combos)
        for dt, codec in combos[shift:] + combos[:shift]:  # rotate the order each round
            group = f"{name}/{dt}-{codec}-{rnd}"
            arrays = writer.create(group, n_tok, n_states, dt, codec)
            t0 = time.perf_counter()
            encode_write(states, arrays, dt)
            times[(dt, codec)].append(time.perf_counter() - t0)
            if rnd == 0:
                stored[(dt, codec)] = writer.stored_bytes(group)
            writer.drop(group)
    errors = {dt: recon_error(states, dt) for dt in dtypes}
    base_key = ("float32", "raw") if ("float32", "raw") in times else combos[0]
    rows = []
    for dt, codec in combos:
        raw_dtype = (
            n_tok * n_states * (d * stored_numpy_dtype(dt).itemsize + (4 if dt == "int8" else 0))
        )
        t = common.median(times[(dt, codec)])
        speed_ratio = common.median(
            [b / x for b, x in zip(times[base_key], times[(dt, codec)], strict=True)]
        )
        rows.append(
            {
                "dtype": dt,
                "codec": codec,
                "stored_bytes": stored[(dt, codec)],
                "bytes_per_token_per_layer": stored[(dt, codec)] / (n_tok * n_states),
                "ratio_vs_float32_raw": f32_bytes / stored[(dt, codec)],
                "ratio_vs_dtype_raw": raw_dtype / stored[(dt, codec)],
                "encode_write_mb_s": f32_bytes / 2**20 / t,
                "encode_write_s": times[(dt, codec)],
                "speed_vs_" + "_".join(base_key): speed_ratio,
                "rel_frobenius_error": errors[dt][0],
                "rel_frobenius_error_per_state": errors[dt][1],
            }
        )
    return {
        "task": name,
        "n_tokens": n_tok,
        "n_states": n_states,
        "d": d,
        "float32_bytes": f32_bytes,
        "speed_baseline": "/".join(base_key),
        "combinations": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["rte", "sst2"], help="GLUE tasks")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"training examples per task (quick: {QUICK_SAMPLES}, full: {FULL_SAMPLES})",
    )
    p.add_argument("--reps", type=int, default=5, help="write repetitions per combination")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tmp", type=Path, default=None, help="where the temporary arrays go")
    p.add_argument("--backbone", default=None, help="default: the pipeline's (minilm-l6)")
    args = p.parse_args(argv)
    data_dir = common.glue_dir(args.data_dir)
    n = args.samples or (QUICK_SAMPLES if args.quick else FULL_SAMPLES)
    cfg = Config()
    if args.backbone is not None:
        cfg = apply_overrides(cfg, {"backbone.name": args.backbone})
    backbone = load_backbone(cfg.backbone.name, device="cpu", dtype=torch.float32)
    d = d_model(backbone.config)

    tasks = []
    base = Path(tempfile.mkdtemp(prefix="lst-bench-size-", dir=args.tmp))
    try:
        writer = Writer(base, cfg, d)
        for task in args.tasks:
            data = load_task(task, data_dir=data_dir)
            t0 = time.perf_counter()
            states, n_ex = sample_states(backbone, data, n, args.seed, cfg)
            fwd_s = time.perf_counter() - t0
            print(
                f"{task}: {n_ex} examples, {states[0].shape[0]} tokens, {len(states)} states "
                f"(forward {fwd_s:.1f}s)",
                flush=True,
            )
            res = measure_task(task, states, writer, args.dtypes, args.codecs, args.reps)
            res["n_examples"] = n_ex
            tasks.append(res)
            del states
    finally:
        shutil.rmtree(base, ignore_errors=True)

    for res in tasks:
        base_name = res["speed_baseline"]
        print(
            f"\n{res['task']}: {res['n_examples']} training examples, {res['n_tokens']} tokens, "
            f"{res['n_states']} states x d={res['d']} ({cfg.backbone.name}); "
            f"{args.reps} interleaved write reps, medians\n"
        )
        rows = [
            [
                f"{r['dtype']}/{r['codec']}",
                f"{r['bytes_per_token_per_layer']:.0f}",
                f"{r['ratio_vs_float32_raw']:.2f}x",
                f"{r['ratio_vs_dtype_raw']:.3f}x",
                f"{r['rel_frobenius_error']:.2e}",
                f"{max(r['rel_frobenius_error_per_state']):.2e}",
                f"{r['encode_write_mb_s']:.0f}",
                f"{r['speed_vs_' + base_name.replace('/', '_')]:.2f}",
            ]
            for r in res["combinations"]
        ]
        print(
            common.table(
                [
                    "dtype/codec",
                    "B/token/layer",
                    "vs float32 raw",
                    "vs dtype raw",
                    "rel err",
                    "worst state",
                    "enc+write MB/s",
                    f"speed vs {base_name}",
                ],
                rows,
            )
        )
    print(
        "\nB/token/layer: stored bytes (chunk/shard files, int8 incl. scales) per token per "
        "state; vs float32 raw / vs dtype raw: compression ratios; rel err: relative Frobenius "
        "error of decode(encode(x)) against float32 over all states (worst state beside it); "
        "MB/s: float32 megabytes through encode + zarr write. zarr stores a split's last chunk "
        "at full chunk size (zero-filled), so raw can exceed the dtype's bytes on small samples"
    )
    figures = {
        "backbone": cfg.backbone.name,
        "samples_per_task": n,
        "seed": args.seed,
        "reps": args.reps,
        "chunk_mb": cfg.cache.chunk_mb,
        "shard_chunks": cfg.cache.shard_chunks,
        "tasks": tasks,
    }
    common.write_json(args.json, "cache_size", figures)
    return figures


if __name__ == "__main__":
    main()
