"""Stage two speed: train-side from the cache against online LST and against its own compute.

    python -m bench.train_side_speed --quick --json bench/results/train_side_speed.json

All in one run, on the same SST-2 batches (batch 100) with the default MiniLM backbone, r = 8:
  1. one side network's optimizer step vs a MiniLM forward on the same batch (goal: <= 0.08);
  2. one epoch of train-side from the cache vs one epoch of online LST (backbone live, dropout on,
     the authors' setting), same side network and batches (goal: >= 10x faster);
  3. a train-side epoch vs the side network's own compute on batches already in memory
     (goal: <= 1.1, i.e. I/O hidden behind compute);
  4. 9 networks (3 seeds x 3 learning rates, r = 8; one stacked group, ``train_side.batched``)
     in one pass vs one network's epoch (goal: <= 3x), and 12 networks (r 4, 8, 16, 32 x 3
     seeds: four stacked groups) vs one network's epoch (goal: <= 5x);
  5. four reduction factors (4, 8, 16, 32) in one pass vs the four networks' own compute added
     up (goal: <= 1.1) and vs four separate runs;
  6. peak memory of a train-side process (one epoch, its own process) vs the backbone's size;
  7. ``train_side.compile: on``: the first epoch, compilation included, vs a later one, on a
     second run of the same shapes (inductor's on-disk cache). ``--compile-only`` runs this
     alone, on all of SST-2 (an epoch long enough to hold a compile of seconds):
     ``python -m bench.train_side_speed --compile-only --json ...``.
Repetitions alternate between the arms; medians are reported. The padding fraction of the
batches (padded token slots / all slots) is reported too. ``--side-device cuda`` runs the side
networks, and the backbone they are compared with, on a GPU (``train_side.device``); on a GPU
``--precision bfloat16`` runs the side networks' forward under autocast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, glue_dir, median, parser, table, write_json

R4 = [4, 8, 16, 32]
# train_side settings of every network the bench builds (--side-device, --precision)
SIDE: dict[str, Any] = {"train_side.device": "cpu", "train_side.precision": "float32"}


def _sync() -> None:
    """Wait for the GPU's queued work (a timing's end); nothing on the CPU."""
    import torch

    if SIDE["train_side.device"].startswith("cuda"):
        torch.cuda.synchronize()


def make_cache(root: Path, data: Path, limit: int | None) -> str:
    from pipeline.config import Config, apply_overrides
    from stages.extract import extract

    over: dict[str, Any] = {
        "task.name": "sst2",
        "task.data_dir": str(data),
        "task.limit": limit,
        "cache.root": str(root),
        "extract.side_init": ["magnitude"],
        "extract.reduction_factors": R4,
    }
    return extract(apply_overrides(Config(), over), progress=True).key


def _setup(
    root: Path,
    key: str,
    rs: list[int],
    seed: int = 0,
    grid: list[tuple] | None = None,
    over: dict[str, Any] | None = None,
) -> tuple[Any, list[Any], Any]:
    """The cache and one trial per network; ``over``: config overrides (another task, kept
    layers, init, batch size)."""
    from pipeline.config import Config, apply_overrides
    from stages.train_side import (
        Trial,
        backbone_config_of,
        build_trial,
        resolve_cache,
        side_device,
        task_spec_of,
    )

    cfg = apply_overrides(
        Config(),
        {
            "task.name": "sst2",
            "cache.root": str(root),
            "train_side.init": "magnitude",
            **SIDE,
            **(over or {}),
        },
    )
    cache = resolve_cache(cfg, key)
    spec, bcfg = task_spec_of(cache), backbone_config_of(cache)
    grid = grid or [(r, seed, 3e-3) for r in rs]
    device = side_device(cfg)
    trials = [build_trial(cfg, cache, bcfg, spec, Trial(*g), 10_000, device=device) for g in grid]
    return cache, trials, cfg


class _TorchLoader:
    """The cache loader with torch batches (``stages.batches.to_torch``) on the networks'
    device (``on_device``: one batch ahead), as train-side uses it."""

    def __init__(self, loader: Any, device: Any) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Any:
        from stages.batches import on_device, torch_batches

        return on_device(torch_batches(self.loader.epoch(epoch)), self.device)


def train_loader(cache: Any, trials: list[Any], batch_size: int = 100) -> Any:
    """The shuffled training batches (as torch tensors) of the states the first trial reads, as
    train-side reads them: on a CPU widened to float32 on the loader's thread, on a GPU sent
    narrow."""
    from cache_store.loader import CacheLoader

    device = trials[0].device
    return _TorchLoader(
        CacheLoader(
            cache,
            "train",
            {"enc": trials[0].net.needed_layers()},
            batch_size=batch_size,
            shuffle=True,
            widen=device.type == "cpu",
        ),
        device,
    )


def epoch_from_cache(
    root: Path, key: str, rs: list[int], epoch: int, over: dict[str, Any] | None = None
) -> dict[str, float]:
    """One training pass over the loader for the networks ``rs``: wall time and per-net compute."""
    from stages.train_side import cached_states, train_step

    cache, trials, cfg = _setup(root, key, rs, over=over)
    loader = train_loader(cache, trials, cfg.train_side.batch_size if over else 100)
    list(loader.epoch(99))  # a first pass reads the split into memory, as epoch 1 of a run does
    compute = [0.0] * len(trials)
    t0 = time.perf_counter()
    for batch in loader.epoch(epoch):
        for k, ts in enumerate(trials):
            c0 = time.perf_counter()
            train_step(ts, batch, cached_states, 1.0)
            compute[k] += time.perf_counter() - c0
    return {"wall_s": time.perf_counter() - t0, "compute_s": sum(compute)}


def epoch_grid(root: Path, key: str, grid: list[tuple], epoch: int) -> float:
    """One training pass of a grid of (r, seed, lr) networks as train-side runs it: the networks
    of one r stacked (``StackedGroup``, ``train_side.batched: auto``)."""
    from stages.train_side import StackedGroup, cached_states

    cache, trials, _ = _setup(root, key, [], grid=grid)
    by_r: dict[int, list[Any]] = {}
    for ts in trials:
        by_r.setdefault(ts.trial.r, []).append(ts)
    loader = train_loader(cache, trials)
    list(loader.epoch(99))
    t0 = time.perf_counter()
    groups = [StackedGroup(m) for m in by_r.values()]
    for batch in loader.epoch(epoch):
        for g in groups:
            g.step(batch, cached_states, 1.0)
    for g in groups:
        g.unpack()
    return time.perf_counter() - t0


def step_over_forward(root: Path, key: str, backbone: Any, reps: int) -> dict[str, Any]:
    """One side network's optimizer step (r = 8) vs a MiniLM forward (eval, no grad) on the same
    batch of 100, alternating; and the padding fraction of an epoch's batches."""
    import torch

    from stages.train_side import cached_states, train_step

    cache, trials, _ = _setup(root, key, [8])
    batches = list(train_loader(cache, trials).epoch(0))
    masks = [b.masks["enc"] for b in batches]
    padding = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    batch = max(batches, key=lambda b: b.masks["enc"].shape[1] * (len(b.labels) == 100))
    ids, mask = batch.input_ids["enc"], batch.masks["enc"]
    backbone.model.eval()
    step, fwd = [], []
    for i in range(reps + 2):
        _sync()
        t0 = time.perf_counter()
        train_step(trials[0], batch, cached_states, 1.0)
        t1 = time.perf_counter()  # train_step waits for its loss
        with torch.no_grad():
            backbone.model(input_ids=ids, attention_mask=mask.long())
        _sync()
        t2 = time.perf_counter()
        if i >= 2:  # the first two warm up
            step.append(t1 - t0)
            fwd.append(t2 - t1)
    return {
        "step_s": median(step),
        "forward_s": median(fwd),
        "ratio": median(step) / median(fwd),
        "batch_shape": list(ids.shape),
        "padding_fraction": padding,
    }


