"""Stage two: train LST side networks from the activation cache alone, several in one pass.

    pipeline run train-side --task sst2 --data-dir ../shared/data/glue
    pipeline run train-side --cache-key sst2-minilm-l6-0123abcd --reduction-factors 4,8,16,32

Opens a committed cache (by key, or the newest one matching the task and backbone of the
config), builds one side network per (reduction factor, seed, learning rate), and trains them
all on one pass over the loader's batches per epoch: each batch is read and decoded once and fed
to every network. The backbone is never loaded; the states come from the cache, and so does the
frozen T5 LM head. Every epoch evaluates on the cached validation split with the task's metric;
the best checkpoint per network is kept (safetensors + JSON config) and scored on the test split
at the end. A killed run resumes from its last finished epoch and ends where it would have.

The same training loop runs online LST (``online=``): the states then come from a live
backbone on the batch's token ids, with its dropout on (the authors' setting) or off.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cache_store.loader import Batch, CacheLoader
from cache_store.registry import CommittedCache, list_caches, open_cache
from ladder.side import SideConfig, build_side_network, trainable_parameters
from stages.config import StageConfig
from stages.errors import StageError
from stages.tasks import TaskSpec, compute_metrics, paper_epochs, spec_of


@dataclass(frozen=True)
class Trial:
    """One side network of a run: its reduction factor, seed and learning rate."""

    r: int
    seed: int
    lr: float

    @property
    def name(self) -> str:
        return f"r{self.r}-s{self.seed}-lr{self.lr:g}"


@dataclass
class TrialState:
    trial: Trial
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = -1
    compute_s: float = 0.0


def task_spec_of(cache: CommittedCache) -> TaskSpec:
    return spec_of(cache.manifest["task"])


def resolve_cache(cfg: StageConfig, key: str | None) -> CommittedCache:
    """The cache named by ``key``, else the newest committed cache of the config's task and backbone."""
    root = cfg.cache.resolved_root
    if key is None:
        rows = [
            r
            for r in list_caches(root, cfg.cache.storage_options)
            if r["status"] == "complete"
            and r["task"] == cfg.task.name
            and r["backbone"] == cfg.backbone.name
        ]
        if not rows:
            raise StageError(
                f"no committed cache of task {cfg.task.name!r} with backbone {cfg.backbone.name!r} under "
                f"{root}; run `pipeline run extract` first or pass --cache-key"
            )
        key = max(rows, key=lambda r: r["created_at"] or "")["key"]
    cache = open_cache(root, key, cfg.cache.storage_options)
    m = cache.manifest
    if m["task"]["name"] != cfg.task.name or m["backbone"]["name"] != cfg.backbone.name:
        raise StageError(
            f"cache {key} holds task {m['task']['name']!r} with backbone {m['backbone']['name']!r}, "
            f"but task {cfg.task.name!r} with backbone {cfg.backbone.name!r} was asked for"
        )
    return cache


def backbone_config_of(cache: CommittedCache) -> Any:
    """The backbone's transformers config, rebuilt from the manifest (no weights, no download)."""
    from transformers import AutoConfig

    d = dict(cache.manifest["backbone"]["config"])
    return AutoConfig.for_model(d.pop("model_type"), **d)


def trials_of(cfg: StageConfig) -> list[Trial]:
    t = cfg.train_side
    return [
        Trial(r, s, lr) for r in t.reduction_factors for s in t.seeds for lr in t.learning_rates
    ]


def epochs_of(cfg: StageConfig, task: str) -> int:
    return cfg.train_side.epochs or paper_epochs(task)


def check_trials(cfg: StageConfig, cache: CommittedCache) -> list[Trial]:
    """The trials of ``cfg``, each checked against the cache before any work is done.

    Every reduction factor must suit the backbone (divide its widths, kept layers in range),
    and the cache must hold the side_init the config asks for.
    """
    trials = trials_of(cfg)
    if len(set(trials)) != len(trials):
        raise StageError("the grid of trials has repeated values; list each value once")
    spec, bcfg = task_spec_of(cache), backbone_config_of(cache)
    for r in sorted({tr.r for tr in trials}):
        side_config(cfg, r, spec).validate(bcfg)
        if cfg.train_side.init != "random":
            load_side_init(cache, r, cfg.train_side.init)
    return trials


