"""A decoder-only LLM (SmolLM2-135M) on SST-2: LST from the cache against online LST and LoRA.

    python -m bench.llm --quick --json bench/results/llm_quick.json
    python -m bench.llm --json bench/results/llm.json

The goals of issue 15, measured side by side on one backbone, one task and one data budget
(``--limit`` training examples, first N of every paper split; r = 8). Every training
configuration runs in a ``bench.baselines`` process of its own (its peak RSS is its own):

  extract          stage one once (``--dtype``, default int8; states 0 and every ``--layer-step``
                   th block's output; Fisher side_init at r on ``--fisher-samples`` examples)
  lst-cache        the side network from the cache, ``--seeds`` trained in one pass: test metric
  lst-cache-1      one network (the first seed), 2 epochs: its peak memory and time per cached
                   epoch (the second epoch; the first also reads the cache into RAM)
  lst-streamed     one network, one epoch, the cache streamed through a 16 MB shuffle buffer
                   instead of whole splits in RAM: peak memory
  lora             peft LoRA (r = 8, alpha 16, on q_proj and v_proj) on
                   ``LlamaForSequenceClassification`` (last real token, linear head), ``--lora-seeds``
                   one after another, ``--lora-limit`` examples, ``--lora-epochs``

then, in this process, one network's epoch from the cache against its epoch with the live
backbone (online LST, dropout on), in the same loop (``bench.train_side_speed``'s
``epoch_from_cache`` and ``epoch_online``); the online epoch is timed over ``--online-batches``
batches and scaled to the epoch's batch count (the output says so), and ``bench.cache_size`` on ``--size-samples`` training examples: stored bytes
per token per state for float16 and int8 (lz4). The goals: peak training memory of LST from the
cache <= 25 % of LoRA's, a cached epoch >= 10x faster than an online one. Memory is the
process's peak RSS (CPU: the backbone's weights, the cached states in RAM, the Python and torch
runtime are all in it); "above base" is the peak over the RSS once model and data were loaded.
Where LoRA trains on fewer examples than LST (``--lora-limit``), its epoch time is also given
scaled to LST's training tokens, and labelled so. ``--work DIR`` keeps each child's JSON: a
killed run resumes there.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_GLUE, parser, table, write_json
from bench.paper_compare import STREAM_MB, Runner, ok

MB = 2**20
GOAL_MEMORY = 0.25  # LST-from-cache peak memory / LoRA's, at most
GOAL_SPEEDUP = 10.0  # online epoch / cached epoch, at least


def build_parser() -> Any:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--limit", type=int, default=None, help="examples per split (default 5000)")
    p.add_argument("--lora-limit", type=int, default=None, help="LoRA's (default: --limit)")
    p.add_argument("--epochs", type=int, default=None, help="LST epochs (default 3)")
    p.add_argument("--lora-epochs", type=int, default=None, help="default: --epochs")
    p.add_argument("--seeds", default="0,1,2", help="LST seeds, trained in one pass")
    p.add_argument("--lora-seeds", default=None, help="default: --seeds (--quick: 0)")
    p.add_argument("--r", type=int, default=8, help="LST reduction factor")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="int8", help="cache storage dtype")
    p.add_argument(
        "--layer-step",
        type=int,
        default=5,
        help="side blocks on every Nth backbone block (counted back from the last); 1: all",
    )
    p.add_argument("--fisher-samples", type=int, default=None, help="default 128 (--quick 16)")
    p.add_argument("--size-samples", type=int, default=None, help="cache_size examples (200)")
    p.add_argument("--threads", type=int, default=None, help="children's torch threads")
    p.add_argument(
        "--online-batches",
        type=int,
        default=None,
        help="online LST timed over this many batches, scaled to an epoch (default 40, quick 2)",
    )
    p.add_argument("--work", type=Path, default=None, help="keep the children's JSON and cache")
    return p


def kept_blocks(n_blocks: int, step: int) -> list[int]:
    """Every ``step``-th block counted back from the last (step 5 of 30: 4, 9, ..., 29)."""
    return list(range(n_blocks - 1, -1, -step))[::-1]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def settings_of(args: Any) -> dict[str, Any]:
    """The run's budget, quick or full, with every default filled in."""
    from ladder.backbones import load_config_only, num_blocks

    quick = args.quick
    limit = args.limit or (100 if quick else 5000)
    epochs = args.epochs or (1 if quick else 3)
    n_blocks = num_blocks(load_config_only(args.backbone))[0]
    kept = kept_blocks(n_blocks, args.layer_step)
    return {
        "backbone": args.backbone,
        "task": args.task,
        "limit": limit,
        "lora_limit": args.lora_limit or limit,
        "epochs": epochs,
        "lora_epochs": args.lora_epochs or epochs,
        "seeds": _ints(args.seeds),
        "lora_seeds": _ints(args.lora_seeds or ("0" if quick else args.seeds)),
        "r": args.r,
        "lora_r": args.lora_r,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "kept_layers": kept,
        "layers": [0, *(b + 1 for b in kept)],  # the states the side network reads
        "fisher_samples": args.fisher_samples or (16 if quick else 128),
        "size_samples": args.size_samples or (50 if quick else 200),
        "threads": args.threads,
        "online_batches": args.online_batches or (2 if quick else 40),
    }