def compute_in_memory(root: Path, key: str, rs: list[int], epoch: int) -> float:
    """The same steps on batches already materialised in memory: the networks' own compute."""
    from stages.train_side import cached_states, train_step

    cache, trials, _ = _setup(root, key, rs)
    batches = list(train_loader(cache, trials).epoch(epoch))
    t0 = time.perf_counter()
    for batch in batches:
        for ts in trials:
            train_step(ts, batch, cached_states, 1.0)
    return time.perf_counter() - t0


def epoch_online(
    root: Path,
    key: str,
    backbone: Any,
    epoch: int,
    limit_batches: int | None,
    over: dict[str, Any] | None = None,
    r: int = 8,
) -> float:
    """Online LST: the live backbone (dropout on) computes the states of every batch; with
    ``limit_batches``, the time of that many batches scaled to the epoch's."""
    import torch

    from stages.train_side import online_states, train_step

    cache, trials, cfg = _setup(root, key, [r], over=over)
    loader = train_loader(cache, trials, cfg.train_side.batch_size if over else 100)
    source = online_states(backbone, True, {"enc": trials[0].net.needed_layers()})
    n = 0
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        for batch in loader.epoch(epoch):
            train_step(trials[0], batch, source, 1.0)
            n += 1
            if limit_batches and n >= limit_batches:
                break
    return (time.perf_counter() - t0) * len(loader) / n


