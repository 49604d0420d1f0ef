"""Figures of ``bench.paper_compare``: accuracy against memory, ablations, time to a result.

    python -m bench.plots bench/results/paper_compare_quick.json    # redraw from the JSON

Writes ``<stem>_accuracy_memory.png`` (Figures 1/5/6 of the paper), ``<stem>_ablations.png``
(Figures 6, 7, 8) and ``<stem>_time_to_result.png`` beside the JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

MB = 2**20
LABELS = {
    "full": "Full fine-tuning",
    "adapters": "Adapters",
    "lora": "LoRA",
    "bitfit": "BitFit",
    "prompt": "Prompt tuning",
    "lst-online": "LST online",
    "lst-cache": "LST from cache",
}
COLORS = {
    "full": "tab:gray",
    "adapters": "tab:orange",
    "lora": "tab:green",
    "bitfit": "tab:purple",
    "prompt": "tab:brown",
    "lst-online": "tab:cyan",
    "lst-cache": "tab:blue",
}


def _ok(fig: Any) -> bool:
    return isinstance(fig, dict) and "error" not in fig and fig.get("mean") is not None


def _avg(summary: dict[str, Any], pick: Any) -> float | None:
    """The mean over tasks of ``pick(task result)``; None if any task lacks it."""
    vals = []
    for t in summary["tasks"]:
        try:
            v = pick(summary["results"][t])
        except (KeyError, TypeError):
            return None
        if v is None:
            return None
        vals.append(v)
    return statistics.mean(vals) if vals else None


def _metric_label(summary: dict[str, Any]) -> str:
    tasks = summary["tasks"]
    return (
        f"test metric x100, {tasks[0]}"
        if len(tasks) == 1
        else f"avg test metric over {len(tasks)} tasks"
    )


def _plt() -> Any:  # matplotlib without a display
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_memory(summary: dict[str, Any], path: Path) -> Path:
    """Figure 1/5: each method as a point; the LST r sweep and layer dropping as lines."""
    plt = _plt()
    mem_task = summary["memory_task"]
    res = summary["results"][mem_task]
    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    live = res.get("memory_probes", {})  # freed memory returned at once: peak RSS ~ live bytes
    for m in [*summary["methods"], *(["lst-cache, streamed"] if "lst-cache" in live else [])]:
        acc = m.split(",")[0]  # the streamed probe scores as the main LST run
        f = live.get(m) if live else res["methods"].get(m)
        y = _avg(
            summary, lambda r, a=acc: r["methods"][a]["mean"] if _ok(r["methods"][a]) else None
        )
        if not isinstance(f, dict) or "error" in f or y is None:
            continue
        x = f["memory"]["peak_above_base"] / MB
        streamed = m != acc
        ax.scatter(
            [x],
            [y],
            s=90,
            color=COLORS[acc],
            label=LABELS[acc] + (", streamed (16 MB buffer)" if streamed else ""),
            zorder=3,
            edgecolor="black",
            marker="D" if streamed else "o",
        )
    sw = res.get("sweeps", {})
    probes = sw.get("r_memory", {})
    pts = []
    for r, probe in sorted(probes.items(), key=lambda kv: int(kv[0])):
        y = _avg(summary, lambda t, r=r: t["sweeps"]["r"]["by_r"][r]["mean"])
        if _ok(probe) and y is not None:
            pts.append((probe["memory"]["peak_above_base"] / MB, y, r))
    if pts:
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            "o--",
            color="tab:blue",
            alpha=0.7,
            label="LST from cache, r = 4/8/16/32",
        )
        for k, (x, y, r) in enumerate(pts):  # alternately above and below: points lie close
            off = (4, 6 if k % 2 == 0 else -12)
            ax.annotate(f"r={r}", (x, y), textcoords="offset points", xytext=off, fontsize=8)
    pts = []
    for name, f in sw.get("layers", {}).items():
        y = _avg(summary, lambda t, n=name: t["sweeps"]["layers"][n]["mean"])
        if _ok(f) and y is not None:
            pts.append((f["memory"]["peak_above_base"] / MB, y, name))
    if pts:
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            "s:",
            color="tab:red",
            alpha=0.7,
            label="LST from cache, layer dropping (r = 8)"
            + (": memory of the training runs, default malloc" if live else ""),
        )
        for x, y, name in pts:
            ax.annotate(
                name,
                (x, y),
                textcoords="offset points",
                xytext=(-6, 8),  # above left; the r labels go right
                ha="right",
                fontsize=8,
                color="tab:red",
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(
        xlabel=f"peak training memory above base, MB ({mem_task}, CPU RSS"
        + (", freed memory returned at once" if live else "")
        + "; log scale)",
        ylabel=_metric_label(summary),
        title="Accuracy against training memory (paper Fig. 1/5/6), MiniLM-L6 on CPU",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablations(summary: dict[str, Any], path: Path) -> Path:
    """Figures 6, 7, 8 from one cache: layer dropping, initialisation, fusion."""
    plt = _plt()
    sw = summary["results"][summary["memory_task"]].get("sweeps", {})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    a, b, c = axes
    names = list(sw.get("layers", {}))
    ys = [_avg(summary, lambda t, n=n: t["sweeps"]["layers"][n]["mean"]) for n in names]
    mems = [
        sw["layers"][n]["memory"]["peak_above_base"] / MB if _ok(sw["layers"][n]) else None
        for n in names
    ]
    for n, y, m in zip(names, ys, mems, strict=True):
        if y is not None:
            a.bar(n, y, color="tab:red", alpha=0.7)
            a.annotate(
                f"{y:.1f}\n{m:.0f} MB" if m else f"{y:.1f}",
                (n, y),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    a.set(
        title="Layer dropping (Fig. 6), r = 8",
        xlabel="kept side layers (of 0..5)",
        ylabel=_metric_label(summary),
    )
    inits = list(sw.get("init", {}))
    rs = [str(r) for r in summary.get("init_rs", [8, 32])]
    width = 0.38
    for k, r in enumerate(rs):
        ys = [
            _avg(summary, lambda t, i=i, r=r: t["sweeps"]["init"][i]["by_r"][r]["mean"])
            for i in inits
        ]
        xs = [j + (k - (len(rs) - 1) / 2) * width for j in range(len(inits))]
        bars = b.bar(xs, [y or 0 for y in ys], width, label=f"r = {r}")
        for bar, y in zip(bars, ys, strict=True):
            if y is not None:
                b.annotate(
                    f"{y:.1f}",
                    (bar.get_x() + bar.get_width() / 2, y),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    b.set_xticks(range(len(inits)), inits)
    b.set(title="Initialisation (Fig. 7)", xlabel="side network init")
    b.legend(fontsize=8)
    fus = list(sw.get("fusion", {}))
    ys = [_avg(summary, lambda t, f=f: t["sweeps"]["fusion"][f]["mean"]) for f in fus]
    for f, y in zip(fus, ys, strict=True):
        if y is not None:
            c.bar(f, y, color="tab:blue", alpha=0.7)
            c.annotate(f"{y:.1f}", (f, y), ha="center", va="bottom", fontsize=8)
    c.set(title="Fusion (Fig. 8), r = 8", xlabel="ladder = every layer, late = last only, none")
    vals = [y for ax in axes for p in ax.patches if (y := p.get_height())]
    if vals:  # a common y range that shows the differences
        lo, hi = min(vals), max(vals)
        pad = max(1.0, 0.15 * (hi - lo))
        for ax in axes:
            ax.set_ylim(max(0, lo - 3 * pad), hi + 2 * pad)
            ax.grid(alpha=0.3, axis="y")
    fig.suptitle("LST ablations from one cache (MiniLM-L6, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def time_to_result(summary: dict[str, Any], path: Path) -> Path:
    """Minutes to a model after N epochs, per task: this run (top) and scaled to the full splits
    (bottom, when the summary has that estimate)."""
    plt = _plt()
    rows = [("time_to_result", "this run")]
    if any(summary.get("time_to_result_full_splits", {}).values()):
        rows.append(("time_to_result_full_splits", "full splits (estimated)"))
    tasks = [t for t in summary["tasks"] if summary.get("time_to_result", {}).get(t)]
    n = max(1, len(tasks))
    fig, axes = plt.subplots(
        len(rows), n, figsize=(max(7.5, 3.6 * n), 3.6 * len(rows) + 0.8), squeeze=False
    )
    for row, (key, what) in zip(axes, rows, strict=True):
        for ax, t in zip(row, tasks, strict=False):
            for m, series in summary[key].get(t, {}).items():
                ns = sorted(int(n) for n in series)
                ys = [series[n if n in series else str(n)] / 60 for n in ns]
                ax.plot(ns, ys, color=COLORS.get(m), label=LABELS.get(m, m))
                marks = [n for n in ns if n in (1, 10, 20)]
                ax.scatter(marks, [ys[ns.index(n)] for n in marks], color=COLORS.get(m), s=25)
            ax.set(title=f"{t}, {what}", xlabel="training epochs N", ylabel="minutes")
            ax.grid(alpha=0.3)
            ax.set_xticks([1, 5, 10, 15, 20])
            ax.legend(fontsize=7)
    fig.suptitle(
        "Time to a result. LST from cache: extraction + side_init once, then N epochs; LST online:"
        " side_init, then N epochs;\nLoRA, full: N epochs (computed from the measured epoch and "
        "extraction times)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def vqa_question_types(figures: dict[str, Any], path: Path) -> Path:
    """``bench.vqa``: test accuracy per easy-VQA question type (and over all questions), with
    and without the visual tokens; bars are the mean over the seeds, whiskers the range, the
    dashed ticks the type's majority answer (what the answer prior alone can reach)."""
    plt = _plt()
    arms = list(figures["arms"])
    first = figures["arms"][arms[0]]["by_type"]
    types = list(first)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(arms)
    colors = {
        "with images": "tab:blue",  # before visual ladders: one arm with images, at the input
        "with images (ladder)": "tab:blue",
        "with images (input)": "tab:orange",
        "text alone": "tab:gray",
    }
    for k, arm in enumerate(arms):
        by = figures["arms"][arm]["by_type"]
        xs = [i + (k - (len(arms) - 1) / 2) * width for i in range(len(types))]
        means = [by[t]["mean"] for t in types]
        lo = [by[t]["mean"] - min(by[t]["seeds"]) for t in types]
        hi = [max(by[t]["seeds"]) - by[t]["mean"] for t in types]
        ax.bar(xs, means, width * 0.95, yerr=[lo, hi], capsize=3, label=arm,
               color=colors.get(arm))  # fmt: skip
        for x, m, top in zip(xs, means, [max(by[t]["seeds"]) for t in types], strict=True):
            ax.annotate(f"{m:.1f}", (x, top), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")  # fmt: skip
    for i, t in enumerate(types):
        if first[t].get("majority") is not None:
            ax.hlines(first[t]["majority"], i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                      linewidth=1, label="majority answer" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(types)), [f"{t}\n(n = {first[t]['n']})" for t in types])
    ax.set(ylabel="test accuracy (%)", ylim=(0, 115))
    ax.set_title(
        f"easy-VQA by question type: {figures['vision_encoder']}, r = {figures['r']}, "
        f"{figures['epochs']} epochs, --limit {figures['limit']}, {len(figures['seeds'])} seeds",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all(summary: dict[str, Any], stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [accuracy_memory(summary, Path(f"{stem}_accuracy_memory.png"))]
    if summary["results"][summary["memory_task"]].get("sweeps"):
        out.append(ablations(summary, Path(f"{stem}_ablations.png")))
    if any(summary.get("time_to_result", {}).values()):
        out.append(time_to_result(summary, Path(f"{stem}_time_to_result.png")))
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.plots RESULTS.json")
    path = Path(sys.argv[1])
    for p in plot_all(json.loads(path.read_text()), path.with_suffix("")):
        print(p)


if __name__ == "__main__":
    main()