def _csv(xs: Sequence[int]) -> str:
    return ",".join(map(str, xs))


def run_children(
    s: dict[str, Any], data_dir: Path, work: Path, runner: type[Runner] = Runner
) -> dict[str, Any]:
    """Every configuration in a ``bench.baselines`` process of its own (``runner``: how a
    configuration is run; the tests run them in this process)."""
    common = ["--backbone", s["backbone"], "--data-dir", str(data_dir)]
    common += ["--batch-size", str(s["batch_size"])]
    common += ["--threads", str(s["threads"])] if s["threads"] else []
    run = runner(work, common)
    task = s["task"]
    root = work / "cache"
    data = ["--task", task, "--limit", str(s["limit"]), "--cache-root", str(root)]
    extraction = run(
        "extract",
        task,
        [
            "--method",
            "extract",
            *data,
            "--dtype",
            s["dtype"],
            "--layers",
            _csv(s["layers"]),
            "--extract-rs",
            str(s["r"]),
            "--fisher-samples",
            str(s["fisher_samples"]),
        ],
    )
    if "error" in extraction:
        return {"extract": extraction}
    lst = [*data, "--cache-key", extraction["cache_key"], "--r", str(s["r"])]
    lst += ["--kept-layers", _csv(s["kept_layers"]), "--tmp", str(work / "runs")]
    first = str(s["seeds"][0])
    out = {"extract": extraction}
    out["lst-cache"] = run(
        "lst-cache",
        task,
        ["--method", "lst-cache", *lst, "--seeds", _csv(s["seeds"]), "--one-pass"]
        + ["--epochs", str(s["epochs"])],
    )
    out["lst-cache-1"] = run(
        "lst-cache-1", task, ["--method", "lst-cache", *lst, "--seeds", first, "--epochs", "2"]
    )
    out["lst-streamed"] = run(
        "lst-streamed",
        task,
        ["--method", "lst-cache", *lst, "--seeds", first, "--epochs", "1"]
        + ["--memory-mb", str(STREAM_MB)],
    )
    out["lora"] = run(
        "lora",
        task,
        ["--method", "lora", "--task", task, "--limit", str(s["lora_limit"])]
        + ["--seeds", _csv(s["lora_seeds"]), "--epochs", str(s["lora_epochs"])]
        + ["--lora-r", str(s["lora_r"]), "--lora-alpha", str(2 * s["lora_r"])],
    )
    return out


