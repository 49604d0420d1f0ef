"""Extraction throughput against a bare forward pass of the same backbone over the same batches.

    python -m bench.extract_throughput --quick --json bench/results/extract_throughput.json
    python -m bench.extract_throughput --json bench/results/extract_throughput_full.json

``extract`` is the whole of stage one as ``pipeline run extract`` runs it (``side_init``
disabled): tokenise and plan, length-grouped batches, backbone forward, padding strip, the
background writer's encoding and compression, zarr writes, and the commit, into a fresh cache
root each repetition so nothing is reused. ``bare`` tokenises and plans the same splits with the
same functions (``tokenize_split``, ``plan_segments``, and ``padded_batches``, which is what
``stages.extract.segment_states`` batches with) and runs the plain model forward on the same
batches under ``torch.inference_mode()``, discarding outputs.
Repetitions alternate (bare/extract, then extract/bare, ...) and the ratio is the median of the
per-pair ratios extract tokens/s / bare tokens/s; the goal is >= 0.9.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import common  # sets HF_HUB_OFFLINE before transformers is imported
from cache_store.layout import rows_per_chunk
from ladder.backbones import Backbone, d_model, load_backbone, pick_compute_dtype, pick_device
from pipeline.config import Config, apply_overrides
from stages.extract import extract
from stages.tasks import TaskData, load_task
from stages.tokens import padded_batches, plan_segments, tokenize_split

QUICK_LIMIT = 100  # examples per split in --quick (RTE: about 19k tokens over three splits)


@dataclass
class Plan:
    """What one pass over the data amounts to (the same for bare and extract)."""

    n_examples: int
    n_tokens: int  # real tokens (what tokens/s counts)
    padded_tokens: int  # tokens the backbone computes, padding included
    n_batches: int


def make_config(
    task: str, data_dir: Path, limit: int | None, dtype: str, codec: str, root: str
) -> Config:
    return apply_overrides(
        Config(),
        {
            "task.name": task,
            "task.data_dir": str(data_dir),
            "task.limit": limit,
            "cache.root": root,
            "cache.dtype": dtype,
            "cache.codec": codec,
            "extract.side_init": [],
        },
    )


def bare_pass(cfg: Config, backbone: Backbone, data: TaskData) -> Plan:
    """Tokenise, plan and run the forward exactly as extract batches it; outputs discarded.

    The batches come from the product's ``padded_batches`` (what ``segment_states`` runs); only
    the forward differs: the plain model, no states gathered, nothing stripped or written.
    """
    d = d_model(backbone.config)
    shard_rows = rows_per_chunk(d, cfg.cache.dtype, cfg.cache.chunk_mb) * cfg.cache.shard_chunks
    pad_id = backbone.tokenizer.pad_token_id or 0
    device = backbone.device
    n_ex = n_tok = n_pad = n_batches = 0
    with torch.inference_mode():
        for split in data.splits:
            streams = tokenize_split(backbone, data, split, cfg.backbone.max_length)
            enc = streams["enc"]
            segments = plan_segments(enc.offsets, shard_rows)
            for lo, hi in zip(segments[:-1], segments[1:], strict=True):
                for b in padded_batches(
                    enc, lo, hi, cfg.extract.batch_tokens, cfg.extract.max_batch_size, pad_id
                ):
                    kw: dict[str, Any] = {}
                    if b.token_types is not None:
                        kw["token_type_ids"] = b.token_types.to(device)
                    backbone.model(
                        input_ids=b.ids.to(device), attention_mask=b.mask.to(device), **kw
                    )
                    n_pad += b.ids.numel()
                    n_batches += 1
            n_ex += len(enc.ids)
            n_tok += enc.n_tokens
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Plan(n_ex, n_tok, n_pad, n_batches)


def extract_pass(cfg: Config, backbone: Backbone, data: TaskData) -> dict[str, Any]:
    """One full extraction into ``cfg.cache.root`` (fresh); returns the manifest's figures."""
    res = extract(cfg, backbone=backbone, data=data, progress=False)
    if res.reused:
        raise RuntimeError(f"cache {res.key} was reused: the cache root was not fresh")
    if backbone.device.type == "cuda":
        torch.cuda.synchronize(backbone.device)
    return res.manifest


