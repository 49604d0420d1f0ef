"""The Fisher pass of side_init: batched per-example gradients against the one-by-one loop.

    python -m bench.fisher_speed --quick --json bench/results/fisher_speed_quick.json
    python -m bench.fisher_speed --json bench/results/fisher_speed.json

With the packaged MiniLM-L6, per task (SST-2 with 1024 Fisher examples, RTE with 256; `--quick`:
128 and 32), the product's own ``stages.side_init.fisher_importance`` runs with ``batched=False``
(the loop) and ``batched=True``, alternating, ``--reps`` times each; medians and their ratio are
reported. Both importances are then pruned at r = 8 (``ladder.pruning.prune_backbone``) and every
``idx.*`` array is compared; the largest Fisher difference over each tensor's largest entry is
printed too (key biases excluded: their exact gradient is zero, both sides hold rounding noise).
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import glue_dir, median, parser, table, write_json

TASKS = {"sst2": 1024, "rte": 256}


def one_task(task: str, samples: int, reps: int, data_dir: Any, backbone: Any) -> dict[str, Any]:
    import torch

    from ladder.pruning import prune_backbone
    from pipeline.config import Config, apply_overrides
    from stages.side_init import fisher_importance
    from stages.tasks import load_task_of
    from stages.tokens import tokenize_split

    cfg = apply_overrides(
        Config(),
        {"task.name": task, "task.data_dir": str(data_dir), "extract.fisher_samples": samples},
    )
    data = load_task_of(cfg.task)
    train = tokenize_split(backbone, data, "train", cfg.backbone.max_length)
    times: dict[str, list[float]] = {"loop": [], "batched": []}
    results: dict[str, dict[str, torch.Tensor]] = {}
    for _ in range(reps):
        for arm in ("loop", "batched"):
            t0 = time.perf_counter()
            results[arm] = fisher_importance(cfg, backbone, data, train, batched=arm == "batched")
            times[arm].append(time.perf_counter() - t0)
    loop, batched = results["loop"], results["batched"]
    rel = max(
        ((batched[k] - v).abs().max() / v.abs().max()).item()
        for k, v in loop.items()
        if not k.endswith("key.bias") and v.abs().max() > 0
    )
    state = {k: v.detach().float() for k, v in backbone.model.state_dict().items()}
    _, idx_loop = prune_backbone(backbone.family, state, loop, 8, backbone.config)
    _, idx_batched = prune_backbone(backbone.family, state, batched, 8, backbone.config)
    differ = {
        k: int((v != idx_batched[k]).sum())
        for k, v in idx_loop.items()
        if not torch.equal(v, idx_batched[k])
    }
    med = {k: median(v) for k, v in times.items()}
    return {
        "examples": min(samples, len(train["enc"].ids)),
        "seconds": times,
        "median_s": med,
        "loop_over_batched": med["loop"] / med["batched"],
        "max_rel_diff": rel,
        "idx_arrays": len(idx_loop),
        "idx_arrays_differing": differ,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--reps", type=int, default=None, help="repetitions per arm (default 3, quick 1)"
    )
    args = p.parse_args()
    data_dir = glue_dir(args.data_dir)
    reps = args.reps or (1 if args.quick else 3)
    from ladder.backbones import load_backbone

    backbone = load_backbone("minilm-l6")
    figures: dict[str, Any] = {"backbone": "minilm-l6", "r": 8, "reps": reps, "tasks": {}}
    rows = []
    for task, samples in TASKS.items():
        n = samples // 8 if args.quick else samples
        res = one_task(task, n, reps, data_dir, backbone)
        figures["tasks"][task] = res
        rows.append(
            [
                task,
                res["examples"],
                f"{res['median_s']['loop']:.1f}",
                f"{res['median_s']['batched']:.1f}",
                f"{res['loop_over_batched']:.2f}x",
                f"{res['max_rel_diff']:.1e}",
                f"{len(res['idx_arrays_differing'])}/{res['idx_arrays']}",
            ]
        )
    print(
        table(
            [
                "task",
                "examples",
                "loop s",
                "batched s",
                "loop/batched",
                "max rel diff",
                "idx differ",
            ],
            rows,
        )
    )
    write_json(args.json, "fisher_speed", figures)


if __name__ == "__main__":
    main()