def side_config(cfg: StageConfig, r: int, spec: TaskSpec) -> SideConfig:
    t = cfg.train_side
    return SideConfig(
        reduction_factor=r,
        kept_layers=None if t.kept_layers is None else tuple(t.kept_layers),
        fusion=t.fusion,
        ladder_dropout=t.ladder_dropout,
        num_labels=spec.num_labels,
    )


def load_side_init(cache: CommittedCache, r: int, method: str) -> dict[str, torch.Tensor]:
    have = cache.manifest.get("side_init", {})
    if method not in have.get(f"r{r}", []):
        raise StageError(
            f"cache {cache.key} has no {method} side_init for reduction factor {r} (it has "
            f"{have or 'none'}); re-extract with --reduction-factors including {r}, or use --init random"
        )
    group = cache.group[f"side_init/r{r}/{method}"]
    return {
        name: torch.from_numpy(np.asarray(arr[...]))
        for name, arr in group.arrays()
        if not name.startswith("idx.")
    }


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step: linear warm-up over ``warmup`` steps
    from 0 to 1, then linear decay to 0 at step ``total`` (transformers'
    ``get_linear_schedule_with_warmup``; for ``torch.optim.lr_scheduler.LambdaLR``)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def build_trial(
    cfg: StageConfig,
    cache: CommittedCache,
    bcfg: Any,
    spec: TaskSpec,
    trial: Trial,
    total_steps: int,
) -> TrialState:
    """A side network (seeded, initialised as asked), its AdamW and linear warm-up schedule."""
    torch.manual_seed(trial.seed)
    lm_head = None
    if "lm_head" in cache.manifest.get("frozen", []):
        lm_head = torch.from_numpy(np.asarray(cache.array("frozen/lm_head")[...]))
    net = build_side_network(bcfg, side_config(cfg, trial.r, spec), lm_head)
    if cfg.train_side.init != "random":
        net.load_side_init(load_side_init(cache, trial.r, cfg.train_side.init))
    t = cfg.train_side
    opt = torch.optim.AdamW(net.parameters(), lr=trial.lr, weight_decay=t.weight_decay, eps=1e-8)
    schedule = linear_schedule(t.warmup_steps, total_steps)
    return TrialState(trial, net, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule))


# --- where the states come from ----------------------------------------------------------------------

StateSource = Callable[[Batch, str], dict[int, torch.Tensor]]


def cached_states(batch: Batch, stream: str) -> dict[int, torch.Tensor]:
    return batch.states[stream]


def online_states(backbone: Any, dropout: bool, layers: dict[str, list[int]]) -> StateSource:
    """States from a live backbone on the batch's ids (online LST); dropout on = the authors' setting."""
    memo: dict[str, Any] = {"batch": None}

    def source(batch: Batch, stream: str) -> dict[int, torch.Tensor]:
        if memo["batch"] is not batch:  # one backbone pass per batch, shared by every network
            backbone.model.train(dropout)
            dec = {s: batch.input_ids[s] for s in batch.input_ids if s != "enc"} or None
            memo["batch"] = batch
            memo["states"] = backbone.states(
                batch.input_ids["enc"],
                batch.masks["enc"],
                token_type_ids=batch.token_type_ids,
                decoder_inputs=dec,
                layers=sorted({n for ns in layers.values() for n in ns}),
                for_training=True,
            )
        states = memo["states"][stream]
        return {n: states[n] for n in layers[stream]}

    return source


# --- one step, evaluation --------------------------------------------------------------------------


