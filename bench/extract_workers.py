"""Extraction on Dask workers: 2 worker processes against 1, and against one plain process.

    python -m bench.extract_workers --quick --json bench/results/extract_workers_quick.json
    python -m bench.extract_workers --json bench/results/extract_workers.json

Three arms extract the same task with the default backbone (MiniLM, ``side_init`` off) into a
fresh cache root each time: ``workers2`` and ``workers1`` are ``pipeline run extract --workers N``
(a LocalCluster of N processes, one thread each, as the CLI starts it), ``inprocess`` is the plain
single-process ``pipeline run extract`` (torch's default intra-op threads). The clusters are
started and warmed up once (imports and the backbone load in every worker, timed separately), so
the arms compare extraction itself. Repetitions rotate the order of the arms; the headline is the
median of the per-repetition ratios workers1 wall / workers2 wall (above 1: two workers faster).
On a machine with as many cores as workers, one process already uses every core through
intra-op threads; the ratio measures what process parallelism adds on top.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import common  # sets HF_HUB_OFFLINE before transformers is imported
from bench.extract_throughput import make_config
from ladder.backbones import Backbone, load_backbone, pick_compute_dtype, pick_device
from pipeline.config import Config, apply_overrides
from stages.cluster import Cluster
from stages.extract import extract
from stages.extract_dask import DaskSegments
from stages.tasks import TaskData, load_task

QUICK_LIMIT = 250  # examples per split in --quick (RTE: about 34k tokens, 4 segments)
ARMS = ("workers2", "workers1", "inprocess")


def one_run(
    cfg: Config, backbone: Backbone, data: TaskData, base: Path, cluster: Cluster | None
) -> tuple[float, dict[str, Any]]:
    """One extraction into a fresh root: (wall seconds, manifest)."""
    root = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    t0 = time.perf_counter()
    res = extract(
        apply_overrides(cfg, {"cache.root": str(root)}),
        backbone=backbone,
        data=data,
        progress=False,
        runner=None if cluster is None else DaskSegments(cluster),
    )
    wall = time.perf_counter() - t0
    shutil.rmtree(root)
    if res.reused:
        raise RuntimeError(f"cache {res.key} was reused: the cache root was not fresh")
    return wall, res.manifest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--task", default="rte", help="GLUE task (default rte)")
    p.add_argument(
        "--limit", type=int, default=None, help=f"examples per split (quick: {QUICK_LIMIT})"
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions of each arm (default 3)")
    p.add_argument("--tmp", type=Path, default=None, help="where the temporary cache roots go")
    args = p.parse_args(argv)
    data_dir = common.glue_dir(args.data_dir)
    limit = args.limit if args.limit is not None else (QUICK_LIMIT if args.quick else None)

    data = load_task(args.task, data_dir=data_dir, limit=limit)
    warm = load_task(args.task, data_dir=data_dir, limit=8)
    base = Path(tempfile.mkdtemp(prefix="lst-bench-workers-", dir=args.tmp))
    cfg = make_config(args.task, data_dir, limit, "float16", "lz4", str(base))
    device = pick_device(cfg.extract.device)
    dtype = pick_compute_dtype(cfg.extract.compute_dtype, cfg.cache.dtype, device)
    backbone = load_backbone(cfg.backbone.name, device=device, dtype=dtype)
    walls: dict[str, list[float]] = {a: [] for a in ARMS}
    load: list[float] = []  # 1-minute load average before each repetition (shared machines)
    stats: dict[str, Any] = {}
    startup: dict[str, float] = {}
    clusters: dict[str, Cluster | None] = {"inprocess": None}
    try:
        for arm, n in (("workers2", 2), ("workers1", 1)):
            t0 = time.perf_counter()
            clusters[arm] = Cluster(workers=n).__enter__()
            one_run(cfg, backbone, warm, base, clusters[arm])  # imports + backbone load
            startup[arm] = time.perf_counter() - t0
            print(f"{arm}: cluster started and warmed up in {startup[arm]:.1f}s", flush=True)
        one_run(cfg, backbone, warm, base, None)
        for rep in range(args.reps):
            order = ARMS[rep % 3 :] + ARMS[: rep % 3]
            load.append(os.getloadavg()[0])
            for arm in order:
                wall, manifest = one_run(cfg, backbone, data, base, clusters[arm])
                walls[arm].append(wall)
                stats[arm] = manifest.get("distributed")
            print(
                f"rep {rep + 1}/{args.reps} ({'/'.join(order)})  "
                + "  ".join(f"{a} {walls[a][-1]:6.2f}s" for a in ARMS)
                + f"  workers1/workers2 {walls['workers1'][-1] / walls['workers2'][-1]:.3f}"
                + f"  (load average before: {load[-1]:.1f})",
                flush=True,
            )
            n_tokens = sum(s["streams"]["enc"]["n_tokens"] for s in manifest["splits"].values())
    finally:
        for c in clusters.values():
            if c is not None:
                c.close()
        shutil.rmtree(base, ignore_errors=True)

    w2_over_w1 = [a / b for a, b in zip(walls["workers1"], walls["workers2"], strict=True)]
    w2_over_in = [a / b for a, b in zip(walls["inprocess"], walls["workers2"], strict=True)]
    med = {a: common.median(walls[a]) for a in ARMS}
    print(
        f"\n{args.task}: {sum(len(v) for v in data.splits.values())} examples, {n_tokens} tokens; "
        f"{backbone.name} on {backbone.device} ({str(backbone.dtype).removeprefix('torch.')}), "
        f"in-process torch threads {torch.get_num_threads()}, {args.reps} rotating reps, medians\n"
    )
    print(
        common.table(
            ["arm", "median wall s", "tokens/s", "per-rep wall s", "units", "startup s"],
            [
                [
                    a,
                    f"{med[a]:.2f}",
                    f"{n_tokens / med[a]:.0f}",
                    " ".join(f"{w:.2f}" for w in walls[a]),
                    str((stats.get(a) or {}).get("units", "-")),
                    f"{startup[a]:.1f}" if a in startup else "-",
                ]
                for a in ARMS
            ],
        )
    )
    print(
        f"\nspeed-up of 2 workers over 1 (median of per-rep ratios workers1/workers2): "
        f"{common.median(w2_over_w1):.3f}  (per rep: {' '.join(f'{r:.2f}' for r in w2_over_w1)})"
        f"\nspeed-up of 2 workers over one plain process (inprocess/workers2): "
        f"{common.median(w2_over_in):.3f}  (per rep: {' '.join(f'{r:.2f}' for r in w2_over_in)})"
        "\nstartup: LocalCluster start plus a warm-up extraction (imports, backbone load in each "
        "worker); paid once per command, not in the timed runs"
        f"\n1-minute load average before each rep: {' '.join(f'{x:.1f}' for x in load)} on "
        f"{os.cpu_count()} cores (other work on a shared machine takes cores from every arm)"
    )
    figures = {
        "task": args.task,
        "limit": limit,
        "reps": args.reps,
        "backbone": backbone.name,
        "device": str(backbone.device),
        "n_tokens": n_tokens,
        "inprocess_torch_threads": torch.get_num_threads(),
        "speedup_workers2_over_workers1": common.median(w2_over_w1),
        "speedup_workers2_over_inprocess": common.median(w2_over_in),
        "pair_ratios_workers1_over_workers2": w2_over_w1,
        "pair_ratios_inprocess_over_workers2": w2_over_in,
        "wall_s": walls,
        "median_wall_s": med,
        "tokens_per_s": {a: n_tokens / med[a] for a in ARMS},
        "cluster_startup_s": startup,
        "load_average_before_rep": load,
        "distributed": {a: stats.get(a) for a in ("workers2", "workers1")},
    }
    common.write_json(args.json, "extract_workers", figures)
    return figures


if __name__ == "__main__":
    main()