def peak_memory(root: Path, key: str, memory_mb: int) -> dict[str, float]:
    """One train-side epoch in its own process: peak RSS, and RSS once imports and data are in
    (``bench.baselines.PeakMemory``: the kernel's high-water mark, reset at the start, so the
    parent's RSS, which ``ru_maxrss`` inherits across exec, does not count).

    ``memory_mb`` is the loader's budget: the default keeps the split in RAM when it fits, a small
    one streams it from the cache through a shuffle buffer of that size.
    """
    code = f"""
import json, torch
from bench.baselines import PeakMemory
from pipeline.config import Config, apply_overrides
from stages.train_side import train_side, resolve_cache
cfg = apply_overrides(Config(), {{"task.name": "sst2", "cache.root": {str(root)!r},
    "train_side.init": "magnitude", "train_side.epochs": 1, "train_side.memory_mb": {memory_mb},
    "train_side.run_dir": {str(root / "runs")!r}, **{SIDE!r}}})
resolve_cache(cfg, {key!r})
mem = PeakMemory()
mem.start()
train_side(cfg, cache_key={key!r}, progress=False)
m = mem.stop()
print(json.dumps({{"base_rss": m["base_rss"], "peak_rss": m["train_peak_rss"], "how": m["how"]}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def compile_runs(root: Path, key: str, tmp: Path) -> dict[str, Any]:
    """train-side with ``train_side.compile: on`` (one network, r = 8, 2 epochs), twice on the
    same shapes with one inductor cache folder, each in its own process, then once eager: the
    first epoch (compilation included) over a later epoch, cold and with the on-disk cache."""
    cache_dir = tmp / "inductor"

    def run(name: str, mode: str) -> dict[str, Any]:
        code = f"""
import json, torch
from pipeline.config import Config, apply_overrides
from stages.train_side import train_side
cfg = apply_overrides(Config(), {{"task.name": "sst2", "cache.root": {str(root)!r},
    "train_side.init": "magnitude", "train_side.epochs": 2, "train_side.compile": {mode!r},
    "train_side.threads": 1, "train_side.run_dir": {str(tmp / "runs")!r}, **{SIDE!r}}})
r = train_side(cfg, cache_key={key!r}, run_name={name!r}, progress=False, echo=False)
print(json.dumps(r.metrics["networks"]["r8-s0-lr0.003"]["epochs"]))
"""
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
            check=True,
        )  # fmt: skip
        h = json.loads(out.stdout.strip().splitlines()[-1])
        first = h[0]["epoch_s"] + h[0].get("compile_s", 0.0)
        return {
            "first_s": first,
            "compile_s": h[0].get("compile_s", 0.0),
            "later_s": h[1]["epoch_s"],
        }

    cold, warm, eager = run("cold", "on"), run("warm", "on"), run("eager", "off")
    return {
        "cold": cold,
        "warm": warm,
        "eager": eager,
        "first_over_later_warm": warm["first_s"] / warm["later_s"],
        "first_over_later_cold": cold["first_s"] / cold["later_s"],
        "compiled_over_eager_epoch": warm["later_s"] / eager["later_s"],
    }


def compile_rows(comp: dict[str, Any]) -> list[list[str]]:
    """The table rows of ``compile_runs``' ratios."""
    return [
        [
            "compiled: first epoch / later, 2nd run",
            f"{comp['first_over_later_warm']:.2f}",
            "<= 1.3",
        ],
        ["compiled: first epoch / later, cold", f"{comp['first_over_later_cold']:.2f}", ""],
        ["compiled epoch / eager epoch", f"{comp['compiled_over_eager_epoch']:.2f}", ""],
    ]


