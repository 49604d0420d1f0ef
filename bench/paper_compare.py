"""The paper's comparison on this machine: LST from the cache against full fine-tuning and PETL.

    python -m bench.paper_compare --quick --json bench/results/paper_compare_quick.json
    python -m bench.paper_compare --tasks rte,mrpc,cola,stsb,sst2 --limit 5000 --limit-tasks sst2 \\
        --work /data/pc --json bench/results/paper_compare.json

Per task (paper splits, max length 128, batch 100, the task's metric, seeds --seeds):
  1. stage one once, in its own process: extraction time, side_init time, cache size on disk;
  2. every method (``bench.baselines``: full, adapters, lora, bitfit, prompt, lst-online,
     lst-cache) in a process of its own, so that its peak memory is its own;
  3. from that one cache (sweeps): reduction factors 4/8/16/32 in one train_side pass (their
     memory from one-epoch probes, a process each, on --memory-task), layer dropping (all,
     [1,2,3,5], [1,3,5], [1,5]), fusion (ladder, late, none) and initialisation (random,
     magnitude, Fisher at r = 8 and 32).
Then Table-1-like markdown tables, the time to a result (extraction once + N epochs from the
cache against N epochs of online LST, LoRA and full fine-tuning, from the measured epoch and
extraction times), an estimate of a full run's time from this run's rates, and PNGs (accuracy
against memory, ablations, time to result). OUT.json holds everything; OUT.md the tables;
OUT_*.png the figures. ``--work DIR`` keeps every configuration's JSON and the caches: a run
killed part way resumes there, skipping what is done.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.baselines import HPARAMS, METHODS
from bench.common import DEFAULT_GLUE, REPO, parser, write_json

ALL_TASKS = ["rte", "mrpc", "sst2", "cola", "stsb"]
SWEEPS = ("r", "layers", "fusion", "init")
SWEEP_RS = [4, 8, 16, 32]
INIT_RS = [8, 32]
# kept side layers for 6 backbone blocks: every fourth dropped (the authors' base script drops
# 0, 4, 8 of 12), every other kept (the paper's "2nd, 4th, 6th"), every fourth kept counting back
# from the last block (the authors' [3, 7, 11] of 12)
LAYER_VARIANTS: dict[str, list[int] | None] = {
    "all": None,
    "1,2,3,5": [1, 2, 3, 5],
    "1,3,5": [1, 3, 5],
    "1,5": [1, 5],
}
FUSIONS = ("ladder", "late", "none")
INITS = ("random", "magnitude", "fisher")
MB = 2**20


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# --- running one configuration ---------------------------------------------------------------------


class Runner:
    """Runs ``bench.baselines`` children, ``jobs`` at a time; their JSONs in ``work`` are reused
    when present, so a killed run resumes where it stopped."""

    def __init__(self, work: Path, common: list[str], jobs: int = 1) -> None:
        self.work, self.common, self.jobs = work, common, jobs

    def __call__(
        self, name: str, task: str, args: list[str], env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        out = self.work / task / f"{name}.json"
        if out.exists():
            print(f"[paper_compare] {task} {name}: done before, reusing {out}", flush=True)
            return json.loads(out.read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(args, out)
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        print(f"[paper_compare] {task} {name}: {shown} {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}).returncode
        if rc != 0 or not out.exists():
            print(f"[paper_compare] {task} {name} FAILED (exit {rc})", flush=True)
            return {"error": f"exit {rc}", "command": " ".join(cmd[1:])}
        return json.loads(out.read_text())

    def command(self, args: list[str], out: Path) -> list[str]:
        """The child's command line: the run's own options last, so that they override the
        common ones (the streamed probe's ``--memory-mb``)."""
        return [sys.executable, "-m", "bench.baselines", *self.common, *args, "--json", str(out)]

    def many(self, runs: list[Run]) -> list[dict[str, Any]]:
        """Every run, ``jobs`` processes at a time, results in the order given."""
        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(lambda r: self(r.name, r.task, r.args, r.env), runs))