def train_step(ts: TrialState, batch: Batch, states: StateSource, max_grad_norm: float) -> float:
    ts.net.train()
    if "dec" in batch.masks:  # T5: teacher forcing on the verbalised target
        _, loss = ts.net(
            states(batch, "enc"),
            batch.masks["enc"],
            states(batch, "dec"),
            None,
            batch.target_ids["dec"],
        )
    else:
        loss = ts.net.loss(ts.net(states(batch, "enc"), batch.masks["enc"]), batch.labels)
    ts.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ts.net.parameters(), max_grad_norm)
    ts.opt.step()
    ts.sched.step()
    return float(loss.detach())


@torch.no_grad()
def predict_batch(
    net: torch.nn.Module,
    batch: Batch,
    states: StateSource,
    spec: TaskSpec,
    candidates: list[str] | None,
) -> np.ndarray:
    """Class ids or scores for a batch; T5 scores every candidate label string."""
    net.eval()
    if candidates is None:
        logits = net(states(batch, "enc"), batch.masks["enc"])
        return logits.squeeze(-1).numpy() if spec.is_regression else logits.argmax(-1).numpy()
    C = len(candidates)
    streams = [f"cand_{k}" for k in range(C)]
    T = max(batch.masks[s].shape[1] for s in streams)
    B = batch.masks["enc"].shape[0]

    def pad(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(
            x, (0, 0, 0, T - x.shape[1]) if x.dim() == 3 else (0, T - x.shape[1]), value=value
        )

    per = [states(batch, s) for s in streams]
    dec = {n: torch.stack([pad(p[n], 0.0) for p in per], 1) for n in per[0]}  # [B, C, T, d]
    labels = torch.stack([pad(batch.target_ids[s], -100) for s in streams], 1)  # [B, C, T]
    scores = net.score_candidates(states(batch, "enc"), batch.masks["enc"], dec, None, labels)
    best = scores.argmax(-1).numpy()
    if spec.is_regression:
        return np.asarray([float(candidates[k]) for k in best], dtype=np.float32)
    return np.asarray([int(candidates[k]) for k in best]) if B else best


def evaluate(
    ts_list: list[TrialState],
    loader: CacheLoader,
    states: StateSource,
    spec: TaskSpec,
    candidates: list[str] | None,
) -> list[dict[str, float]]:
    """The task metrics of every network on one split, one pass over the loader."""
    preds: list[list[np.ndarray]] = [[] for _ in ts_list]
    index, labels = [], []
    for batch in loader.epoch(0):
        index.append(batch.index.numpy())
        labels.append(batch.labels.numpy())
        for k, ts in enumerate(ts_list):
            preds[k].append(predict_batch(ts.net, batch, states, spec, candidates))
    y = np.concatenate(labels)
    return [compute_metrics(spec, np.concatenate(p), y) for p in preds]


# --- the run folder ----------------------------------------------------------------------------------


def run_signature(cfg: StageConfig, cache_key: str, online: str | None) -> dict[str, Any]:
    """What defines a run: a run folder with another signature is refused, not overwritten."""
    t = cfg.train_side.model_dump()
    t.pop("run_dir")
    return {
        "cache": cache_key,
        "train_side": t,
        "epochs": epochs_of(cfg, cfg.task.name),
        "online": online,
    }


def run_folder(cfg: StageConfig, signature: dict[str, Any], name: str | None) -> Path:
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:8]
    folder = Path(cfg.train_side.run_dir) / (name or f"{signature['cache']}-{digest}")
    sig_file = folder / "run.json"
    if sig_file.exists():
        existing = json.loads(sig_file.read_text())
        if existing != signature:
            diff = sorted(
                k for k in set(existing) | set(signature) if existing.get(k) != signature.get(k)
            )
            raise StageError(
                f"run folder {folder} belongs to another configuration (differs in {', '.join(diff)}); "
                "choose another --run-name or delete it"
            )
    folder.mkdir(parents=True, exist_ok=True)
    if not sig_file.exists():
        sig_file.write_text(json.dumps(signature, indent=1, sort_keys=True))
    return folder


def _save_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(path)