def online_vs_cached(s: dict[str, Any], root: Path, key: str, n_train: int) -> dict[str, Any]:
    """One network (the first seed, r, kept blocks, Fisher init): a training epoch from the cache
    (the split already in RAM; the mean of two) against one with the live backbone, timed over
    ``online_batches`` batches and scaled to the epoch's batch count."""
    import torch

    from bench.train_side_speed import epoch_from_cache, epoch_online
    from ladder.backbones import load_backbone

    torch.set_num_threads(s["threads"] or 2)
    over = {
        "task.name": s["task"],
        "backbone.name": s["backbone"],
        "train_side.kept_layers": s["kept_layers"],
        "train_side.init": "fisher",
        "train_side.batch_size": s["batch_size"],
    }
    cached = [epoch_from_cache(root, key, [s["r"]], e, over)["wall_s"] for e in (1, 2)]
    backbone = load_backbone(s["backbone"])
    batches = -(-n_train // s["batch_size"])
    timed = min(s["online_batches"], batches)
    online = epoch_online(root, key, backbone, 1, timed, over, r=s["r"])
    return {
        "cached_epoch_s": sum(cached) / len(cached),
        "cached_epoch_s_all": cached,
        "online_epoch_s": online,
        "online_batches_timed": timed,
        "batches_per_epoch": batches,
        "scaled": timed < batches,
        "threads": torch.get_num_threads(),
    }


def cache_sizes(s: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """``bench.cache_size`` on the backbone: stored bytes per token per state, float16 and int8."""
    from bench import cache_size

    fig = cache_size.main(
        ["--backbone", s["backbone"], "--data-dir", str(data_dir), "--tasks", s["task"]]
        + ["--samples", str(s["size_samples"]), "--dtypes", "float16", "int8"]
        + ["--codecs", "lz4", "--reps", "1"]
    )
    res = fig["tasks"][0]
    return {
        "n_examples": res["n_examples"],
        "n_tokens": res["n_tokens"],
        "d": res["d"],
        "bytes_per_token_per_state": {
            c["dtype"]: c["bytes_per_token_per_layer"] for c in res["combinations"]
        },
        "rel_frobenius_error": {c["dtype"]: c["rel_frobenius_error"] for c in res["combinations"]},
    }


def reused(path: Path, make: Any) -> dict[str, Any]:
    """``make()``'s figures, kept at ``path`` under ``--work``: a rerun reuses them (and says so),
    as ``Runner`` reuses the children's."""
    if path.exists():
        print(f"[llm] {path.stem}: done before, reusing {path}", flush=True)
        return json.loads(path.read_text())
    fig = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fig, indent=1) + "\n")
    return fig


def first_epoch_validation(fig: dict[str, Any]) -> list[float]:
    """Each network's or seed's validation score after its first epoch (like for like where the
    methods trained different numbers of epochs)."""
    if "networks" in fig:
        return [n["epochs"][0]["validation"]["score"] for n in fig["networks"].values()]
    return [sd["history"][0]["validation"]["score"] for sd in fig.get("seeds", [])]


