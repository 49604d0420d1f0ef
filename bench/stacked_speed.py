"""Stacked against one-by-one: an epoch of K side networks of one shape from the cache.

    python -m bench.stacked_speed --backbone smollm2-135m --task sst2 \\
        --data-dir ../shared/data/glue --limit 500 --layers 0,5,10,15,20,25,30

Extracts the cache once (int8, no side init) under ``--cache-root`` unless it is there, then
times, on the same batches, one epoch of K networks (seeds 0..K-1, learning rates 1e-3, 3e-3,
1e-2, ..., r = 8, random init) trained one by one (``train_step``, as ``train_side.batched:
off``) and as one stacked group (``StackedGroup``, as ``batched: on``); repetitions alternate
between the arms, medians are reported. The split is read into memory first, so the figures
are the networks' compute. Any backbone with stackable side networks (the encoder-only family,
the Llama family, GPT-2) can be given.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import glue_dir, median, parser, table, write_json
from bench.train_side_speed import train_loader

LRS = [1e-3, 3e-3, 1e-2, 3e-4, 3e-2]


def make_cache(args: Any, data: Path) -> str:
    from pipeline.config import Config, apply_overrides
    from stages.extract import extract

    over: dict[str, Any] = {
        "task.name": args.task,
        "task.data_dir": str(data),
        "task.limit": args.limit,
        "cache.root": str(args.cache_root),
        "cache.dtype": args.dtype,
        "backbone.name": args.backbone,
        "extract.layers": args.layers,
        "extract.side_init": [],
    }
    return extract(apply_overrides(Config(), over), progress=False).key


def _trials(args: Any, key: str) -> tuple[Any, list[Any], Any]:
    from pipeline.config import Config, apply_overrides
    from stages.train_side import (
        Trial,
        backbone_config_of,
        build_trial,
        resolve_cache,
        task_spec_of,
    )

    over: dict[str, Any] = {
        "task.name": args.task,
        "cache.root": str(args.cache_root),
        "backbone.name": args.backbone,
        "train_side.init": "random",
        "train_side.batch_size": args.batch_size,
    }
    if args.layers is not None:  # a side block on each block whose output is stored
        over["train_side.kept_layers"] = [s - 1 for s in args.layers if s > 0]
    cfg = apply_overrides(Config(), over)
    cache = resolve_cache(cfg, key)
    spec, bcfg = task_spec_of(cache), backbone_config_of(cache)
    grid = [Trial(args.r, k, LRS[k % len(LRS)]) for k in range(args.networks)]
    return cache, [build_trial(cfg, cache, bcfg, spec, t, 10_000) for t in grid], cfg


def epoch(args: Any, key: str, stacked: bool, rep: int) -> float:
    """One epoch of the K networks, stacked or one by one: seconds."""
    from stages.train_side import StackedGroup, cached_states, stackable, train_step

    cache, trials, cfg = _trials(args, key)
    if stacked and not all(stackable(ts.net) for ts in trials):
        raise SystemExit(f"{type(trials[0].net).__name__} networks are not stackable")
    loader = train_loader(cache, trials, cfg.train_side.batch_size)
    batches = list(loader.epoch(rep))  # in memory: the figures are the networks' compute
    t0 = time.perf_counter()
    if stacked:
        group = StackedGroup(trials)
        for batch in batches:
            group.step(batch, cached_states, 1.0)
        group.unpack()
    else:
        for batch in batches:
            for ts in trials:
                train_step(ts, batch, cached_states, 1.0)
    return time.perf_counter() - t0


def _reps(xs: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in xs)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--dtype", default="int8")
    p.add_argument("--cache-root", type=Path, default=Path("/tmp/lst-bench-stacked"))
    p.add_argument("--networks", type=int, default=3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    data = glue_dir(args.data_dir)
    t0 = time.perf_counter()
    key = make_cache(args, data)
    print(f"cache {key} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    rows: dict[str, list[float]] = {"off": [], "on": []}
    for rep in range(args.reps):  # alternate, starting with each arm in turn
        arms = ["off", "on"] if rep % 2 == 0 else ["on", "off"]
        for arm in arms:
            rows[arm].append(epoch(args, key, arm == "on", rep))
            print(f"rep {rep} {arm}: {rows[arm][-1]:.2f} s", flush=True)
    off, on = median(rows["off"]), median(rows["on"])
    print(
        table(
            ["arm", "epoch s (median)", "all reps"],
            [
                [f"{args.networks} networks one by one", f"{off:.2f}", _reps(rows["off"])],
                [f"{args.networks} networks stacked", f"{on:.2f}", _reps(rows["on"])],
            ],
        )
    )
    print(f"stacked / one by one: {on / off:.3f}")
    write_json(
        args.json,
        "stacked_speed",
        {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cache_key": key,
            "epoch_s": rows,
            "median_s": {"off": off, "on": on},
            "stacked_over_one_by_one": on / off,
        },
    )


if __name__ == "__main__":
    main()