def save_checkpoint(folder: Path, ts: TrialState, epoch: int) -> None:
    """After an epoch: weights, optimizer, schedule, RNG and history, written atomically."""
    path = folder / "checkpoints" / f"{ts.trial.name}.last.pt"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "epoch": epoch,
            "net": ts.net.state_dict(),
            "opt": ts.opt.state_dict(),
            "sched": ts.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "history": ts.history,
            "best_score": ts.best_score,
            "best_epoch": ts.best_epoch,
            "compute_s": ts.compute_s,
        },
        tmp,
    )
    tmp.replace(path)


def load_checkpoint(folder: Path, ts: TrialState) -> int:
    """Restore a trial's last finished epoch; returns the next epoch to run (0 if none)."""
    path = folder / "checkpoints" / f"{ts.trial.name}.last.pt"
    if not path.exists():
        return 0
    ck = torch.load(path, weights_only=False)
    ts.net.load_state_dict(ck["net"], strict=False)
    ts.opt.load_state_dict(ck["opt"])
    ts.sched.load_state_dict(ck["sched"])
    ts.history, ts.best_score, ts.best_epoch = ck["history"], ck["best_score"], ck["best_epoch"]
    ts.compute_s = ck.get("compute_s", 0.0)
    torch.set_rng_state(ck["rng"])
    return ck["epoch"] + 1


def save_best(folder: Path, ts: TrialState, side: SideConfig, cache: CommittedCache) -> None:
    state = {k: v.detach().contiguous() for k, v in ts.net.state_dict().items()}
    save_file(state, str(folder / f"{ts.trial.name}.best.safetensors"))
    _save_json(
        folder / f"{ts.trial.name}.config.json",
        {
            "side": asdict(side),
            "trial": asdict(ts.trial),
            "cache": cache.key,
            "backbone": cache.manifest["backbone"]["name"],
            "task": cache.manifest["task"]["name"],
            "task_spec": {
                k: cache.manifest["task"][k] for k in ("name", "labels", "metric", "text_fields")
            },
            "epoch": ts.best_epoch,
        },
    )


# --- the run -------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    folder: Path
    cache_key: str
    metrics: dict[str, Any]


