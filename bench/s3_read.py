"""Stage two from an object store: a train-side epoch reading from S3 against local disk.

    python -m bench.s3_read --quick --json bench/results/s3_read_quick.json

All in one run, on one SST-2 cache of the default MiniLM backbone (float16, lz4):
  1. the cache is extracted straight into an S3 bucket served by moto on loopback
     (``tests/s3_server.py``: a real S3 protocol server in its own process, authentication on),
     then copied to a local root with ``pipeline cache pull`` (verified, committed last);
  2. one stage-two epoch (open the cache, a CacheLoader over the train split, a train step of one
     r = 8 side network per batch of 100; the epoch reads every kept layer from the store, as
     the first epoch of a run does) from S3 vs the same epoch from the local copy;
  3. the same epoch without the side step (the loader alone: reading and batching) from S3 vs
     local.
Repetitions alternate between the two roots (and which goes first); medians are reported. The
server is on loopback: the ratio shows the S3 protocol and client cost (requests, HTTP, moto's
own Python), not wide-area latency or bandwidth.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import glue_dir, median, parser, table, write_json


def make_cache(root: str, data: Path, limit: int | None) -> str:
    from pipeline.config import Config, apply_overrides
    from stages.extract import extract

    over: dict[str, Any] = {
        "task.name": "sst2",
        "task.data_dir": str(data),
        "task.limit": limit,
        "cache.root": root,
        "extract.side_init": [],
    }
    return extract(apply_overrides(Config(), over), progress=True).key


def epoch(root: str, key: str, seed: int, side_step: bool) -> dict[str, float]:
    """One epoch from ``root``: open, loader, every batch (and a side step of r = 8 on it)."""
    from cache_store.loader import CacheLoader
    from pipeline.config import Config, apply_overrides
    from stages.batches import torch_batches
    from stages.train_side import (
        Trial,
        backbone_config_of,
        build_trial,
        cached_states,
        resolve_cache,
        task_spec_of,
        train_step,
    )

    t0 = time.perf_counter()
    cfg = apply_overrides(
        Config(), {"task.name": "sst2", "cache.root": root, "train_side.init": "random"}
    )
    cache = resolve_cache(cfg, key)
    ts = build_trial(
        cfg, cache, backbone_config_of(cache), task_spec_of(cache), Trial(8, 0, 3e-3), 10_000
    )
    loader = CacheLoader(
        cache, "train", {"enc": ts.net.needed_layers()}, batch_size=100, shuffle=True
    )
    n = 0
    for batch in torch_batches(loader.epoch(seed)):
        n += len(batch.index)
        if side_step:
            train_step(ts, batch, cached_states, 1.0)
    assert n == loader.n
    return {"wall_s": time.perf_counter() - t0, "examples": n}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    data = glue_dir(args.data_dir)
    limit = 2000 if args.quick else None
    reps = 3 if args.quick else 5
    import torch

    from cache_store import store as st
    from cache_store.registry import cache_info, copy_cache
    from tests.s3_server import start_moto

    torch.set_num_threads(1)  # as bench.train_side_speed: the loader thread has the other core
    server = start_moto()
    os.environ.update(server.env())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s3_root = f"s3://{server.bucket}/bench"
            local_root = str(Path(tmp) / "cache")
            t0 = time.perf_counter()
            key = make_cache(s3_root, data, limit)
            extract_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pulled = copy_cache(s3_root, local_root, key, progress=True, verb="pull")
            pull_s = time.perf_counter() - t0
            info = cache_info(s3_root, key)
            rows: dict[str, list[float]] = {k: [] for k in ("s3", "local", "s3_read", "local_read")}
            roots = {"s3": s3_root, "local": local_root}
            for rep in range(reps):
                order = ["s3", "local"] if rep % 2 == 0 else ["local", "s3"]
                for arm in order:
                    rows[arm].append(epoch(roots[arm], key, rep, True)["wall_s"])
                for arm in order:
                    rows[f"{arm}_read"].append(epoch(roots[arm], key, rep, False)["wall_s"])
                print(
                    f"rep {rep + 1}/{reps}: "
                    + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in rows.items())
                )
            train = info["splits"]["train"]
            read_bytes = st.size_of(
                st.open_root(local_root, write=False), f"{key}/{info['attempt']}/train"
            )
    finally:
        server.stop()
    med = {k: median(v) for k, v in rows.items()}
    figures = {
        "task": "sst2",
        "train_examples": train["n_examples"],
        "train_tokens": train["streams"]["enc"]["n_tokens"],
        "backbone": "minilm-l6",
        "dtype": info["dtype"],
        "codec": info["codec"],
        "reduction_factor": 8,
        "reps": reps,
        "cache_bytes": info["bytes"],
        "train_split_bytes": read_bytes,
        "extract_to_s3_s": extract_s,
        "pull_s": pull_s,
        "pull_bytes": pulled["bytes"],
        "pull_mb_per_s": pulled["bytes"] / pull_s / 2**20,
        "epoch_s": rows,
        "epoch_s_median": med,
        "s3_over_local_epoch": med["s3"] / med["local"],
        "s3_over_local_read_only": med["s3_read"] / med["local_read"],
        "s3_read_mb_per_s": read_bytes / med["s3_read"] / 2**20,
        "local_read_mb_per_s": read_bytes / med["local_read"] / 2**20,
        "server": "moto (ThreadedMotoServer) in a subprocess on 127.0.0.1, IAM auth on",
    }
    print(
        table(
            ["measure", "S3 (moto)", "local", "S3 / local"],
            [
                [
                    "train-side epoch, r=8 (s)",
                    f"{med['s3']:.2f}",
                    f"{med['local']:.2f}",
                    f"{figures['s3_over_local_epoch']:.2f}",
                ],
                [
                    "loader epoch only (s)",
                    f"{med['s3_read']:.2f}",
                    f"{med['local_read']:.2f}",
                    f"{figures['s3_over_local_read_only']:.2f}",
                ],
            ],
        )
    )
    print(
        f"\ntrain split: {train['n_examples']} examples, {read_bytes / 2**20:.0f} MB; "
        f"pull {pulled['bytes'] / 2**20:.0f} MB in {pull_s:.1f}s"
    )
    write_json(args.json, "s3_read", figures)


if __name__ == "__main__":
    main()