def with_root(cfg: Config, root: Path) -> Config:
    return apply_overrides(cfg, {"cache.root": str(root)})


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def fresh_root(base: Path, tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=base))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--task", default="rte", help="GLUE task (default rte: long sentence pairs)")
    p.add_argument(
        "--limit", type=int, default=None, help=f"examples per split (quick: {QUICK_LIMIT})"
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions of each side (default 3)")
    p.add_argument(
        "--dtypes", nargs="+", default=["float16", "int8"], help="storage dtypes to measure"
    )
    p.add_argument("--codec", default="lz4", help="codec preset (default lz4, the default)")
    p.add_argument("--tmp", type=Path, default=None, help="where the temporary cache roots go")
    args = p.parse_args(argv)
    data_dir = common.glue_dir(args.data_dir)
    limit = args.limit if args.limit is not None else (QUICK_LIMIT if args.quick else None)

    data = load_task(args.task, data_dir=data_dir, limit=limit)
    device = pick_device(Config().extract.device)
    backbones: dict[torch.dtype, Backbone] = {}

    def backbone_for(cfg: Config) -> Backbone:
        dt = pick_compute_dtype(cfg.extract.compute_dtype, cfg.cache.dtype, device)
        if dt not in backbones:
            backbones[dt] = load_backbone(cfg.backbone.name, device=device, dtype=dt)
        return backbones[dt]

    base = Path(tempfile.mkdtemp(prefix="lst-bench-extract-", dir=args.tmp))
    try:
        cfgs = {
            dt: make_config(args.task, data_dir, limit, dt, args.codec, str(base))
            for dt in args.dtypes
        }
        # warm-up: first forward passes, zarr's event loop, imports; not timed
        warm = load_task(args.task, data_dir=data_dir, limit=8)
        for cfg in cfgs.values():
            bb = backbone_for(cfg)
            bare_pass(cfg, bb, warm)
            root = fresh_root(base, "warm")
            extract_pass(with_root(cfg, root), bb, warm)
            shutil.rmtree(root)

        runs: dict[str, dict[str, list[Any]]] = {
            dt: {k: [] for k in ("bare_s", "bare_cpu_s", "extract_s", "extract_cpu_s", "timings")}
            for dt in cfgs
        }
        plans: dict[str, Plan] = {}
        cache_bytes: dict[str, int] = {}
        for rep in range(args.reps):
            for dt, cfg in cfgs.items():
                bb = backbone_for(cfg)
                r = runs[dt]
                order = ("bare", "extract") if rep % 2 == 0 else ("extract", "bare")
                for side in order:
                    if side == "bare":
                        t0, c0 = time.perf_counter(), time.process_time()
                        plans[dt] = bare_pass(cfg, bb, data)
                        r["bare_s"].append(time.perf_counter() - t0)
                        r["bare_cpu_s"].append(time.process_time() - c0)
                    else:
                        root = fresh_root(base, dt)
                        t0, c0 = time.perf_counter(), time.process_time()
                        manifest = extract_pass(with_root(cfg, root), bb, data)
                        r["extract_s"].append(time.perf_counter() - t0)
                        r["extract_cpu_s"].append(time.process_time() - c0)
                        r["timings"].append(manifest["timings"])
                        cache_bytes[dt] = disk_bytes(root)
                        shutil.rmtree(root)
                print(
                    f"rep {rep + 1}/{args.reps} {dt:8s} ({'/'.join(order)})  "
                    f"bare {r['bare_s'][-1]:6.2f}s wall {r['bare_cpu_s'][-1]:6.2f}s cpu  "
                    f"extract {r['extract_s'][-1]:6.2f}s wall {r['extract_cpu_s'][-1]:6.2f}s cpu  "
                    f"ratio {r['bare_s'][-1] / r['extract_s'][-1]:.3f}",
                    flush=True,
                )

    finally:
        shutil.rmtree(base, ignore_errors=True)

    results = []
    for dt, r in runs.items():
        plan = plans[dt]
        pair = [b / e for b, e in zip(r["bare_s"], r["extract_s"], strict=True)]
        pair_cpu = [b / e for b, e in zip(r["bare_cpu_s"], r["extract_cpu_s"], strict=True)]
        bare_s, extract_s = common.median(r["bare_s"]), common.median(r["extract_s"])
        tim = {k: common.median([t[k] for t in r["timings"]]) for k in r["timings"][0]}
        results.append(
            {
                "dtype": dt,
                "codec": args.codec,
                "bare_tokens_per_s": plan.n_tokens / bare_s,
                "extract_tokens_per_s": plan.n_tokens / extract_s,
                "ratio_extract_over_bare": common.median(pair),
                "ratio_of_medians": bare_s / extract_s,
                "cpu_time_ratio_bare_over_extract": common.median(pair_cpu),
                "pair_ratios": pair,
                "pair_cpu_ratios": pair_cpu,
                **{k: r[k] for k in ("bare_s", "bare_cpu_s", "extract_s", "extract_cpu_s")},
                "extract_timings_median_s": tim,
                "cache_bytes": cache_bytes[dt],
                "cache_bytes_per_token": cache_bytes[dt] / plan.n_tokens,
            }
        )

    plan = next(iter(plans.values()))
    bb = next(iter(backbones.values()))
    print(
        f"\n{args.task}: {plan.n_examples} examples, {plan.n_tokens} tokens "
        f"({plan.padded_tokens / plan.n_tokens:.3f}x padded) in {plan.n_batches} batches; "
        f"{bb.name} on {bb.device} ({str(bb.dtype).removeprefix('torch.')}), "
        f"{torch.get_num_threads()} threads, {args.reps} alternating reps, medians\n"
    )
    rows = [
        [
            f"{x['dtype']}/{x['codec']}",
            f"{x['bare_tokens_per_s']:.0f}",
            f"{x['extract_tokens_per_s']:.0f}",
            f"{x['ratio_extract_over_bare']:.3f}",
            " ".join(f"{v:.2f}" for v in x["pair_ratios"]),
            f"{x['cpu_time_ratio_bare_over_extract']:.3f}",
            f"{x['extract_timings_median_s'].get('tokenize_s', 0):.2f}",
            f"{x['extract_timings_median_s'].get('extract_s', 0):.2f}",
            f"{x['extract_timings_median_s'].get('total_s', 0):.2f}",
            f"{x['cache_bytes_per_token']:.0f}",
        ]
        for x in results
    ]
    print(
        common.table(
            [
                "dtype/codec",
                "bare tok/s",
                "extract tok/s",
                "extract/bare",
                "pair ratios",
                "cpu-time ratio",
                "tokenize s",
                "forward+write s",
                "total s",
                "cache B/tok",
            ],
            rows,
        )
    )
    print(
        "\nextract/bare: median of per-pair wall-clock throughput ratios (goal >= 0.90); "
        "cpu-time ratio: bare/extract process CPU seconds (all threads), less sensitive to "
        "other load on the machine; tokenize/forward+write/total: extract's own timings"
    )

    figures = {
        "task": args.task,
        "limit": limit,
        "reps": args.reps,
        "backbone": bb.name,
        "device": str(bb.device),
        "compute_dtypes": [str(k).removeprefix("torch.") for k in backbones],
        "n_examples": plan.n_examples,
        "n_tokens": plan.n_tokens,
        "padded_tokens": plan.padded_tokens,
        "n_batches": plan.n_batches,
        "goal_ratio": 0.9,
        "results": results,
    }
    common.write_json(args.json, "extract_throughput", figures)
    return figures


if __name__ == "__main__":
    main()