def train_side(
    cfg: StageConfig,
    *,
    cache_key: str | None = None,
    run_name: str | None = None,
    online: Any = None,
    online_dropout: bool = True,
    progress: bool = True,
    device: str = "cpu",
) -> TrainResult:
    """Train every trial of ``cfg.train_side`` from the cache (or online, given a backbone)."""
    if device == "cpu":
        # the side network's matrices are small: a second intra-op thread costs more in
        # synchronisation than it gains, and the loader thread needs a core of its own
        torch.set_num_threads(cfg.train_side.threads or max(1, (os.cpu_count() or 2) - 1))
    cache = resolve_cache(cfg, cache_key)
    spec = task_spec_of(cache)
    bcfg = backbone_config_of(cache)
    candidates = cache.manifest["task"].get("candidates")
    trials = check_trials(cfg, cache)
    epochs = epochs_of(cfg, spec.name)
    t = cfg.train_side
    n_train = cache.manifest["splits"]["train"]["n_examples"]
    total_steps = epochs * -(-n_train // t.batch_size)
    runs = [build_trial(cfg, cache, bcfg, spec, tr, total_steps) for tr in trials]
    layers = {"enc": runs[0].net.needed_layers("enc")}
    if candidates is not None:
        layers["dec"] = runs[0].net.needed_layers("dec")
    eval_layers = {"enc": layers["enc"]}
    if candidates is not None:
        eval_layers.update({f"cand_{k}": layers["dec"] for k in range(len(candidates))})
    mode = None if online is None else ("online-dropout" if online_dropout else "online-eval")
    folder = run_folder(cfg, run_signature(cfg, cache.key, mode), run_name)

    seed0 = trials[0].seed
    budget = t.memory_mb << 20
    train = CacheLoader(
        cache,
        "train",
        layers,
        batch_size=t.batch_size,
        shuffle=True,
        seed=seed0,
        memory_budget=budget,
        read_states=online is None,
    )
    val, test = (
        CacheLoader(
            cache,
            s,
            eval_layers,
            batch_size=t.batch_size * 2,
            shuffle=False,
            memory_budget=budget,
            read_states=online is None,
        )
        for s in ("validation", "test")
    )
    states_train: StateSource = cached_states
    states_eval: StateSource = cached_states
    if online is not None:
        states_train = online_states(online, online_dropout, layers)
        states_eval = online_states(online, False, eval_layers)

    start = min(load_checkpoint(folder, ts) for ts in runs)
    _save_json(folder / "config.json", cfg.model_dump())
    bar = tqdm(
        total=epochs * len(train),
        initial=start * len(train),
        unit="batch",
        desc=f"train-side {folder.name}",
        disable=not progress,
    )
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            losses = [[] for _ in runs]
            for batch in train.epoch(epoch):
                for k, ts in enumerate(runs):
                    c0 = time.perf_counter()
                    losses[k].append(train_step(ts, batch, states_train, t.max_grad_norm))
                    ts.compute_s += time.perf_counter() - c0
                bar.update(1)
            epoch_s = time.perf_counter() - t0
            scores = evaluate(runs, val, states_eval, spec, candidates)
            for ts, loss, score in zip(runs, losses, scores, strict=True):
                ts.history.append(
                    {
                        "epoch": epoch,
                        "train_loss": float(np.mean(loss)),
                        "validation": score,
                        "epoch_s": epoch_s,
                    }
                )
                if score["score"] > ts.best_score:
                    ts.best_score, ts.best_epoch = score["score"], epoch
                    save_best(folder, ts, side_config(cfg, ts.trial.r, spec), cache)
                save_checkpoint(folder, ts, epoch)
            bar.set_postfix(val=" ".join(f"{s['score']:.1f}" for s in scores))
            _write_metrics(folder, runs, cache, spec, final=None)
    finally:
        bar.close()
    # the best checkpoint of each network, scored on the test split
    for ts in runs:
        best = load_file(str(folder / f"{ts.trial.name}.best.safetensors"))
        ts.net.load_state_dict(best, strict=False)
    tests = evaluate(runs, test, states_eval, spec, candidates)
    metrics = _write_metrics(folder, runs, cache, spec, final=tests)
    plot_curves(folder, runs, spec)
    return TrainResult(folder, cache.key, metrics)


def _write_metrics(
    folder: Path,
    runs: list[TrialState],
    cache: CommittedCache,
    spec: TaskSpec,
    final: list[dict] | None,
) -> dict[str, Any]:
    out = {
        "cache": cache.key,
        "task": spec.name,
        "metric": spec.metric,
        "networks": {
            ts.trial.name: {
                **asdict(ts.trial),
                "trainable_parameters": trainable_parameters(ts.net),
                "best_epoch": ts.best_epoch,
                "best_validation": ts.best_score,
                "compute_s": ts.compute_s,
                "epochs": ts.history,
                **({"test": final[k]} if final is not None else {}),
            }
            for k, ts in enumerate(runs)
        },
    }
    _save_json(folder / "metrics.json", out)
    return out


def plot_curves(folder: Path, runs: list[TrialState], spec: TaskSpec) -> Path:
    """training-curves.png: train loss and validation metric per epoch, one line per network;
    a star marks each network's kept (best-validation) checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for ts in runs:
        ep = [h["epoch"] + 1 for h in ts.history]
        a.plot(ep, [h["train_loss"] for h in ts.history], marker="o", label=ts.trial.name)
        (line,) = b.plot(
            ep, [h["validation"]["score"] for h in ts.history], marker="o", label=ts.trial.name
        )
        if ts.best_epoch >= 0:  # the checkpoint that was kept
            b.plot(
                [ts.best_epoch + 1],
                [ts.best_score],
                marker="*",
                markersize=14,
                color=line.get_color(),
            )
    a.set(xlabel="epoch", ylabel="train loss", title="training loss")
    b.set(
        xlabel="epoch", ylabel=f"validation {spec.metric} (x100)", title=f"{spec.name}: validation"
    )
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "training-curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