def compile_only(data: Path, limit: int | None, out: Path | None) -> None:
    """``--compile-only``: the compiled runs alone (``compile_runs``), on ``limit`` training
    examples (None: all of SST-2's 67,349), where an epoch is long enough for a compile of a few
    seconds to be measured against it."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        key = make_cache(root, data, limit)
        comp = compile_runs(root, key, Path(tmp))
    print(table(["ratio", "value", "goal"], compile_rows(comp)))
    print("seconds:", json.dumps({k: comp[k] for k in ("cold", "warm", "eager")}))
    write_json(out, "train_side_speed", {"task": "sst2", "train_examples": limit or "all",
                                         "compile": comp})  # fmt: skip


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="only the compiled runs (first epoch with compilation / a later one), on all of "
        "SST-2's training split (--quick: 2,000 examples) unless --limit says otherwise",
    )
    p.add_argument("--limit", type=int, default=None, help="training examples (--compile-only)")
    p.add_argument(
        "--side-device", default="cpu", help="train_side.device of every network (cpu, cuda, ...)"
    )
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    SIDE.update({"train_side.device": args.side_device, "train_side.precision": args.precision})
    data = glue_dir(args.data_dir)
    limit = 2000 if args.quick else None
    if args.compile_only:
        compile_only(data, args.limit or limit, args.json)
        return
    if args.limit is not None:
        p.error("--limit goes with --compile-only")
    reps = 1 if args.quick else 3
    import torch

    from ladder.backbones import load_backbone

    torch.set_num_threads(
        1
    )  # what train-side uses on this 2-core machine (the loader has the other)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        key = make_cache(root, data, limit)
        backbone = load_backbone("minilm-l6", device=args.side_device)
        size = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
        rows: dict[str, list[float]] = {
            k: []
            for k in (
                "cache", "compute", "online", "four", "four_compute", "four_separate",
                "nine", "twelve",
            )
        }  # fmt: skip
        nine = [(8, s, lr) for s in (0, 1, 2) for lr in (3e-3, 1e-3, 3e-4)]
        twelve = [(r, s, 3e-3) for r in R4 for s in (0, 1, 2)]
        mem = peak_memory(root, key, 4096)
        streamed = peak_memory(root, key, 256)
        step = step_over_forward(root, key, backbone, 5)
        for rep in range(reps):
            rows["cache"].append(epoch_from_cache(root, key, [8], rep)["wall_s"])
            rows["compute"].append(compute_in_memory(root, key, [8], rep))
            torch.set_num_threads(2)  # the online baseline gets both cores for its backbone
            rows["online"].append(epoch_online(root, key, backbone, rep, 8 if args.quick else None))
            torch.set_num_threads(1)
            rows["four"].append(epoch_from_cache(root, key, R4, rep)["wall_s"])
            rows["four_compute"].append(sum(compute_in_memory(root, key, [r], rep) for r in R4))
            rows["four_separate"].append(
                sum(epoch_from_cache(root, key, [r], rep)["wall_s"] for r in R4)
            )
            rows["nine"].append(epoch_grid(root, key, nine, rep))
            rows["twelve"].append(epoch_grid(root, key, twelve, rep))
        med = {k: median(v) for k, v in rows.items()}
        comp = compile_runs(root, key, Path(tmp))
    figures = {
        "task": "sst2",
        "train_examples": 2000 if args.quick else "all",
        "side_device": args.side_device,
        "precision": args.precision,
        "epoch_s": med,
        "step_over_minilm_forward": step,
        "online_over_cache": med["online"] / med["cache"],
        "nine_over_one": med["nine"] / med["cache"],
        "twelve_over_one": med["twelve"] / med["cache"],
        "cache_over_compute": med["cache"] / med["compute"],
        "four_over_compute": med["four"] / med["four_compute"],
        "four_over_separate": med["four"] / med["four_separate"],
        "compile": comp,
        "peak_rss_bytes": mem["peak_rss"],
        "rss_after_imports_and_data": mem["base_rss"],
        "peak_above_base_bytes": mem["peak_rss"] - mem["base_rss"],
        "backbone_bytes": size,
        "peak_over_backbone": (mem["peak_rss"] - mem["base_rss"]) / size,
        "streamed_256mb": {
            "peak_rss_bytes": streamed["peak_rss"],
            "peak_above_base_bytes": streamed["peak_rss"] - streamed["base_rss"],
            "peak_over_backbone": (streamed["peak_rss"] - streamed["base_rss"]) / size,
        },
        "online_estimated_from_batches": 8 if args.quick else None,
    }
    print(
        table(
            ["ratio", "value", "goal"],
            [
                ["side step / MiniLM forward, same batch", f"{step['ratio']:.2f}", "<= 0.08"],
                ["online LST epoch / cache epoch", f"{figures['online_over_cache']:.1f}x", ">= 10"],
                ["9 networks (3 seeds x 3 lr) / one", f"{figures['nine_over_one']:.2f}x", "<= 3"],
                ["12 networks (4 r x 3 seeds) / one", f"{figures['twelve_over_one']:.2f}x", "<= 5"],
                *compile_rows(comp),
                [
                    "cache epoch / in-memory compute",
                    f"{figures['cache_over_compute']:.2f}",
                    "<= 1.1",
                ],
                ["4 r one pass / 4 computes", f"{figures['four_over_compute']:.2f}", "<= 1.1"],
                ["4 r one pass / 4 separate runs", f"{figures['four_over_separate']:.2f}", "< 1"],
                ["peak RSS above base / backbone", f"{figures['peak_over_backbone']:.2f}", ""],
                [
                    "same, split streamed (memory_mb 256)",
                    f"{figures['streamed_256mb']['peak_over_backbone']:.2f}",
                    "",
                ],
            ],
        )
    )
    print("\nepoch seconds (median):", {k: round(v, 2) for k, v in med.items()})
    print(f"padding fraction of the batches: {step['padding_fraction']:.3f}")
    write_json(args.json, "train_side_speed", figures)


if __name__ == "__main__":
    main()