@dataclass
class Run:
    """One child process: its result lands at ``results[task]`` under ``where``."""

    task: str
    name: str
    args: list[str]
    where: tuple[str, ...]
    env: dict[str, str] | None = None


# Measuring memory: glibc keeps freed pages (per-thread arenas, a trim threshold), so a process's
# peak RSS overstates what it used by an amount that differs per method. With every allocation
# over 64 KiB mapped on its own and returned when freed, peak RSS follows the live bytes, as
# torch.cuda.max_memory_allocated does on a GPU. It costs time, so only the probes run this way.
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
STREAM_MB = 16  # the streamed LST probe: a 16 MB shuffle buffer instead of whole splits in RAM


def data_args(task: str, args: Any) -> list[str]:
    if args.limit and (task in args.limit_tasks or "all" in args.limit_tasks):
        return ["--task", task, "--limit", str(args.limit)]
    return ["--task", task]


def plan_task(task: str, args: Any, cache_key: str | None) -> list[Run]:
    """The runs of one task once its cache exists: methods, sweeps, memory probes."""
    data = data_args(task, args)
    base = [*data, "--seeds", args.seeds, "--batch-size", str(args.batch_size)]
    base += ["--epochs", str(args.epochs)] if args.epochs else []
    base += ["--warmup-steps", str(args.warmup_steps)] if args.warmup_steps is not None else []
    cache = ["--cache-key", cache_key] if cache_key else []
    methods = list(args.methods)
    if args.sweeps and "lst-cache" not in methods:
        methods.append("lst-cache")  # the ablations' default arm
    runs = [
        Run(task, m, ["--method", m, *base, *(cache if "lst" in m else [])], ("methods", m))
        for m in methods
    ]
    if not cache_key:
        return runs
    lstc = ["--method", "lst-cache", *base, *cache]
    first_seed = args.seeds.split(",")[0]
    if "r" in args.sweeps:
        sweep = [*lstc, "--r", ",".join(map(str, SWEEP_RS)), "--one-pass"]
        runs.append(Run(task, "sweep-r", sweep, ("sweeps", "r")))
        if task == args.memory_task:  # one network per process: its memory alone
            probe = ["--method", "lst-cache", *data, *cache, "--seeds", first_seed, "--epochs", "1"]
            env = LIVE_MALLOC if args.memory_probes else None  # as the methods' probes
            runs += [
                Run(
                    task,
                    f"probe-r{r}",
                    [*probe, "--r", str(r)],
                    ("sweeps", "r_memory", str(r)),
                    env,
                )
                for r in SWEEP_RS
            ]
    if "layers" in args.sweeps:
        runs += [
            Run(task, f"layers-{n.replace(',', '')}", [*lstc, "--kept-layers", n], ("layers", n))
            for n, kept in args.layer_variants.items()
            if kept is not None
        ]
    if "fusion" in args.sweeps:
        runs += [
            Run(task, f"fusion-{f}", [*lstc, "--fusion", f], ("fusion", f))
            for f in args.fusions
            if f != "ladder"
        ]
    if "init" in args.sweeps:
        rs = ",".join(map(str, args.init_rs))
        runs += [
            Run(task, f"init-{i}", [*lstc, "--init", i, "--r", rs, "--one-pass"], ("init", i))
            for i in INITS
        ]
    if args.memory_probes and task == args.memory_task:
        # one epoch of one seed at the paper's batch size, freed memory returned at once
        probe = [*data, "--seeds", first_seed, "--epochs", "1", "--batch-size", "100"]
        for m in args.methods:
            runs.append(
                Run(
                    task,
                    f"live-{m}",
                    ["--method", m, *probe, *(cache if "lst" in m else [])],
                    ("memory_probes", m),
                    LIVE_MALLOC,
                )
            )
        if "lst-cache" in args.methods:
            streamed = ["--method", "lst-cache", *probe, *cache, "--memory-mb", str(STREAM_MB)]
            runs.append(
                Run(
                    task,
                    "live-lst-cache-streamed",
                    streamed,
                    ("memory_probes", STREAMED),
                    LIVE_MALLOC,
                )
            )
    return runs


STREAMED = "lst-cache, streamed"


