"""Stage two on a Dask cluster: a sweep of side networks, one Dask task per trial.

    pipeline run train-side --sweep --reduction-factors 8,16 --learning-rates 3e-3,1e-3 --seeds 0,1
    pipeline run train-side --sweep --scheduler tcp://host:8786

``sweep_train_side`` runs one task per (reduction factor, seed, learning rate): each calls
``train_side`` with a one-trial config, in its own run folder under one sweep folder, from the
shared cache; the coordinator gathers their metrics into ``sweep.json`` and ``sweep.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stages.cluster import TORCH_LOCK, Cluster, absolute_root, raise_killed, worker_address
from stages.config import StageConfig
from stages.runfiles import make_private_dir, write_atomic, write_json_atomic
from stages.train_side import check_trials, resolve_cache, run_signature, task_spec_of, train_side

TRAIN_RETRIES = 1


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


def run_trial(cfg: StageConfig, cache_key: str, run_name: str) -> dict[str, Any]:
    """One side network (``cfg`` has a one-trial grid) trained from the cache; its summary row."""
    t0 = time.perf_counter()
    with TORCH_LOCK:
        result = train_side(cfg, cache_key=cache_key, run_name=run_name, progress=False, echo=False)
    ((name, net),) = result.metrics["networks"].items()
    return {
        "trial": name,
        "r": net["r"],
        "seed": net["seed"],
        "lr": net["lr"],
        "best_epoch": net["best_epoch"],  # 1-based, as in metrics.json
        "validation": net["best_validation"],
        "test": (net.get("test") or {}).get("score"),
        "trainable_parameters": net["trainable_parameters"],
        "compute_s": round(net["compute_s"], 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "run": str(result.folder),
        "worker": worker_address(),
        "test_metrics": net.get("test"),
        "stopped": net.get("stopped"),  # why it stopped early (a non-finite loss), else None
        "epochs": net["epochs"],
    }


def sweep_train_side(
    cfg: StageConfig,
    cluster: Cluster,
    *,
    cache_key: str | None = None,
    sweep_name: str | None = None,
    progress: bool = True,
    retries: int = TRAIN_RETRIES,
) -> SweepResult:
    """One Dask task per (r, seed, lr) of ``cfg.train_side``; metrics gathered into one table."""
    cache = resolve_cache(cfg, cache_key)
    spec = task_spec_of(cache)
    trials = check_trials(cfg, cache)  # every trial's config is valid before any work
    signature = run_signature(cfg, cache.key, None)
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:8]
    folder = Path(cfg.train_side.run_dir).expanduser().resolve() / (
        sweep_name or f"sweep-{cache.key}-{digest}"
    )
    make_private_dir(folder, bool(cfg.cache.storage_options))
    root = absolute_root(cfg.cache.resolved_root)
    client = cluster.client
    cluster.n_workers()
    tag = uuid.uuid4().hex[:6]
    futures = {}
    for tr in trials:
        tcfg = cfg.model_copy(
            update={
                "cache": cfg.cache.model_copy(update={"root": root}),
                "train_side": cfg.train_side.model_copy(
                    update={
                        "run_dir": str(folder),
                        "reduction_factors": [tr.r],
                        "seeds": [tr.seed],
                        "learning_rates": [tr.lr],
                    }
                ),
            }
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
        raise_killed(e, "while training")
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
    write_json_atomic(result.folder / "sweep.json", payload)

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(result.rows)

    write_atomic(result.folder / "sweep.csv", write_csv)