def ratios(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals from the children's figures (None where a child failed)."""
    lora, one, streamed, online = (
        res.get(k) for k in ("lora", "lst-cache-1", "lst-streamed", "online")
    )
    out: dict[str, Any] = {}
    if ok(lora) and ok(one):
        out["memory_abs"] = one["memory"]["abs_peak_rss"] / lora["memory"]["abs_peak_rss"]
        out["memory_above_base"] = (
            one["memory"]["peak_above_base"] / lora["memory"]["peak_above_base"]
        )
    if ok(lora) and ok(streamed):
        out["memory_streamed_abs"] = (
            streamed["memory"]["abs_peak_rss"] / lora["memory"]["abs_peak_rss"]
        )
    if ok(online):
        out["online_over_cached_epoch"] = online["online_epoch_s"] / online["cached_epoch_s"]
    if ok(lora) and ok(one):
        out["lora_epoch_s_scaled"] = lora["epoch_s"] * one["train_tokens"] / lora["train_tokens"]
        out["lora_over_cached_epoch"] = out["lora_epoch_s_scaled"] / one["epoch_s"]
    return out


def _mb(fig: dict[str, Any], key: str) -> str:
    return f"{fig['memory'][key] / MB:.0f}" if ok(fig) else "-"


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def _score(fig: dict[str, Any]) -> str:
    if not ok(fig):
        return "failed" if fig else "-"
    n = len(fig["test"])
    return f"{fig['mean']:.1f} ± {fig['std']:.1f} (n={n})" if n > 1 else f"{fig['mean']:.1f} (n=1)"


def tables(summary: dict[str, Any]) -> str:
    res, s, rat = summary["results"], summary["settings"], summary["ratios"]
    rows = []
    labels = {
        "lst-cache": f"LST from cache, {len(s['seeds'])} seeds in one pass",
        "lst-cache-1": "LST from cache, 1 network",
        "lst-streamed": f"LST from cache, 1 network, streamed ({STREAM_MB} MB)",
        "lora": "LoRA (peft, q_proj+v_proj)",
    }
    for key, label in labels.items():
        fig = res.get(key) or {}
        good = ok(fig)
        rows.append(
            [
                label,
                f"{fig['trainable_parameters'] / 1e6:.2f}M" if good else "-",
                fig.get("n_train", "-"),
                len(fig.get("epoch_s_all", [[]])[0]) if good else "-",
                _score(fig) if key in ("lst-cache", "lora") else "(not compared)",
                _mb(fig, "abs_peak_rss"),
                _mb(fig, "peak_above_base"),
                f"{fig['epoch_s']:.1f}" if good else "-",
                _mean_std(first_epoch_validation(fig)) if good else "-",
            ]
        )
    online = res.get("online") or {}
    if ok(online):
        how = (
            f"timed over {online['online_batches_timed']} of {online['batches_per_epoch']} "
            "batches and scaled"
            if online["scaled"]
            else "a whole epoch"
        )
        for label, val in (
            ("same network, epoch from the cache (same loop)", online["cached_epoch_s"]),
            (f"same network, online LST ({how})", online["online_epoch_s"]),
        ):
            rows.append([label, "", "", "", "", "", "", f"{val:.1f}", ""])
    out = [
        f"{s['backbone']} on {s['task']}: r = {s['r']}, batch {s['batch_size']}, cache "
        f"{s['dtype']}, side blocks on backbone blocks {_csv(s['kept_layers'])}",
        table(
            [
                "method",
                "trainable",
                "train ex.",
                "epochs",
                "test (mean ± std)",
                "peak RSS MB",
                "above base MB",
                "s/epoch",
                "val. after epoch 1",
            ],
            rows,
        ),
    ]
    ex = res.get("extract") or {}
    if ok(ex):
        n_states = len(s["layers"])
        per = ex["cache_bytes"] / (ex["all_tokens"] * n_states)
        out.append(
            f"\nextract ({s['dtype']}, {n_states} states, {ex['all_tokens']} tokens in 3 splits): "
            f"states {ex['extract_states_s']:.0f} s, side_init {ex['side_init_s']:.0f} s, "
            f"cache folder {ex['cache_bytes'] / MB:.1f} MB on disk (side_init weights included) = "
            f"{per:.0f} B/token/state"
        )
    lora = res.get("lora") or {}
    one = res.get("lst-cache-1") or {}
    if ok(lora) and ok(one) and lora["n_train"] != one["n_train"]:
        out.append(
            f"LoRA trained on {lora['n_train']} examples ({lora['train_tokens']} tokens); scaled "
            f"to LST's {one['train_tokens']} tokens its epoch would take "
            f"{rat['lora_epoch_s_scaled']:.0f} s (an estimate, linear in tokens)"
        )

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f} %"

    def times(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}x"

    def met(x: float | None, good: bool) -> str:
        return "-" if x is None else ("met" if good else "missed")

    m, sp = rat.get("memory_abs"), rat.get("online_over_cached_epoch")
    goals = [
        [
            "peak RSS, LST from cache / LoRA",
            pct(m),
            f"<= {GOAL_MEMORY:.0%}",
            met(m, m is not None and m <= GOAL_MEMORY),
        ],
        ["  same, above base", pct(rat.get("memory_above_base")), "", ""],
        [f"  same, streamed {STREAM_MB} MB", pct(rat.get("memory_streamed_abs")), "", ""],
        [
            "online epoch / cached epoch",
            times(sp),
            f">= {GOAL_SPEEDUP:.0f}x",
            met(sp, sp is not None and sp >= GOAL_SPEEDUP),
        ],
        ["LoRA epoch / cached epoch", times(rat.get("lora_over_cached_epoch")), "", ""],
        ["test: LST from cache", _score(res.get("lst-cache") or {}), "", ""],
        ["test: LoRA", _score(lora), "", ""],
    ]
    out += ["", table(["goal", "measured", "target", ""], goals)]
    sizes = summary.get("cache_size")
    if sizes:
        out += [
            "",
            f"bench.cache_size, {sizes['n_examples']} training examples ({sizes['n_tokens']} "
            f"tokens), d = {sizes['d']}, lz4:",
            table(
                ["dtype", "bytes/token/state", "rel. error"],
                [
                    [k, f"{v:.0f}", f"{sizes['rel_frobenius_error'][k]:.1e}"]
                    for k, v in sizes["bytes_per_token_per_state"].items()
                ],
            ),
        ]
    return "\n".join(out)


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Peak memory, time per epoch and test metric of LST from the cache, online and LoRA."""
    from bench.plots import _plt

    res = summary["results"]
    keys = [k for k in ("lst-cache-1", "lst-streamed", "lora") if ok(res.get(k))]
    if not keys:
        return None
    plt = _plt()
    names = {"lst-cache-1": "LST cache", "lst-streamed": "LST streamed", "lora": "LoRA"}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar([names[k] for k in keys], [res[k]["memory"]["abs_peak_rss"] / MB for k in keys])
    axes[0].set_ylabel("peak RSS (MB)")
    epochs = {names[k]: res[k]["epoch_s"] for k in keys if k != "lst-streamed"}
    if ok(res.get("online")):
        epochs["LST online"] = res["online"]["online_epoch_s"]
    if "lora_epoch_s_scaled" in summary["ratios"]:
        epochs["LoRA"] = summary["ratios"]["lora_epoch_s_scaled"]  # at LST's training tokens
    axes[1].bar(list(epochs), list(epochs.values()))
    axes[1].set_ylabel("seconds per epoch (LST's data)")
    axes[1].set_yscale("log")
    acc = [k for k in ("lst-cache", "lora") if ok(res.get(k))]
    axes[2].bar(
        [{"lst-cache": "LST cache", "lora": "LoRA"}[k] for k in acc],
        [res[k]["mean"] for k in acc],
        yerr=[res[k]["std"] for k in acc],
    )
    axes[2].set_ylabel("test accuracy")
    s = summary["settings"]
    fig.suptitle(f"{s['backbone']} on {s['task']}, r = {s['r']} (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    data_dir = args.data_dir if args.data_dir is not None else DEFAULT_GLUE
    s = settings_of(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="lst-bench-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    here = work / s["task"]  # the in-process figures, beside the children's JSON
    try:
        results = run_children(s, data_dir, work)
        if ok(results.get("extract")) and ok(results.get("lst-cache-1")):
            key, n_train = results["extract"]["cache_key"], results["lst-cache-1"]["n_train"]
            results["online"] = reused(
                here / f"online-b{s['online_batches']}.json",
                lambda: online_vs_cached(s, work / "cache", key, n_train),
            )
        sizes = reused(
            here / f"cache_size-{s['size_samples']}.json", lambda: cache_sizes(s, data_dir)
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {"settings": s, "results": results, "ratios": ratios(results)}
    summary["cache_size"] = sizes
    print("\n" + tables(summary))
    write_json(args.json, "llm", summary)
    if args.json is not None:
        png = plot(summary, args.json.with_suffix(".png"))
        if png is not None:
            print(f"wrote {png}")
    return summary


if __name__ == "__main__":
    main()