def run_tasks(tasks: list[str], args: Any, run: Runner) -> dict[str, dict[str, Any]]:
    """Stage one for every task first (LST needs its cache), then everything else, in parallel."""
    out: dict[str, dict[str, Any]] = {t: {"methods": {}, "sweeps": {}} for t in tasks}
    lst = any(m.startswith("lst") for m in args.methods) or bool(args.sweeps)
    keys: dict[str, str | None] = dict.fromkeys(tasks)
    if lst:
        extracts = [
            Run(t, "extract", ["--method", "extract", *data_args(t, args)], ("extract",))
            for t in tasks
        ]
        for r, ex in zip(extracts, run.many(extracts), strict=True):
            out[r.task]["extract"] = ex
            keys[r.task] = None if "error" in ex else ex["cache_key"]
    runs = [r for t in tasks for r in plan_task(t, args, keys[t])]
    for r, fig in zip(runs, run.many(runs), strict=True):
        node = out[r.task]
        if r.where[0] in ("layers", "fusion", "init"):
            node = node["sweeps"]
        for k in r.where[:-1]:
            node = node.setdefault(k, {})
        node[r.where[-1]] = fig
    for t in tasks:  # the ablations' default arm is the main LST run
        sw, main = out[t]["sweeps"], out[t]["methods"].get("lst-cache")
        if "layers" in sw and main:
            sw["layers"] = {"all": main, **sw["layers"]}
        if "fusion" in sw and main:
            sw["fusion"] = {"ladder": main, **sw["fusion"]}
    return out


# --- derived figures ------------------------------------------------------------------------------------


def ok(fig: dict[str, Any] | None) -> bool:
    return bool(fig) and "error" not in fig


