"""Accuracy of LST from the cache against online LST (backbone live, dropout on).

    python -m bench.accuracy --json bench/results/accuracy.json

For each task: extract the cache with the defaults (MiniLM, float16/lz4, Fisher side_init), then
train the same r = 8 side networks, seeds 0, 1, 2 in one pass, three ways on the same batches:

  cache            from the cache (eval-mode states, the product's default)
  cache+ladder-dp  from the cache with dropout 0.1 on the ladder inputs (the remedy)
  online-dropout   backbone live with its dropout on (the authors' setting)

and report the test metric's mean and standard deviation over the seeds. The three seeds of one
arm share the data order (one pass) and differ in the side network's random init; all arms use
the same order, so the comparison between arms is paired.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import glue_dir, parser, table, write_json

ARMS = {
    "cache": {"online": None, "ladder_dropout": 0.0},
    "cache+ladder-dp": {"online": None, "ladder_dropout": 0.1},
    "online-dropout": {"online": "dropout", "ladder_dropout": 0.0},
}


def run_task(
    task: str, data: Path, root: Path, runs: Path, args: Any, arms: list[str]
) -> dict[str, Any]:
    from ladder.backbones import load_backbone
    from pipeline.config import Config, apply_overrides
    from stages.extract import extract
    from stages.train_side import train_side

    over: dict[str, Any] = {
        "task.name": task,
        "task.data_dir": str(data),
        "task.limit": args.limit if task in args.limit_tasks else None,
        "cache.root": str(root),
        "extract.side_init": ["fisher"],
        "extract.reduction_factors": [args.r],
        "train_side.reduction_factors": [args.r],
        "train_side.seeds": args.seeds,
        "train_side.epochs": args.epochs,
        "train_side.run_dir": str(runs),
    }
    cfg = apply_overrides(Config(), over)
    t0 = time.perf_counter()
    key = extract(cfg, progress=True).key
    out: dict[str, Any] = {"cache": key, "extract_s": time.perf_counter() - t0, "arms": {}}
    backbone = None
    for arm in arms:
        spec = ARMS[arm]
        acfg = apply_overrides(cfg, {"train_side.ladder_dropout": spec["ladder_dropout"]})
        if spec["online"] and backbone is None:
            backbone = load_backbone(cfg.backbone.name)
        t0 = time.perf_counter()
        res = train_side(
            acfg,
            cache_key=key,
            run_name=f"{task}-{arm}",
            online=backbone if spec["online"] else None,
            online_dropout=True,
        )
        nets = res.metrics["networks"]
        tests = [v["test"]["score"] for v in nets.values()]
        out["arms"][arm] = {
            "test": tests,
            "mean": statistics.mean(tests),
            "std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "validation": [v["best_validation"] for v in nets.values()],
            "train_s": time.perf_counter() - t0,
            "run": str(res.folder),
        }
        print(json.dumps({task: {arm: out["arms"][arm]}}), flush=True)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", default="rte,mrpc,cola,stsb,sst2")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--limit", type=int, default=10000, help="examples per split, --limit-tasks")
    p.add_argument("--limit-tasks", default="sst2", help="tasks cut to --limit examples a split")
    p.add_argument("--tmp", type=Path, default=None, help="where caches and runs go")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.limit_tasks = set(args.limit_tasks.split(","))
    tasks = args.tasks.split(",")
    arms = args.arms.split(",")
    if args.quick:
        tasks, args.epochs, args.limit, args.limit_tasks = ["rte"], 2, 300, {"rte"}
    data = glue_dir(args.data_dir)
    tmp = Path(tempfile.mkdtemp(prefix="lst-acc-", dir=args.tmp))
    results: dict[str, Any] = {}
    for task in tasks:
        results[task] = run_task(task, data, tmp / "cache", tmp / "runs", args, arms)
    rows = [
        [task] + [f"{r['arms'][a]['mean']:.1f} ± {r['arms'][a]['std']:.1f}" for a in arms]
        for task, r in results.items()
    ]
    means = {a: statistics.mean(r["arms"][a]["mean"] for r in results.values()) for a in arms}
    rows.append(["average"] + [f"{means[a]:.1f}" for a in arms])
    print(table(["task"] + arms, rows))
    summary = {
        "tasks": tasks,
        "r": args.r,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "limit": {t: args.limit for t in args.limit_tasks if t in tasks},
        "average": means,
        "results": results,
    }
    write_json(args.json, "accuracy", summary)


if __name__ == "__main__":
    main()