def mean_over_tasks(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals and len(vals) == len(values) else None


def epochs_time(fig: dict[str, Any], n: int) -> float:
    """Seconds for n training epochs: the first epoch as measured, the later ones at the median."""
    first = fig["epoch_s_first"]
    return first + (n - 1) * (fig["epoch_s"] if fig["epoch_s"] is not None else first)


def side_init_one_s(ex: dict[str, Any]) -> float:
    """Seconds of the side_init one LST run needs: the Fisher pass and one (r, method) pruning.

    The bench's extraction prunes every r and method the sweeps use; each pruning does the same
    work, so one run's share is their mean. Without a separate Fisher time: all of side_init.
    """
    pairs = sum(len(v) for v in ex.get("side_init", {}).values())
    if ex.get("fisher_s") is None or pairs == 0:
        return ex["side_init_s"]
    return ex["fisher_s"] + (ex["side_init_s"] - ex["fisher_s"]) / pairs


def time_to_result(task_res: dict[str, Any], ns: list[int]) -> dict[str, dict[int, float]]:
    """Seconds to a model after N epochs, from measured epoch and extraction times (not run).

    cache: extraction of the states + side_init (Fisher, pruning at r = 8) + N epochs from the
    cache; online LST: the same side_init (its Fisher init) + N epochs with the live backbone;
    LoRA, full: N epochs.
    """
    ex, meth = task_res.get("extract"), task_res["methods"]
    out: dict[str, dict[int, float]] = {}
    init = side_init_one_s(ex) if ok(ex) else 0.0
    if ok(ex) and ok(meth.get("lst-cache")):
        once = ex["extract_states_s"] + init
        out["lst-cache"] = {n: once + epochs_time(meth["lst-cache"], n) for n in ns}
    if ok(ex) and ok(meth.get("lst-online")):
        out["lst-online"] = {n: init + epochs_time(meth["lst-online"], n) for n in ns}
    for m in ("lora", "full"):
        if ok(meth.get(m)):
            out[m] = {n: epochs_time(meth[m], n) for n in ns}
    return out


def time_to_result_full(
    task_res: dict[str, Any], size: dict[str, int], ns: list[int]
) -> dict[str, dict[int, float]]:
    """``time_to_result`` for the task's full splits, scaled from this run's rates per token.

    A run with ``--limit`` on every split extracts as many validation and test examples as
    training ones, which a full run does not; scaled per token, extraction covers all three
    full splits and each epoch the full training split. Fisher's 1024 examples do not scale.
    """
    ex, meth = task_res.get("extract"), task_res["methods"]
    if not ok(ex):
        return {}
    all_tokens = size["train_tokens"] + size["validation_tokens"] + size["test_tokens"]
    once = ex["extract_states_s"] / ex["all_tokens"] * all_tokens
    init = side_init_one_s(ex)
    out: dict[str, dict[int, float]] = {}
    for m, start in (
        ("lst-cache", once + init),
        ("lst-online", init),
        ("lora", 0.0),
        ("full", 0.0),
    ):
        fig = meth.get(m)
        if ok(fig):
            per_epoch = fig["epoch_s"] or fig["epoch_s_first"]
            scale = size["train_tokens"] / fig["train_tokens"]
            out[m] = {n: start + n * per_epoch * scale for n in ns}
    return out


def full_train_tokens(tasks: list[str], data: Path) -> dict[str, dict[str, int]]:
    """Tokens and examples of each task's full training split (the estimate's scale)."""
    from transformers import AutoTokenizer

    from bench.baselines import encode_split
    from ladder.backbones import resolve_backbone
    from stages.tasks import load_task

    tok = AutoTokenizer.from_pretrained(resolve_backbone("minilm-l6"))
    out = {}
    for t in tasks:
        splits = load_task(t, data_dir=data).splits
        enc = {s: encode_split(tok, ex, 128) for s, ex in splits.items()}
        out[t] = {
            "train_tokens": enc["train"].n_tokens,
            "validation_tokens": enc["validation"].n_tokens,
            "test_tokens": enc["test"].n_tokens,
            "n_train": len(enc["train"].ids),
        }
    return out


def estimate_full(
    results: dict[str, Any], mem_task: str, sizes: dict[str, dict[str, int]], seeds: int
) -> dict[str, dict[str, float]]:
    """Hours of a full run per task and method at ``seeds`` seeds and the paper's epochs.

    From this run's rates on ``mem_task``: training seconds per training token (the epoch
    times) and the rest of a seed's run (evaluations, checkpoints) per evaluated token, scaled
    to each task's full splits. Rough: short-sequence tasks cost less per token than RTE, and
    the rates of a small run carry its fixed costs.
    """
    from stages.tasks import paper_epochs

    res = results[mem_task]
    meth = res["methods"]
    out: dict[str, dict[str, float]] = {}
    for task, size in sizes.items():
        epochs = paper_epochs(task)
        row: dict[str, float] = {}
        for m, fig in meth.items():
            if not ok(fig):
                continue
            n_epochs = len(fig["epoch_s_all"][0])
            train_s = sum(fig["epoch_s_all"][0])
            ev = fig["eval_tokens"]
            eval_rate = max(0.0, fig["run_s_per_seed"] - train_s) / (
                n_epochs * ev["validation"] + ev["test"]
            )
            per_seed = epochs * fig["epoch_s"] / fig["train_tokens"] * size["train_tokens"]
            per_seed += eval_rate * (epochs * size["validation_tokens"] + size["test_tokens"])
            row[m] = per_seed * seeds / 3600
        ex = res.get("extract")
        if ok(ex) and "lst-cache" in row:
            fisher = min(1024, size["n_train"]) / max(1, min(1024, meth["lst-cache"]["n_train"]))
            all_tokens = size["train_tokens"] + size["validation_tokens"] + size["test_tokens"]
            once = ex["extract_states_s"] / ex["all_tokens"] * all_tokens
            row["extract (once)"] = (once + ex["side_init_s"] * fisher) / 3600
            # sweeps: r (12 networks in one pass), layers (9), fusion (6), init (18), r probes:
            # about 15 three-seed rows of lst-cache
            row["sweeps (all four)"] = 15 * row["lst-cache"]
        out[task] = row
    return out


# --- tables -----------------------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def score(fig: dict[str, Any] | None) -> str:
    return f"{fig['mean']:.1f} ± {fig['std']:.1f}" if ok(fig) else "failed" if fig else "–"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def pct(fig: dict[str, Any]) -> str:
    return f"{100 * fig['trainable_parameters'] / fig['backbone_parameters']:.2f}"


def tables(summary: dict[str, Any]) -> str:
    results, tasks, mem_task = summary["results"], summary["tasks"], summary["memory_task"]
    methods = summary["methods"]
    parts = [f"# Paper comparison on this machine\n\n`{summary['command']}`\n"]
    rows = []
    for m in methods:
        mt = results[mem_task]["methods"].get(m)
        figs = [results[t]["methods"].get(m) for t in tasks]
        avg = mean_over_tasks([f["mean"] if ok(f) else None for f in figs])
        mem = mt["memory"] if ok(mt) else None
        rows.append(
            [
                m,
                pct(mt) if ok(mt) else "–",
                fmt(mem and mem["peak_above_base"] / MB, ".0f"),
                fmt(mt.get("cache_in_ram_bytes", 0) / MB, ".0f")
                if ok(mt) and m == "lst-cache"
                else "",
                fmt(mem and mem["abs_peak_rss"] / MB, ".0f"),
                fmt(mt["epoch_s"] if ok(mt) else None),
                *[score(f) for f in figs],
                fmt(avg),
            ]
        )
    parts.append(
        f"## Table 1 (test metric x100, mean ± std over seeds {summary['seeds']}; memory and "
        f"time on {mem_task}; LST's memory includes the cached states its loaders hold in RAM)"
        "\n\n"
        + md_table(
            [
                "method",
                "trainable %",
                "train memory MB (peak − base)",
                "of which cached states MB",
                "abs peak RSS MB",
                "s / epoch",
                *tasks,
                "avg",
            ],
            rows,
        )
    )
    parts.append(
        "## Seconds per training epoch\n\n"
        + md_table(
            ["method", *tasks],
            [
                [
                    m,
                    *[
                        fmt(results[t]["methods"][m]["epoch_s"])
                        if ok(results[t]["methods"].get(m))
                        else "–"
                        for t in tasks
                    ],
                ]
                for m in methods
            ],
        )
    )
    ex_rows = []
    for t in tasks:
        ex = results[t].get("extract")
        if ok(ex):
            ex_rows.append(
                [
                    t,
                    ex["train_tokens"],
                    fmt(ex["extract_states_s"]),
                    fmt(ex["side_init_s"]),
                    fmt(ex.get("fisher_s")),
                    fmt(side_init_one_s(ex)),
                    fmt(ex["cache_bytes"] / MB),
                    fmt(ex["memory"]["abs_peak_rss"] / MB, ".0f"),
                ]
            )
    if ex_rows:
        parts.append(
            "## LST from the cache: the one-off extraction (all splits, float16/lz4; side_init ="
            " magnitude + Fisher pruning for every r the sweeps use; one run needs the Fisher pass"
            " and one pruning)\n\n"
            + md_table(
                [
                    "task",
                    "train tokens",
                    "states s",
                    "side_init s (all)",
                    "of which Fisher s",
                    "one run's side_init s",
                    "cache MB on disk",
                    "peak RSS MB",
                ],
                ex_rows,
            )
        )
    parts += probe_tables(summary)
    parts += sweep_tables(summary)
    ttr_rows = []
    for t in tasks:
        ttr = time_to_result(results[t], [1, 10, 20])
        for m, v in ttr.items():
            base = ttr.get("lst-cache")
            ratio = fmt(v[10] / base[10], ".2f") if base and m != "lst-cache" else ""
            ttr_rows.append([t, m, *[fmt(v[n] / 60) for n in (1, 10, 20)], ratio])
    if ttr_rows:
        parts.append(
            "## Time to a result, minutes (computed from the measured epoch and extraction times, "
            "not run; lst-cache = extraction + one run's side_init + N epochs, lst-online = the "
            "same side_init + N epochs)\n\n"
            + md_table(
                ["task", "method", "N = 1", "N = 10", "N = 20", "N = 10 against lst-cache"],
                ttr_rows,
            )
        )
    full_rows = []
    for t in tasks:
        ttr = summary.get("time_to_result_full_splits", {}).get(t, {})
        for m, v in ttr.items():
            row = [t, m, *[fmt(v[n] / 60) for n in (1, 10, 20)]]
            base = ttr.get("lst-cache")
            row.append(fmt(v[10] / base[10], ".2f") if base and m != "lst-cache" else "")
            full_rows.append(row)
    if full_rows:
        parts.append(
            "## Time to a result on the full splits, minutes (estimated: this run's seconds per "
            "token scaled to each task's full train, validation and test splits; one run's "
            "side_init as measured)\n\n"
            + md_table(
                ["task", "method", "N = 1", "N = 10", "N = 20", "N = 10 against lst-cache"],
                full_rows,
            )
        )
    est = summary.get("estimate_full")
    if est:
        cols = sorted({k for row in est.values() for k in row}, key=lambda k: (k not in methods, k))
        parts.append(
            f"## Estimated hours of a full run ({summary['estimate_seeds']} seeds, paper epochs, "
            f"full training splits), scaled from this run's rates on {mem_task}\n\n"
            + md_table(
                ["task", *cols], [[t, *[fmt(row.get(c)) for c in cols]] for t, row in est.items()]
            )
        )
    parts.append("## Settings\n\n" + settings_table())
    return "\n\n".join(parts) + "\n"


def memory_ratios(summary: dict[str, Any]) -> dict[str, float]:
    """Each probe's peak training memory as a fraction of full fine-tuning's (live-bytes probes)."""
    probes = summary["results"][summary["memory_task"]].get("memory_probes", {})
    full = probes.get("full")
    if not ok(full):
        return {}
    ref = full["memory"]["peak_above_base"]
    return {m: f["memory"]["peak_above_base"] / ref for m, f in probes.items() if ok(f)}


def probe_tables(summary: dict[str, Any]) -> list[str]:
    mem_task = summary["memory_task"]
    probes = summary["results"][mem_task].get("memory_probes", {})
    if not probes:
        return []
    ratios = memory_ratios(summary)
    rows = [
        [
            m,
            fmt(f["memory"]["peak_above_base"] / MB, ".0f") if ok(f) else "failed",
            fmt(100 * ratios[m], ".0f") if m in ratios else "–",
            fmt(f["memory"]["abs_peak_rss"] / MB, ".0f") if ok(f) else "–",
            fmt(f.get("cache_in_ram_bytes", 0) / MB, ".0f") if ok(f) and "lst-cache" in m else "",
        ]
        for m, f in probes.items()
    ]
    return [
        f"## Peak training memory with freed memory returned at once ({mem_task}, batch 100, one "
        f"epoch of seed {summary['seeds'].split(',')[0]}; glibc {', '.join(f'{k}={v}' for k, v in LIVE_MALLOC.items())}"
        f" so that peak RSS follows live bytes; '{STREAMED}' reads through a {STREAM_MB} MB "
        "shuffle buffer instead of holding the splits)\n\n"
        + md_table(
            [
                "method",
                "train memory MB (peak − base)",
                "% of full FT",
                "abs peak RSS MB",
                "cached states in RAM MB",
            ],
            rows,
        )
    ]


def sweep_avg(results: dict[str, Any], tasks: list[str], pick: Any) -> float | None:
    vals = []
    for t in tasks:
        try:
            vals.append(pick(results[t]["sweeps"]))
        except (KeyError, TypeError):
            vals.append(None)
    return mean_over_tasks(vals)


def sweep_tables(summary: dict[str, Any]) -> list[str]:
    results, tasks, mem_task = summary["results"], summary["tasks"], summary["memory_task"]
    sw = results[mem_task]["sweeps"]
    parts = []
    if "r" in sw and ok(sw["r"]):
        rows = []
        for r in SWEEP_RS:
            probe = sw.get("r_memory", {}).get(str(r))
            by = sw["r"]["by_r"][str(r)]
            rows.append(
                [
                    r,
                    f"{100 * by['trainable_parameters'] / sw['r']['backbone_parameters']:.2f}",
                    fmt(probe["memory"]["peak_above_base"] / MB, ".0f") if ok(probe) else "–",
                    fmt(probe["epoch_s_first"]) if ok(probe) else "–",
                    fmt(sweep_avg(results, tasks, lambda s, r=r: s["r"]["by_r"][str(r)]["mean"])),
                ]
            )
        parts.append(
            "## Reduction factor (Fig. 5): one train_side pass from one cache; memory from a "
            f"one-network, one-epoch probe on {mem_task}\n\n"
            + md_table(
                ["r", "trainable %", "train memory MB", "s / epoch (probe)", "avg test"], rows
            )
        )
    for key, title in (
        ("layers", "Layer dropping (Fig. 6), r = 8, kept side layers"),
        ("fusion", "Fusion (Fig. 8), r = 8"),
    ):
        if key not in sw:
            continue
        rows = []
        for name, fig in sw[key].items():
            rows.append(
                [
                    name,
                    pct(fig) if ok(fig) else "–",
                    fmt(fig["memory"]["peak_above_base"] / MB, ".0f") if ok(fig) else "–",
                    fmt(fig["epoch_s"]) if ok(fig) else "–",
                    fmt(sweep_avg(results, tasks, lambda s, k=key, n=name: s[k][n]["mean"])),
                ]
            )
        parts.append(
            f"## {title}\n\n"
            + md_table(
                [key, "trainable %", f"train memory MB ({mem_task})", "s / epoch", "avg test"], rows
            )
        )
    if "init" in sw:
        rows = [
            [
                i,
                *[
                    fmt(
                        sweep_avg(
                            results, tasks, lambda s, i=i, r=r: s["init"][i]["by_r"][str(r)]["mean"]
                        )
                    )
                    for r in summary["init_rs"]
                ],
            ]
            for i in INITS
        ]
        parts.append(
            "## Initialisation (Fig. 7): avg test\n\n"
            + md_table(["init", *[f"r = {r}" for r in summary["init_rs"]]], rows)
        )
    return parts


def settings_table() -> str:
    rows = [
        [
            m,
            f"{hp['lr']:g}",
            ", ".join(f"{k} {v}" for k, v in hp.items() if k not in ("lr", "source")),
            hp["source"],
        ]
        for m, hp in HPARAMS.items()
    ]
    return (
        md_table(["method", "lr", "settings", "why"], rows)
        + "\n\nAll: batch 100, AdamW (wd 0, eps 1e-8), linear warm-up (the authors' 500 steps, "
        "capped at a tenth of the run) and decay, clip 1.0, max length 128, best validation "
        "epoch scored on test. In-backbone methods train the BERT head (pooler + classifier); "
        "LST: r = 8, Fisher init, all layers, ladder fusion unless stated."
    )


# --- main ---------------------------------------------------------------------------------------------


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(ALL_TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=None, help="default: paper (20 small, 10 large)")
    p.add_argument("--limit", type=int, default=None, help="examples per split, on --limit-tasks")
    p.add_argument("--limit-tasks", default="sst2", help="tasks --limit applies to, or 'all'")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sweeps", default=",".join(SWEEPS), help="r,layers,fusion,init or none")
    p.add_argument("--memory-task", default=None, help="default: rte when run, else the first")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument(
        "--memory-mb",
        type=int,
        default=4096,
        help="LST from the cache: RAM for a split's states (train_side.memory_mb)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="default: the authors' 500, capped at a tenth of each run (500: exactly theirs)",
    )
    p.add_argument("--batch-size", type=int, default=100, help="training batch (paper: 100)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="children at once; with more than 1 each gets cpu_count/jobs threads",
    )
    p.add_argument(
        "--no-memory-probes",
        dest="memory_probes",
        action="store_false",
        help="skip the one-epoch probes of each method's memory with freed memory returned",
    )
    p.add_argument("--work", type=Path, default=None, help="keep per-configuration JSONs here")
    args = p.parse_args()
    args.layer_variants, args.fusions, args.init_rs = LAYER_VARIANTS, FUSIONS, INIT_RS
    if args.quick:  # a smoke run of every path: one task, 50 examples, fewer ablation variants
        args.tasks, args.limit, args.limit_tasks = "rte", args.limit or 50, "all"
        args.epochs, args.seeds = args.epochs or 1, "0"
        args.layer_variants = {k: LAYER_VARIANTS[k] for k in ("all", "1,3,5")}
        args.fusions, args.init_rs = ("ladder", "none"), [8]
    from stages.tasks import TASKS

    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        fail(f"unknown task {bad[0] if bad else ''!r}; allowed: {', '.join(TASKS)}")
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        fail(f"unknown method {bad[0] if bad else ''!r}; allowed: {', '.join(METHODS)}")
    args.sweeps = [] if args.sweeps == "none" else [s for s in args.sweeps.split(",") if s]
    bad = [s for s in args.sweeps if s not in SWEEPS]
    if bad:
        fail(f"unknown sweep {bad[0]!r}; allowed: {', '.join(SWEEPS)}, or none")
    for name in ("jobs", "batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')}={getattr(args, name)}; allowed: an integer >= 1")
    args.limit_tasks = set(args.limit_tasks.split(","))
    args.memory_task = args.memory_task or ("rte" if "rte" in tasks else tasks[0])
    if args.memory_task not in tasks:
        fail(f"--memory-task {args.memory_task!r} is not among --tasks {','.join(tasks)}")
    data = args.data_dir if args.data_dir is not None else DEFAULT_GLUE
    if not data.is_dir():
        fail(f"GLUE data folder {data} does not exist; pass --data-dir")
    work = args.work or Path(tempfile.mkdtemp(prefix="paper-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = ("json", "work", "data_dir", "quick")
    settings = {k: v for k, v in vars(args).items() if k not in skip}
    settings = json.loads(json.dumps(settings, default=sorted))  # as it reads back from disk
    mark = work / "settings.json"
    if mark.exists() and json.loads(mark.read_text()) != settings:
        fail(f"work folder {work} holds a run with other settings; choose another --work")
    mark.write_text(json.dumps(settings, indent=1))
    common = [
        "--backbone",
        args.backbone,
        "--data-dir",
        str(data),
        "--cache-root",
        str(work / "cache"),
        "--tmp",
        str(work / "tmp"),
        "--memory-mb",
        str(args.memory_mb),
    ]
    if args.jobs > 1:  # the cores shared out: every child gets the same number of threads
        common += ["--threads", str(max(1, (os.cpu_count() or 2) // args.jobs))]
    run = Runner(work, common, args.jobs)
    results = run_tasks(tasks, args, run)
    summary: dict[str, Any] = {
        "tasks": tasks,
        "methods": args.methods,
        "seeds": args.seeds,
        "epochs": args.epochs or "paper (20 small tasks, 10 others)",
        "limit": {
            t: args.limit for t in tasks if t in args.limit_tasks or "all" in args.limit_tasks
        }
        if args.limit
        else {},
        "memory_task": args.memory_task,
        "memory_measure": "peak RSS of the training phase above the RSS once model and data are loaded",
        "hparams": HPARAMS,
        "layer_variants": args.layer_variants,
        "init_rs": args.init_rs,
        "results": results,
    }
    import peft

    from bench.common import command

    summary["command"] = command()
    summary["peft"] = peft.__version__
    summary["load_average_at_end"] = os.getloadavg()  # the machine is shared: how busy it was
    summary["estimate_seeds"] = 3
    sizes = full_train_tokens(ALL_TASKS, data)
    summary["estimate_full"] = estimate_full(results, args.memory_task, sizes, 3)
    summary["time_to_result"] = {t: time_to_result(results[t], list(range(1, 21))) for t in tasks}
    summary["time_to_result_full_splits"] = {
        t: time_to_result_full(results[t], sizes[t], list(range(1, 21))) for t in tasks
    }
    md = tables(summary)
    print("\n" + md)
    if args.json:
        from bench.plots import plot_all

        pngs = plot_all(summary, args.json.with_suffix(""))
        summary["figures"] = [str(p) for p in pngs]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.with_suffix(".md").write_text(md)
        write_json(args.json, "paper_compare", summary)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
