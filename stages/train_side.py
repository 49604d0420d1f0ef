"""Stage two: train LST side networks from the activation cache alone, several in one pass.

    pipeline run train-side --task sst2 --data-dir ../shared/data/glue
    pipeline run train-side --cache-key sst2-minilm-l6-0123abcd --reduction-factors 4,8,16,32

Opens a committed cache (by key, or the newest one made from the config's inputs: task, backbone,
max length, and the data when the config names it), builds one side network per (reduction factor,
seed, learning rate), and trains them all on one pass over the loader's batches per epoch: each
batch is read and decoded once and fed to every network. The backbone is never loaded; the states
come from the cache, and so does the frozen T5 LM head. Every epoch evaluates on the cached
validation split with the task's metric; the best checkpoint per network is kept (safetensors +
JSON config) and scored on the test split at the end. Generation tasks (a causal backbone's
frozen LM head, head "lm") train on the answer tokens' cross-entropy and are scored from the
cache too: answer-token loss and exact match (:func:`evaluate_generation`). Captioning
(``coco-caption``, a T5 backbone with image features) trains on the caption tokens' teacher-forced
cross-entropy and validates on it (:func:`evaluate_captions`: ``caption_loss``, lower is better,
so its ``score`` is the negative loss); CIDEr needs generation by the live backbone decoder
(``pipeline evaluate``). A killed run resumes each network from its
own last finished epoch, on its own RNG stream, and ends where it would have.

The same training loop runs online LST (``online=``): the states then come from a live
backbone on the batch's token ids, with its dropout on (the authors' setting) or off.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from cache_store import layout
from cache_store.images import ImageTable
from cache_store.loader import CacheLoader
from cache_store.reader import CommittedCache, open_cache
from cache_store.registry import list_caches
from ladder.backbones import pick_device
from ladder.errors import LadderError
from ladder.side import SideConfig, build_side_network, trainable_parameters
from ladder.stacked import (
    StackedAdamW,
    activation_bytes,
    group_sizes,
    shape_key,
    stack_networks,
    stackable,
)
from ladder.vision import (
    VisualInput,
    build_visual_side_network,
    saved_visual_fusion,
    saved_visual_readout,
    visual_stats,
)
from stages import tracking
from stages.batches import Batch, on_device, torch_batches
from stages.config import StageConfig
from stages.errors import StageError
from stages.images import image_layout, vision_mismatch, visual_of
from stages.runfiles import (
    DiskFull,
    make_private_dir,
    redact_config,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
)
from stages.tasks import (
    TaskSpec,
    check_trainable,
    compute_metrics,
    load_task_of,
    paper_epochs,
    spec_of,
    targets_of_table,
)
from stages.tokens import answer_template, check_verbaliser


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
    best_epoch: int = 0  # 1-based, as everywhere users see it; 0 = none yet
    compute_s: float = 0.0
    compile_s: float = 0.0  # steps that compiled a graph (train_side.compile), not in compute_s
    compiled: Callable[..., torch.Tensor] | None = None  # the compiled forward + loss, if any
    rng: torch.Tensor | None = None  # this network's RNG on its device (dropout), between steps
    next_epoch: int = 0  # the first epoch (0-based, internal) it has not finished
    stopped: str | None = None  # why training stopped early (a non-finite loss), else None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: torch.dtype | None = None  # train_side.precision below float32: autocast's dtype
    scaler: torch.amp.GradScaler | None = None  # float16: the loss scale (bfloat16 needs none)


def task_spec_of(cache: CommittedCache) -> TaskSpec:
    return spec_of(cache.manifest["task"])


def candidates_of(cache: CommittedCache) -> list[str] | None:
    """The label strings a T5 cache scores (its task's candidates), else None."""
    return cache.manifest["task"].get("candidates")


def _data_of(cfg: StageConfig) -> Any:
    """The task data the config names (a glue_data folder or custom files), else None.

    Data from the hub is not loaded here (stage two runs offline from the cache): the cache is
    then matched on task, backbone, max length and ``task.limit`` alone.
    """
    t = cfg.task
    if t.data_dir is None and not t.files:
        return None
    return load_task_of(t)


def cache_mismatch(cfg: StageConfig, manifest: dict[str, Any], data: Any) -> str | None:
    """How a cache's inputs differ from the config's (task, backbone and its quantization, max
    length, data), or None."""
    m = manifest
    if m["task"]["name"] != cfg.task.name:
        return f"task ({m['task']['name']!r}, asked {cfg.task.name!r})"
    if m["backbone"]["name"] != cfg.backbone.name:
        return f"backbone ({m['backbone']['name']!r}, asked {cfg.backbone.name!r})"
    quantization = m["backbone"].get("quantization") or "none"
    if quantization != cfg.backbone.quantization:
        return f"quantization ({quantization}, asked {cfg.backbone.quantization})"
    if (template := template_mismatch(cfg, m)) is not None:
        return template
    inputs = m.get("key_inputs", {})
    max_length = inputs.get("max_length")
    if max_length is not None and max_length != cfg.backbone.max_length:
        return f"max length ({max_length}, asked {cfg.backbone.max_length})"
    if (vision := vision_mismatch(cfg, m)) is not None:
        return vision
    if data is None:
        if cfg.task.limit is not None:  # a split may be smaller than the limit, never larger
            for split, info in m.get("splits", {}).items():
                if info["n_examples"] > cfg.task.limit:
                    return (
                        f"{split} split size ({info['n_examples']} examples, asked at most "
                        f"{cfg.task.limit})"
                    )
        return None
    prints = inputs.get("task", {}).get("splits", {})
    for split, examples in data.splits.items():
        have = m.get("splits", {}).get(split, {}).get("n_examples")
        if have is not None and have != len(examples):
            return f"{split} split size ({have} examples, asked {len(examples)})"
        if split in prints and prints[split] != data.fingerprint(split):
            return f"{split} data (another content or order than the configured task data)"
    return None


def template_mismatch(cfg: StageConfig, manifest: dict[str, Any]) -> str | None:
    """How a cache's template fails ``train_side.head`` (``lm`` on a classification task needs
    ``fields-answer``, ``cls`` a template without the answer prompt), or None; a head the task or
    backbone cannot have at all (regression, not decoder-only) raises."""
    spec = spec_of(manifest["task"])
    head = cfg.train_side.head
    family = manifest["backbone"].get("family", "")
    check_verbaliser(head, spec, family, manifest["backbone"]["name"])
    template = manifest.get("key_inputs", {}).get("template", "")
    want = answer_template(head, spec)
    if want == template.startswith("fields-answer-"):
        return None
    need = "fields-answer (the answer prompt)" if want else "one without the answer prompt"
    return f"template ({template}; --head {head} needs {need})"


def resolve_cache(cfg: StageConfig, key: str | None) -> CommittedCache:
    """The cache named by ``key``, else the newest committed cache made from the config's inputs.

    Without a key the cache must match everything the config says about the data: task,
    backbone, max length and, when the config names its data (``task.data_dir``, custom files),
    each split's size and content fingerprint; with ``task.limit`` alone, the split sizes.
    """
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
        data = _data_of(cfg)
        rows.sort(key=lambda r: r["created_at"] or "", reverse=True)  # newest first
        first_miss = None
        for row in rows:
            cache = open_cache(root, row["key"], cfg.cache.storage_options)
            miss = cache_mismatch(cfg, cache.manifest, data)
            if miss is None:
                return cache
            first_miss = first_miss or f"{row['key']} differs in {miss}"
        raise StageError(
            f"no committed cache under {root} matches the configured inputs (newest candidate "
            f"{first_miss}); run `pipeline run extract` with these options first, or pass --cache-key"
        )
    cache = open_cache(root, key, cfg.cache.storage_options)
    m = cache.manifest
    if m["task"]["name"] != cfg.task.name or m["backbone"]["name"] != cfg.backbone.name:
        raise StageError(
            f"cache {key} holds task {m['task']['name']!r} with backbone {m['backbone']['name']!r}, "
            f"but task {cfg.task.name!r} with backbone {cfg.backbone.name!r} was asked for"
        )
    if (template := template_mismatch(cfg, m)) is not None:
        raise StageError(
            f"cache {key} does not fit --head {cfg.train_side.head}: it differs in {template}; "
            f"extract with --head {cfg.train_side.head} first (`pipeline run extract`)"
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


def warmup_steps_of(cfg: StageConfig, total_steps: int) -> int:
    """Warm-up steps: ``ceil(warmup_ratio * total_steps)`` when a ratio is set (as HF Trainer
    has it), else ``warmup_steps``."""
    t = cfg.train_side
    if t.warmup_ratio is not None:
        return math.ceil(t.warmup_ratio * total_steps)
    return t.warmup_steps


def warmup_warning(cfg: StageConfig, total_steps: int) -> str | None:
    """One line when warm-up takes more than half the run's optimizer steps, else None."""
    warm = warmup_steps_of(cfg, total_steps)
    if warm * 2 <= total_steps:
        return None
    share = "all" if warm >= total_steps else f"{100 * warm / total_steps:.0f}%"
    return (
        f"warning: warm-up is {warm} steps, {share} of this run's {total_steps} optimizer steps: "
        "the learning rate stays below its peak for most of the run; pass --warmup-ratio 0.06 "
        f"(here {math.ceil(0.06 * total_steps)} steps) or a smaller --warmup-steps"
    )


def resolved_config(cfg: StageConfig, epochs: int, total_steps: int) -> dict[str, Any]:
    """The configuration as the run used it, for its folder's ``config.json``: the epochs and
    warm-up steps in effect, absolute paths for the data, the cache root, the run directory and a
    local backbone folder, so that ``evaluate`` and ``predict`` work from any folder."""

    def absolute(p: str) -> str:
        return p if "://" in p else os.path.abspath(os.path.expanduser(p))

    out = cfg.model_dump()
    task, ts = out["task"], out["train_side"]
    if task["data_dir"] is not None:
        task["data_dir"] = absolute(task["data_dir"])
    task["files"] = {k: absolute(v) for k, v in task["files"].items()}
    out["cache"]["root"] = absolute(cfg.cache.resolved_root)
    if os.path.isdir(out["backbone"]["name"]):
        out["backbone"]["name"] = absolute(out["backbone"]["name"])
    ts["epochs"], ts["run_dir"] = epochs, absolute(ts["run_dir"])
    ts["warmup_steps"] = warmup_steps_of(cfg, total_steps)
    return out


def majority_class(cache: CommittedCache, spec: TaskSpec) -> dict[str, Any] | None:
    """Classification: the validation score of always predicting the most frequent label
    (``label``, ``score``); None for regression. A best score equal to it learned nothing."""
    if spec.is_regression or spec.generation or spec.captioning:
        return None
    memo = _MAJORITY.get(cache.key)
    if memo is None:
        labels = np.asarray(cache.array(layout.labels_path("validation"))[:]).astype(np.int64)
        if not len(labels):
            return None
        top = int(np.bincount(labels).argmax())
        soft = split_targets(cache, "validation")
        score = compute_metrics(spec, np.full_like(labels, top), labels, soft)["score"]
        name = spec.labels[top] if spec.labels and top < len(spec.labels) else str(top)
        memo = _MAJORITY[cache.key] = {"label": name, "score": score}
    return memo


_MAJORITY: dict[str, dict[str, Any]] = {}


def class_weight_of(cfg: StageConfig, cache: CommittedCache, spec: TaskSpec) -> torch.Tensor | None:
    """``train_side.class_weight``: "balanced", ``n / (n_classes * n_c)`` for each class c of the
    training split's n labels, n_classes those present (scikit-learn's
    ``compute_class_weight("balanced")``; a class with no training example weighs 1, it is never
    a target); "none": None. A classification head's only: else one line, before any work."""
    how = cfg.train_side.class_weight
    if how == "none":
        return None
    what = None
    if spec.is_regression:
        what = "a regression task"
    elif spec.generation or spec.captioning:
        what = "an answer generated token by token"
    elif cfg.train_side.head == "lm":
        what = "label words scored by the LM head, --head lm"
    elif candidates_of(cache) is not None:
        what = "label strings scored by T5"
    if what is not None:
        raise StageError(
            f"class_weight {how!r} on {spec.name} ({what}); allowed: 'none', or a classification "
            "head (encoder-only or decoder-only backbone, head cls)"
        )
    labels = np.asarray(cache.array(layout.labels_path("train"))[:]).astype(np.int64)
    counts = np.bincount(labels, minlength=spec.num_labels)
    present = counts > 0
    weight = np.ones(spec.num_labels)
    weight[present] = len(labels) / (present.sum() * counts[present])
    return torch.from_numpy(weight).float()


def majority_note(
    best_score: float, best_epoch: int, majority: dict[str, Any] | None
) -> str | None:
    """``equals always predicting '<label>'`` when a network's best validation score is the
    majority-class score, else None."""
    if majority is None or best_epoch < 1 or not math.isfinite(best_score):
        return None
    if abs(best_score - majority["score"]) > 1e-9:
        return None
    return f"equals always predicting {majority['label']!r}"


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
        side_config(cfg, r, spec, cache).validate(bcfg)
        if cfg.train_side.init != "random":
            load_side_init(cache, r, cfg.train_side.init)
    return trials


def side_config(
    cfg: StageConfig, r: int, spec: TaskSpec, cache: CommittedCache | None = None
) -> SideConfig:
    """The side network of a trial; ``train_side.head: lm`` on a classification task (a
    verbaliser) reads its label words' tokens from ``cache`` (stage one's ``verbaliser``)."""
    t = cfg.train_side
    label_tokens = None
    if answer_template(t.head, spec):
        verbaliser = None if cache is None else cache.manifest.get("verbaliser")
        if verbaliser is None:
            where = "this training" if cache is None else f"cache {cache.key}"
            raise StageError(
                f"--head lm needs the label words' tokens of a fields-answer cache; {where} has "
                "none (multi-task training: allowed --head cls)"
            )
        label_tokens = tuple(verbaliser["label_tokens"])
    return SideConfig(
        reduction_factor=r,
        kept_layers=None if t.kept_layers is None else tuple(t.kept_layers),
        fusion=t.fusion,
        xladder_depth=t.xladder_depth,
        ladder_dropout=t.ladder_dropout,
        dropout=t.dropout,
        num_labels=spec.num_labels,
        head="lm" if spec.generation or label_tokens is not None else "cls",
        label_tokens=label_tokens,
    )


def load_side_init(cache: CommittedCache, r: int, method: str) -> dict[str, torch.Tensor]:
    have = cache.manifest.get("side_init", {})
    if method not in have.get(f"r{r}", []):
        raise StageError(
            f"cache {cache.key} has no {method} side_init for reduction factor {r} (it has "
            f"{have or 'none'}); re-extract with --side-init-factors including {r}, or use --init random"
        )
    group = cache.group[layout.side_init_prefix(r, method)]
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


def frozen_lm_head(cache: CommittedCache) -> torch.Tensor | None:
    """The backbone's frozen LM head [V, d] the cache stores (T5, verbalisers), else None."""
    if "lm_head" not in cache.manifest.get("frozen", []):
        return None
    return torch.from_numpy(np.asarray(cache.array(layout.frozen_path("lm_head"))[...]))


def build_trial(
    cfg: StageConfig,
    cache: CommittedCache,
    bcfg: Any,
    spec: TaskSpec,
    trial: Trial,
    total_steps: int,
    images: Sequence[CommittedCache] | None = None,
    device: torch.device | None = None,
) -> TrialState:
    """A side network (seeded, initialised as asked), its AdamW and linear warm-up schedule,
    on ``device`` (default: the CPU); built on the CPU, so a seed gives the same initial
    weights on every device.

    ``images``: the caches whose image features the network reads, and standardises its visual
    tokens with (default: ``cache``, if the run reads its images; a T5 task list: its VL tasks').
    """
    torch.manual_seed(trial.seed)
    lm_head = frozen_lm_head(cache)
    if images is None:
        images = [cache] if visual_of(cfg, cache) is not None else []
    if images:  # visual tokens before the text (ladder.vision)
        visual = visual_of(cfg, images[0])
        assert visual is not None
        side = side_config(cfg, trial.r, spec, cache)
        n_images, tokens_per_image = image_layout(images)
        net = build_visual_side_network(
            bcfg,
            side,
            visual["d"],
            n_images,
            cfg.train_side.visual_fusion,
            lm_head,  # T5: the frozen LM head
            visual_readout=cfg.train_side.visual_readout,
        )
        net.set_visual_stats(*train_visual_stats(*images))
        net.set_tokens_per_image(tokens_per_image)
    else:
        net = build_side_network(bcfg, side_config(cfg, trial.r, spec, cache), lm_head)
    if cfg.train_side.init != "random":
        net.load_side_init(load_side_init(cache, trial.r, cfg.train_side.init))
    return trial_state(cfg, net, trial, total_steps, device)


def stream_layers(
    net: torch.nn.Module, candidates: Sequence[str] | None, captioning: bool = False
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The backbone states a network reads from a task's cache, per stream: (training,
    evaluation). ``enc`` always; T5 trains on the ``dec`` stream (the verbalised target or the
    caption) and scores each of its ``candidates`` (label strings) on its own stream;
    ``captioning`` validates on the teacher-forced caption loss (``dec``)."""
    train = {"enc": net.needed_layers("enc")}
    if candidates is not None or captioning:
        train["dec"] = net.needed_layers("dec")
    evaluation = {"enc": train["enc"]}
    if candidates is not None:
        evaluation.update({s: train["dec"] for s in layout.cand_streams(len(candidates))})
    if captioning:
        evaluation["dec"] = train["dec"]
    return train, evaluation


def train_visual_stats(*caches: CommittedCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of the visual tokens of the training split's images (what a VL
    side network standardises its visual tokens with; ``VisualInput.set_visual_stats``);
    several caches (a multi-task run's VL tasks): over all their training images."""
    key = tuple(cache.key for cache in caches)
    if key not in _VISUAL_STATS:  # once per process: every trial of a run asks
        tables = [ImageTable(cache, memory_budget=0) for cache in caches]  # streamed
        _VISUAL_STATS[key] = visual_stats(
            b for t in tables for b in t.blocks(np.unique(t.index["train"]))
        )
    return _VISUAL_STATS[key]


_VISUAL_STATS: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def trial_state(
    cfg: StageConfig,
    net: torch.nn.Module,
    trial: Trial,
    total_steps: int,
    device: torch.device | None = None,
) -> TrialState:
    """A built network moved to ``device`` (default: the CPU), with its AdamW and schedule; its
    RNG stream starts from the device's global one (seeded by ``build_trial``)."""
    t = cfg.train_side
    device = device or torch.device("cpu")
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=trial.lr, weight_decay=t.weight_decay, eps=1e-8)
    schedule = linear_schedule(warmup_steps_of(cfg, total_steps), total_steps)
    ts = TrialState(trial, net, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    ts.device = device
    ts.autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(t.precision)
    if t.precision == "float16":
        ts.scaler = torch.amp.GradScaler(device.type)
    ts.rng = get_rng(device)  # its own stream from here on: see train_step
    return ts


def side_device(cfg: StageConfig) -> torch.device:
    """Where the side networks train (``train_side.device``; auto: CUDA when present)."""
    try:
        return pick_device(cfg.train_side.device)
    except LadderError as e:
        raise StageError(str(e).replace("device ", "train_side.device ", 1)) from None


def training_device(cfg: StageConfig) -> torch.device:
    """What a training run (one task or a task list) sets up first: the side networks' device
    (:func:`side_device`), the precision checked for it (:func:`check_precision`), and on the
    CPU its threads."""
    device = side_device(cfg)
    check_precision(cfg, device)
    if device.type == "cpu":
        # the side network's matrices are small: a second intra-op thread costs more in
        # synchronisation than it gains, and the loader thread needs a core of its own
        torch.set_num_threads(cfg.train_side.threads or max(1, (os.cpu_count() or 2) - 1))
    return device


def check_precision(cfg: StageConfig, device: torch.device) -> None:
    """``train_side.precision`` against the rest, before any work: float16 with ``batched:
    on`` is refused (a stacked group has no loss scale); a line on stderr when a half precision
    is asked for on the CPU, where it is slower than float32."""
    t = cfg.train_side
    if t.precision == "float16" and t.batched == "on":
        raise StageError(
            "--batched on with --precision float16: a stacked group's optimizer has no loss "
            "scale; allowed: --batched auto or off (one by one), or --precision bfloat16"
        )
    if device.type == "cpu" and (precision := t.precision) != "float32":
        print(
            f"warning: --precision {precision} on the CPU: without {precision} arithmetic units "
            "it runs several times slower than float32 (bfloat16: 5-8x in bench.vqa --quick "
            "here); it is meant for GPUs",
            file=sys.stderr,
            flush=True,
        )


def get_rng(device: torch.device) -> torch.Tensor:
    """The state of the global random stream that draws on ``device`` (dropout masks)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def set_rng(device: torch.device, state: torch.Tensor) -> None:
    """Set the global random stream that draws on ``device`` (:func:`get_rng`)."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def autocast(ts: TrialState) -> torch.autocast:
    """The network's forward precision (``train_side.precision``): autocast to bfloat16 or
    float16, or off."""
    return torch.autocast(ts.device.type, ts.autocast or torch.bfloat16, ts.autocast is not None)


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
    """One optimizer step of one network, on that network's own RNG stream (dropout).

    Each network draws from its own torch RNG state (set before its step, kept after), so its
    figures depend on its seed alone, not on the other networks of the run: a network that
    resumes behind the others catches up on its own stream. With one network this is the
    global stream as it was.
    """
    if ts.rng is not None:
        set_rng(ts.device, ts.rng)
    try:
        with autocast(ts):
            loss = _forward_loss(ts, batch.to(ts.device), states)
        ts.opt.zero_grad(set_to_none=True)
        if ts.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ts.net.parameters(), max_grad_norm)
            ts.opt.step()
        else:  # float16: gradients of the scaled loss, unscaled before clipping; a step
            # whose gradients overflowed is skipped and the scale lowered (GradScaler)
            ts.scaler.scale(loss).backward()
            ts.scaler.unscale_(ts.opt)
            torch.nn.utils.clip_grad_norm_(ts.net.parameters(), max_grad_norm)
            ts.scaler.step(ts.opt)
            ts.scaler.update()
        ts.sched.step()
        return float(loss.detach())
    finally:
        ts.rng = get_rng(ts.device)


def _forward_loss(ts: TrialState, batch: Batch, states: StateSource) -> torch.Tensor:
    ts.net.train()
    if "enc" in batch.target_ids:  # generation: the answer tokens, under teacher forcing
        loss = ts.net.lm_loss(states(batch, "enc"), batch.masks["enc"], batch.target_ids["enc"])
    elif "dec" in batch.masks:  # T5: teacher forcing on the verbalised target
        _, loss = ts.net(
            states(batch, "enc"),
            batch.masks["enc"],
            states(batch, "dec"),
            None,
            batch.target_ids["dec"],
            **visual_inputs(batch),
        )
    else:
        if ts.compiled is not None and batch.visual is None:
            loss = ts.compiled(states(batch, "enc"), batch.masks["enc"], batch.labels)
        else:
            logits = ts.net(states(batch, "enc"), batch.masks["enc"], **visual_inputs(batch))
            loss = ts.net.loss(logits, batch.labels)
    return loss


class StackedGroup:
    """Networks of one shape trained as one stacked model (``ladder.stacked``) for an epoch.

    Built from the networks' own state (weights, AdamW moments and step, RNG) and written back
    by :meth:`unpack` (end of the epoch, or when one of them stops), so evaluation, checkpoints
    and resume see each network as if it had trained alone. Each network keeps its learning-rate
    schedule (``ts.sched``, stepped every step) and its own random stream (a ``torch.Generator``
    holding its state): its dropout masks are the ones it draws alone.
    """

    def __init__(self, members: list[TrialState]) -> None:
        if any(ts.scaler is not None for ts in members):
            raise ValueError("float16 networks train one by one (stack_groups): a loss scale each")
        self.members = members
        self._pack()

    def _pack(self) -> None:
        ms = self.members
        self.stack = stack_networks([ts.net for ts in ms])
        wd = ms[0].opt.param_groups[0]["weight_decay"]
        self.opt = StackedAdamW(self.stack.params, len(ms), wd)
        for k, ts in enumerate(ms):
            own = dict(ts.net.named_parameters())
            for name in self.stack.names:
                st = ts.opt.state.get(own[name])
                if st:
                    self.opt.exp_avg[name][k].copy_(st["exp_avg"])
                    self.opt.exp_avg_sq[name][k].copy_(st["exp_avg_sq"])
                    self.opt.steps[k] = float(st["step"])
        self.device = ms[0].device
        self.gens = []
        for ts in ms:
            g = torch.Generator(self.device)
            g.set_state(ts.rng if ts.rng is not None else get_rng(self.device))
            self.gens.append(g)

    @torch.no_grad()
    def unpack(self) -> None:
        """Write weights, AdamW state and RNG back into each network."""
        if not self.members:
            return
        self.stack.unstack()
        for k, ts in enumerate(self.members):
            if self.opt.steps[k] > 0:
                own = dict(ts.net.named_parameters())
                for name in self.stack.names:
                    ts.opt.state[own[name]] = {
                        "step": torch.tensor(self.opt.steps[k], dtype=torch.float32),
                        "exp_avg": self.opt.exp_avg[name][k].clone(),
                        "exp_avg_sq": self.opt.exp_avg_sq[name][k].clone(),
                    }
            ts.rng = self.gens[k].get_state()

    def drop(self, stopped: list[TrialState]) -> None:
        """Take networks out (stopped): written back, the others stacked again."""
        self.unpack()
        self.members = [ts for ts in self.members if ts not in stopped]
        if self.members:
            self._pack()

    def step(self, batch: Batch, states: StateSource, max_grad_norm: float) -> list[float]:
        """One optimizer step of every network; their losses."""
        batch = batch.to(self.device)
        with autocast(self.members[0]):
            # online dropout: the backbone draws from the first network's stream, as train_step
            set_rng(self.device, self.gens[0].get_state())
            hiddens = states(batch, "enc")
            self.gens[0].set_state(get_rng(self.device))
            logits = self.stack.forward(
                hiddens, batch.masks["enc"], self.gens, **visual_inputs(batch)
            )
            losses = self.stack.losses(logits, batch.labels)
        self.opt.zero_grad()
        losses.sum().backward()
        self.opt.clip_(max_grad_norm)
        self.opt.step([ts.opt.param_groups[0]["lr"] for ts in self.members])
        with warnings.catch_warnings():  # the schedule of an optimizer stepped here, not by itself
            warnings.simplefilter("ignore", UserWarning)
            for ts in self.members:
                ts.sched.step()
        return losses.detach().tolist()


def stack_groups(cfg: StageConfig, runs: list[TrialState], tokens: int) -> dict[str, int]:
    """Which networks train stacked, and with which: trial name -> group number.

    ``train_side.batched``: ``off`` none; ``on`` every stackable network (one of a shape alone
    too); ``auto`` the networks of a shape that more than one network of the grid shares. The
    decision is the grid's, not an epoch's: a network that resumes behind the others trains the
    same way as in an uninterrupted run. A shape's networks are split into groups whose
    activations (:func:`ladder.stacked.activation_bytes` at ``batch_size`` x ``tokens``) fit
    ``train_side.memory_mb``.
    """
    t = cfg.train_side
    if t.batched == "off" or t.precision == "float16":  # float16: one by one (check_precision)
        return {}
    shapes: dict[tuple, list[TrialState]] = {}
    for ts in runs:
        if stackable(ts.net):
            shapes.setdefault(shape_key(ts.net), []).append(ts)
    out: dict[str, int] = {}
    for members in shapes.values():
        if t.batched == "auto" and len(members) < 2:
            continue
        per = activation_bytes(members[0].net, t.batch_size, tokens)
        i = 0
        for size in group_sizes(len(members), per, t.memory_mb << 20):
            group = len(set(out.values()))
            for ts in members[i : i + size]:
                out[ts.trial.name] = group
            i += size
    return out


def compile_on(cfg: StageConfig, device: str) -> bool:
    """``train_side.compile``: on, off, or auto (on for CUDA; off on CPU, where compiling the
    step was measured not to pay: README, "Measured here")."""
    c = cfg.train_side.compile
    return c == "on" or (c == "auto" and device != "cpu")


def compile_networks(runs: list[TrialState], groups: dict[str, int]) -> None:
    """torch.compile (inductor) the forward and loss of each network trained one by one.

    Inductor's artefacts are cached on disk (its FX graph and AOT autograd caches, under
    ``TORCHINDUCTOR_CACHE_DIR``, default ``~/.cache/lst-pipeline/inductor``), so a second run of
    the same shapes does not compile again. Random ops fall back to ATen (``fallback_random``):
    the dropout masks, the attention's 1-byte one included, are the bits eager draws, from the
    network's own stream. Shapes change with the loader's length buckets (bounded by the max
    length): after a second shape the graph is recompiled with dynamic sizes. The T5 family and
    stacked groups run eager (their candidates / per-network generators are not traced).
    """
    import torch._inductor.config as inductor_config

    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "lst-pipeline" / "inductor")
    )
    inductor_config.fallback_random = True
    for ts in runs:
        if ts.trial.name in groups or not hasattr(ts.net, "loss") or getattr(ts.net, "lm", False):
            continue
        net = ts.net

        def forward_loss(
            h: dict, mask: torch.Tensor, labels: torch.Tensor, net: torch.nn.Module = net
        ) -> torch.Tensor:
            return net.loss(net(h, mask), labels)

        ts.compiled = torch.compile(forward_loss)


def _graphs() -> int:
    """Graphs compiled so far in this process (0 without torch.compile)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def visual_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The visual tokens of a VL batch as the side network takes them (from the cache in both
    modes: the vision encoder is frozen and sees no gradient); none for a text batch."""
    return {} if batch.visual is None else {"visual": batch.visual}


@torch.no_grad()
def batch_outputs(
    net: torch.nn.Module,
    batch: Batch,
    states: StateSource,
    candidates: list[str] | None,
) -> torch.Tensor:
    """A batch's raw outputs: logits ``[B, labels]`` (a regression head: ``[B, 1]``); for T5 the
    summed log-probability of every candidate label string, ``[B, candidates]``."""
    net.eval()
    batch = batch.to(next(net.parameters()).device)
    if candidates is None:
        return net(states(batch, "enc"), batch.masks["enc"], **visual_inputs(batch)).float().cpu()
    C = len(candidates)
    streams = layout.cand_streams(C)
    T = max(batch.masks[s].shape[1] for s in streams)

    def pad(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(
            x, (0, 0, 0, T - x.shape[1]) if x.dim() == 3 else (0, T - x.shape[1]), value=value
        )

    per = [states(batch, s) for s in streams]
    dec = {n: torch.stack([pad(p[n], 0.0) for p in per], 1) for n in per[0]}  # [B, C, T, d]
    labels = torch.stack([pad(batch.target_ids[s], -100) for s in streams], 1)  # [B, C, T]
    enc, enc_mask = states(batch, "enc"), batch.masks["enc"]
    return net.score_candidates(enc, enc_mask, dec, None, labels, **visual_inputs(batch)).cpu()


def predictions_of(
    outputs: torch.Tensor, spec: TaskSpec, candidates: list[str] | None
) -> np.ndarray:
    """Class ids or scores from :func:`batch_outputs` (T5: the best-scored candidate string)."""
    if candidates is None:
        return outputs.squeeze(-1).numpy() if spec.is_regression else outputs.argmax(-1).numpy()
    best = outputs.argmax(-1).numpy()
    if spec.is_regression:
        return np.asarray([float(candidates[k]) for k in best], dtype=np.float32)
    return np.asarray([int(candidates[k]) for k in best]) if len(best) else best


def predict_batch(
    net: torch.nn.Module,
    batch: Batch,
    states: StateSource,
    spec: TaskSpec,
    candidates: list[str] | None,
) -> np.ndarray:
    """Class ids or scores for a batch; T5 scores every candidate label string."""
    return predictions_of(batch_outputs(net, batch, states, candidates), spec, candidates)


def split_targets(cache: CommittedCache, split: str) -> list[tuple[tuple[int, float], ...]] | None:
    """A split's scored answers per example (``Example.targets``) where the cache stores them
    (tasks scored by the VQA score), else None (the metric is then the top answer's)."""
    if not cache.manifest["splits"][split].get("targets"):
        return None
    paths = layout.target_arrays(split)
    return targets_of_table(
        np.asarray(cache.array(paths["classes"])[...]),
        np.asarray(cache.array(paths["scores"])[...]),
    )


def split_batches(
    loader: CacheLoader, progress: str | None = None, networks: Sequence[TrialState] = ()
) -> Iterator[Batch]:
    """One pass over a split's batches, in the loader's order, under a progress bar described
    ``progress`` (None: no bar), on the device of ``networks`` (the CPU when none): what every
    evaluation of the networks of a run iterates."""
    device = networks[0].device if networks else torch.device("cpu")
    with tqdm(
        total=len(loader), unit="batch", desc=progress, disable=progress is None, leave=False
    ) as bar:
        for batch in on_device(torch_batches(loader.epoch(0)), device):
            yield batch
            bar.update(1)


def evaluate(
    ts_list: list[TrialState],
    loader: CacheLoader,
    states: StateSource,
    spec: TaskSpec,
    candidates: list[str] | None,
    progress: str | None = None,
    targets: Sequence[Sequence[tuple[int, float]]] | None = None,
) -> list[dict[str, float]]:
    """The task metrics of every network on one split, one pass over the loader; ``progress``:
    a progress bar's description; ``targets``: the split's scored answers per example
    (:func:`split_targets`), which make the score the VQA score."""
    if spec.generation:
        return evaluate_generation(ts_list, loader, states, progress)
    if spec.captioning:
        return evaluate_captions(ts_list, loader, states, progress)
    preds: list[list[np.ndarray]] = [[] for _ in ts_list]
    index, labels = [], []
    for batch in split_batches(loader, progress, ts_list):
        index.append(batch.index.numpy())
        labels.append(batch.labels.cpu().numpy())
        for k, ts in enumerate(ts_list):
            preds[k].append(predict_batch(ts.net, batch, states, spec, candidates))
    y = np.concatenate(labels)
    order = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
    soft = None if targets is None else [targets[i] for i in order]
    return [compute_metrics(spec, np.concatenate(p), y, soft) for p in preds]


def cached_predictions(
    cfg: StageConfig, folder: Path, name: str, split: str = "test", cache_key: str | None = None
) -> np.ndarray:
    """Class ids (or scores) per example of a split, in the split's order, of network ``name``'s
    best checkpoint in run ``folder``, from the cache's states and image features: what
    train-side's evaluation computes (``cache_key``: default, the network's own cache)."""
    outputs, spec, candidates = cached_outputs(cfg, folder, name, split, cache_key)
    return predictions_of(outputs, spec, candidates)


def cached_outputs(
    cfg: StageConfig, folder: Path, name: str, split: str = "test", cache_key: str | None = None
) -> tuple[torch.Tensor, TaskSpec, list[str] | None]:
    """:func:`cached_predictions`' raw outputs per example (:func:`batch_outputs`: logits, or
    T5 candidate scores), with the cache's task spec and T5 candidates."""
    saved = json.loads((Path(folder) / f"{name}.config.json").read_text())
    cache = resolve_cache(cfg, cache_key or saved["cache"])
    spec, candidates = task_spec_of(cache), candidates_of(cache)
    # the checkpoint's weights (below) into the network it was saved from
    rebuilt: dict[str, Any] = {"init": "random"}
    if "visual" in saved:  # saved before visual ladders existed: tokens at the input
        rebuilt["visual_fusion"] = saved_visual_fusion(saved["visual"])
        rebuilt["visual_readout"] = saved_visual_readout(saved["visual"])
    weights_only = cfg.train_side.model_copy(update=rebuilt)
    cfg = cfg.model_copy(update={"train_side": weights_only})
    ts = build_trial(cfg, cache, backbone_config_of(cache), spec, Trial(**saved["trial"]), 1)
    best = Path(folder) / f"{name}.best.safetensors"
    load_into(ts.net, load_file(str(best)), str(best))
    return split_outputs(cfg, ts.net, cache, split, candidates), spec, candidates


def split_outputs(
    cfg: StageConfig,
    net: torch.nn.Module,
    cache: CommittedCache,
    split: str,
    candidates: list[str] | None = None,
) -> torch.Tensor:
    """A loaded network's raw outputs (:func:`batch_outputs`) per example of a cache's split, in
    the split's order, from the cache's states (and image features where ``cfg`` reads them)."""
    _, layers = stream_layers(net, candidates)
    loader = CacheLoader(
        cache,
        split,
        layers,
        batch_size=cfg.train_side.batch_size * 2,
        shuffle=False,
        memory_budget=cfg.train_side.memory_mb << 20,
        images=(
            ImageTable(cache, cfg.train_side.memory_mb << 20)
            if visual_of(cfg, cache) is not None
            else None
        ),
    )
    out: torch.Tensor | None = None
    for batch in torch_batches(loader.epoch(0)):
        o = batch_outputs(net, batch, cached_states, candidates)
        if out is None:
            out = o.new_zeros((cache.manifest["splits"][split]["n_examples"], *o.shape[1:]))
        out[batch.index] = o
    return out if out is not None else torch.zeros(0, 1)


@torch.no_grad()
def answer_scores(
    net: torch.nn.Module, batch: Batch, states: StateSource
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A generation batch under teacher forcing: per example the summed answer-token loss, the
    answer tokens (+ EOS), and whether the argmax got every one of them right (all [B])."""
    net.eval()
    labels = batch.target_ids["enc"]
    logits, targets, rows = net.answer_logits(states(batch, "enc"), batch.masks["enc"], labels)
    B = labels.shape[0]
    nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    wrong = (logits.argmax(-1) != targets).float()
    loss = torch.zeros(B).index_add_(0, rows.cpu(), nll.cpu())
    n = torch.zeros(B).index_add_(0, rows.cpu(), torch.ones_like(nll).cpu())
    right = torch.zeros(B).index_add_(0, rows.cpu(), wrong.cpu()) == 0
    return loss, n, right


def evaluate_generation(
    ts_list: list[TrialState],
    loader: CacheLoader,
    states: StateSource,
    progress: str | None = None,
) -> list[dict[str, float]]:
    """Generation tasks, from the cache: ``answer_loss`` (mean cross-entropy per answer token,
    EOS included) and ``exact_match`` (x100, the ``score``) of every network on one split.

    Exact match is the share of examples whose teacher-forced argmax is right at every answer
    position (and at EOS). That equals greedy generation's exact match: greedy decoding feeds back
    its own argmax, so as long as every argmax so far was the answer's token, it has fed the
    answer itself, exactly what teacher forcing feeds; by induction it emits the whole answer
    and then EOS (stops right there) iff every teacher-forced argmax is right. With the first
    wrong argmax both count the example as wrong. (Ties in the argmax aside, which the cache's
    float rounding could break differently than a live pass.)
    """
    right: list[list[torch.Tensor]] = [[] for _ in ts_list]
    loss = [0.0 for _ in ts_list]
    tokens = [0.0 for _ in ts_list]
    for batch in split_batches(loader, progress, ts_list):
        for k, ts in enumerate(ts_list):
            lo, n, ok = answer_scores(ts.net, batch, states)
            loss[k] += float(lo.sum())
            tokens[k] += float(n.sum())
            right[k].append(ok)
    out = []
    for k in range(len(ts_list)):
        ok = torch.cat(right[k]).float() if right[k] else torch.zeros(0)
        em = float(ok.mean()) * 100 if len(ok) else 0.0
        out.append({"exact_match": em, "answer_loss": loss[k] / max(tokens[k], 1.0), "score": em})
    return out


@torch.no_grad()
def caption_loss(net: torch.nn.Module, batch: Batch, states: StateSource) -> tuple[float, int]:
    """A captioning batch under teacher forcing on the ``dec`` stream (the caption): the summed
    token cross-entropy over its caption tokens (EOS included) and their number."""
    net.eval()
    labels = batch.target_ids["dec"]  # [B, T_dec], -100 on padding
    logits, _ = net(
        states(batch, "enc"), batch.masks["enc"], states(batch, "dec"), None, None,
        **visual_inputs(batch),
    )  # fmt: skip
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten().long(), ignore_index=-100, reduction="sum"
    )
    return float(nll), int((labels != -100).sum())


def evaluate_captions(
    ts_list: list[TrialState],
    loader: CacheLoader,
    states: StateSource,
    progress: str | None = None,
) -> list[dict[str, float]]:
    """Captioning, from the cache: ``caption_loss``, the mean teacher-forced cross-entropy per
    caption token (validation and test: on each image's first reference), of every network.
    Lower is better, so the ``score`` (what picks the best epoch) is its negative. CIDEr needs
    generated captions, hence the live backbone decoder: ``pipeline evaluate``."""
    loss = [0.0 for _ in ts_list]
    tokens = [0 for _ in ts_list]
    for batch in split_batches(loader, progress, ts_list):
        for k, ts in enumerate(ts_list):
            lo, n = caption_loss(ts.net, batch, states)
            loss[k] += lo
            tokens[k] += n
    out = []
    for k in range(len(ts_list)):
        mean = loss[k] / max(tokens[k], 1)
        out.append({"caption_loss": mean, "score": -mean})
    return out


# --- the run folder ----------------------------------------------------------------------------------


def run_signature(cfg: StageConfig, cache_key: str, online: str | None) -> dict[str, Any]:
    """What defines a run: a run folder with another signature is refused, not overwritten."""
    t = cfg.train_side.model_dump()
    t.pop("run_dir")
    t.pop("report_to", None)  # where figures are reported does not change them
    # how the networks are computed changes their figures by float rounding at most
    t.pop("batched", None)
    t.pop("compile", None)
    t.pop("device", None)  # a checkpoint holds its device's random stream: load_checkpoint
    if t.get("precision") == "float32":  # runs made before the option
        t.pop("precision", None)
    # runs made before the option still resume
    for key in ("warmup_ratio", "xladder_depth", "dropout"):
        if t.get(key) is None:
            t.pop(key, None)
    # it changes VL networks only: text runs still resume, and so do VL runs made before the
    # option (their networks took the tokens at the input)
    if cfg.backbone.vision is None or t.get("visual_fusion") == "input":
        t.pop("visual_fusion", None)
    if t.get("visual_readout") == "text":  # runs made before the option read the text token
        t.pop("visual_readout", None)
    if t.get("class_weight") == "none":  # runs made before the option weighed classes alike
        t.pop("class_weight", None)
    return {
        "cache": cache_key,
        "train_side": t,
        "epochs": epochs_of(cfg, cfg.task.name),
        "online": online,
        **({"vision": cfg.backbone.vision} if cfg.backbone.vision is not None else {}),
    }


def run_folder(
    cfg: StageConfig, signature: dict[str, Any], name: str | None, *, private: bool = False
) -> Path:
    """The run's folder (created; owner-only when ``private``), refusing another configuration's."""
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:8]
    folder = Path(cfg.train_side.run_dir) / (name or f"{signature['cache']}-{digest}")
    sig_file = folder / "run.json"
    if sig_file.exists():
        try:
            existing = json.loads(sig_file.read_text())
        except ValueError:
            raise StageError(
                f"{sig_file} is not valid JSON (truncated?); delete the run folder {folder} "
                "or choose another --run-name"
            ) from None
        if existing != signature:
            diff = sorted(
                k for k in set(existing) | set(signature) if existing.get(k) != signature.get(k)
            )
            raise StageError(
                f"run folder {folder} belongs to another configuration (differs in {', '.join(diff)}); "
                "choose another --run-name or delete it"
            )
    make_private_dir(folder, private)
    if not sig_file.exists():
        write_atomic(
            sig_file,
            lambda tmp: tmp.write_text(json.dumps(signature, indent=1, sort_keys=True)),
        )
    return folder


def open_run(
    cfg: StageConfig,
    folder: Path,
    runs: list[TrialState],
    epochs: int,
    total_steps: int,
    progress: bool,
    echo: bool,
) -> tuple[int, tracking.Tracker, Callable[[str], None] | None]:
    """Start or resume a run folder: each network's next epoch from its checkpoints, the resolved
    config saved, the tracker opened; returns (first epoch to run, tracker, the epoch-line echo:
    stdout beside the bars, stderr under ``--json``, None when ``echo`` is off)."""
    for ts in runs:
        ts.next_epoch = load_checkpoint(folder, ts, epochs)
    start = min(ts.next_epoch for ts in runs)
    saved_cfg = redact_config(resolved_config(cfg, epochs, total_steps))
    _save_json(folder / "config.json", saved_cfg)
    names = [ts.trial.name for ts in runs]
    tracker = tracking.make_tracker(cfg.train_side.report_to, folder, names, saved_cfg)
    say = None
    if echo:
        out = sys.stdout if progress else sys.stderr
        say = lambda line: tqdm.write(line, file=out)  # noqa: E731
    return start, tracker, say


def _save_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj)


def save_checkpoint(folder: Path, ts: TrialState, epoch: int) -> None:
    """After an epoch: weights, optimizer, schedule, the network's RNG and history, atomically."""
    path = folder / "checkpoints" / f"{ts.trial.name}.last.pt"
    path.parent.mkdir(exist_ok=True)
    state = {
        "epoch": epoch,
        "net": ts.net.state_dict(),
        "opt": ts.opt.state_dict(),
        "sched": ts.sched.state_dict(),
        "rng": ts.rng if ts.rng is not None else get_rng(ts.device),
        "rng_device": ts.device.type,
        **({"scaler": ts.scaler.state_dict()} if ts.scaler is not None else {}),
        "history": ts.history,
        "best_score": ts.best_score,
        "best_epoch": ts.best_epoch,
        "compute_s": ts.compute_s,
        "compile_s": ts.compile_s,
        "stopped": ts.stopped,
    }
    buf = io.BytesIO()  # serialised first: a write error is then a plain OSError (ENOSPC)
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue())


def load_checkpoint(folder: Path, ts: TrialState, epochs: int) -> int:
    """Restore a trial's last finished epoch, RNG included; returns its next epoch (0 if none).

    A network that was stopped (non-finite loss) does not train again: ``epochs``.
    """
    path = folder / "checkpoints" / f"{ts.trial.name}.last.pt"
    if not path.exists():
        return 0
    try:
        ck = torch.load(path, weights_only=False)
    except Exception as e:
        raise StageError(
            f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to retrain "
            "that network from the start"
        ) from None
    trained_on = ck.get("rng_device", "cpu")
    if trained_on != ts.device.type:
        raise StageError(
            f"checkpoint {path} was trained on {trained_on} (its random stream is that "
            f"device's); allowed: resume it with train_side.device {trained_on}, or delete it to "
            "retrain that network from the start"
        )
    load_into(ts.net, ck["net"], str(path))
    ts.opt.load_state_dict(ck["opt"])
    ts.sched.load_state_dict(ck["sched"])
    ts.history, ts.best_score, ts.best_epoch = ck["history"], ck["best_score"], ck["best_epoch"]
    ts.compute_s = ck.get("compute_s", 0.0)
    ts.compile_s = ck.get("compile_s", 0.0)
    ts.rng = ck["rng"]
    if ts.scaler is not None and "scaler" in ck:
        ts.scaler.load_state_dict(ck["scaler"])
    ts.stopped = ck.get("stopped")
    return epochs if ts.stopped else ck["epoch"] + 1


def load_into(net: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """A checkpoint's weights into the network rebuilt for it, every key accounted for: a
    missing or unexpected key (a network rebuilt otherwise than it was saved, e.g. another
    visual fusion) is one line, not a silent partial load."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StageError(
            f"{source} does not fit the network rebuilt from its config (missing "
            f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'}); "
            "allowed: weights written by train-side for the configuration saved beside them"
        )


def save_best_weights(folder: Path, ts: TrialState) -> None:
    """A network's weights as its best so far: ``<net>.best.safetensors``."""
    state = {k: v.detach().cpu().contiguous() for k, v in ts.net.state_dict().items()}
    write_bytes_atomic(folder / f"{ts.trial.name}.best.safetensors", safetensors_bytes(state))


def task_spec_record(cache: CommittedCache) -> dict[str, Any]:
    """The cache's task as ``<net>.config.json`` records it (``task_spec``, read by ``spec_of``)."""
    return {k: cache.manifest["task"][k] for k in ("name", "labels", "metric", "text_fields")}


def save_best(folder: Path, ts: TrialState, side: SideConfig, cache: CommittedCache) -> None:
    save_best_weights(folder, ts)
    _save_json(
        folder / f"{ts.trial.name}.config.json",
        {
            "side": asdict(side),
            "trial": asdict(ts.trial),
            "cache": cache.key,
            "backbone": cache.manifest["backbone"]["name"],
            "task": cache.manifest["task"]["name"],
            "task_spec": task_spec_record(cache),
            "epoch": ts.best_epoch,
            **({"visual": visual_config(ts.net)} if isinstance(ts.net, VisualInput) else {}),
        },
    )


def visual_config(net: VisualInput) -> dict[str, Any]:
    """What rebuilds a network's visual part (``<net>.config.json``'s ``visual``): the vision
    encoder's width, the images per example, the visual fusion and readout (the family, T5 or
    encoder-only, is the backbone's: ``backbone`` and ``side`` rebuild the rest; a T5 network's
    frozen LM head comes from the cache or the backbone)."""
    return {
        "d": net.d_visual,
        "n_images": net.n_images,
        "fusion": net.visual_fusion,
        "readout": net.visual_readout,
        # a task list mixing one- and two-image tasks: batches tell their images by token count
        **({"tokens_per_image": net.tokens_per_image} if net.tokens_per_image else {}),
    }


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
    echo: bool = True,
) -> TrainResult:
    """Train every trial of ``cfg.train_side`` from the cache (or online, given a backbone).

    ``progress``: progress bars (stderr). ``echo``: one line per network per epoch (loss,
    validation, best so far, time), on stdout beside the bars, else (``--json``) on stderr.
    """
    tracking.require(cfg.train_side.report_to)
    device = training_device(cfg)
    cache = resolve_cache(cfg, cache_key)
    visual_of(cfg, cache)  # a run with images on a cache without them stops here
    spec = task_spec_of(cache)
    # captioning: a T5 cache with image features, read with --vision-encoder
    check_trainable(
        spec, cache.manifest["backbone"].get("family"), visual_of(cfg, cache) is not None
    )
    template = cache.manifest.get("key_inputs", {}).get("template", "")
    if spec.captioning and not template.startswith("t5-caption-"):
        raise StageError(
            f"cache {cache.key} holds captions with template {template or 'unknown'} (extracted "
            "before captioning trained: the caption was the encoder's input); allowed: a "
            "t5-caption cache: run `pipeline run extract` again"
        )
    bcfg = backbone_config_of(cache)
    candidates = candidates_of(cache)
    trials = check_trials(cfg, cache)
    class_weight = class_weight_of(cfg, cache, spec)
    epochs = epochs_of(cfg, spec.name)
    t = cfg.train_side
    n_train = cache.manifest["splits"]["train"]["n_examples"]
    total_steps = epochs * -(-n_train // t.batch_size)
    if (warning := warmup_warning(cfg, total_steps)) is not None:
        print(warning, file=sys.stderr, flush=True)
    runs = [build_trial(cfg, cache, bcfg, spec, tr, total_steps, device=device) for tr in trials]
    if class_weight is not None:  # T5 networks have no classification head to weigh
        for ts in runs:
            ts.net.set_class_weight(class_weight)
    layers, eval_layers = stream_layers(runs[0].net, candidates, spec.captioning)
    mode = None if online is None else ("online-dropout" if online_dropout else "online-eval")
    private = bool(cfg.cache.storage_options)  # a saved config may hint at credentials
    folder = run_folder(cfg, run_signature(cfg, cache.key, mode), run_name, private=private)

    seed0 = trials[0].seed
    budget = t.memory_mb << 20
    images = ImageTable(cache, budget) if visual_of(cfg, cache) is not None else None
    train = CacheLoader(
        cache,
        "train",
        layers,
        batch_size=t.batch_size,
        shuffle=True,
        seed=seed0,
        memory_budget=budget,
        read_states=online is None,
        images=images,
        widen=device.type == "cpu",
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
            images=images,
        )
        for s in ("validation", "test")
    )
    states_train: StateSource = cached_states
    states_eval: StateSource = cached_states
    if online is not None:
        states_train = online_states(online, online_dropout, layers)
        states_eval = online_states(online, False, eval_layers)

    # a stacked group's activations: the text positions and the visual tokens before them
    tokens = cfg.backbone.max_length + (images.n_tokens if images is not None else 0)
    groups = stack_groups(cfg, runs, tokens)
    if compile_on(cfg, device.type):
        compile_networks(runs, groups)
    start, tracker, say = open_run(cfg, folder, runs, epochs, total_steps, progress, echo)
    try:
        _train_epochs(
            runs, folder, train, val, states_train, states_eval, cfg, cache, spec, candidates,
            epochs, start, progress, tracker, say,
            groups=groups,
        )  # fmt: skip
        # the best checkpoint of each network, scored on the test split
        scored = [ts for ts in runs if ts.stopped is None]
        for ts in scored:
            best = folder / f"{ts.trial.name}.best.safetensors"
            load_into(ts.net, load_file(str(best)), str(best))
        tests = (
            evaluate(
                scored, test, states_eval, spec, candidates, None, split_targets(cache, "test")
            )
            if scored
            else []
        )
        _check_cache_still_there(cfg, cache, folder)
    except DiskFull as e:
        raise StageError(
            f"{e}; the run folder {folder} keeps every network's last finished epoch: free "
            "space and run the same command again to resume"
        ) from None
    except Exception as e:
        _check_cache_still_there(cfg, cache, folder, e)
        raise
    finally:
        tracker.close()
    final = {ts.trial.name: r for ts, r in zip(scored, tests, strict=True)}
    metrics = _write_metrics(folder, runs, cache, spec, final=final)
    write_atomic(folder / "training-curves.png", lambda tmp: plot_curves(tmp, metrics, spec))
    return TrainResult(folder, cache.key, metrics)


def _train_epochs(
    runs: list[TrialState],
    folder: Path,
    train: CacheLoader,
    val: CacheLoader,
    states_train: StateSource,
    states_eval: StateSource,
    cfg: StageConfig,
    cache: CommittedCache,
    spec: TaskSpec,
    candidates: list[str] | None,
    epochs: int,
    start: int,
    progress: bool,
    tracker: tracking.Tracker | None = None,
    say: Callable[[str], None] | None = None,
    groups: dict[str, int] | None = None,
) -> None:
    """Epochs ``start`` .. ``epochs - 1``; each network trains only the epochs it has not finished.

    After a kill between two networks' checkpoints the networks stand at different epochs: the
    ones behind catch up (the batch order is a function of the seed and the epoch, the dropout
    of the network's own RNG) while the others wait. A network whose training loss stops being
    finite is stopped there, with the reason in its metrics; the others go on.

    ``tracker`` gets each network's loss and learning rate per step and its validation metrics
    per epoch; ``say`` one line per network per epoch (:func:`epoch_line`). ``groups``: trial
    name -> stacked group (:func:`stack_groups`); the networks of a group that train this epoch
    take their steps as one model (:class:`StackedGroup`), the others one by one.
    """
    t = cfg.train_side
    tracker = tracker or tracking.NullTracker()
    n_batches = len(train)
    for epoch in range(start, epochs):
        active = [ts for ts in runs if ts.next_epoch <= epoch and ts.stopped is None]
        if not active:
            continue
        t0 = time.perf_counter()
        losses: list[list[float]] = [[] for _ in active]
        compile_s = 0.0
        with tqdm(
            total=n_batches,
            unit="batch",
            desc=f"train-side: epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
        ) as bar:
            units = _units(active, groups or {})
            index = {id(ts): k for k, ts in enumerate(active)}
            batches = on_device(torch_batches(train.epoch(epoch)), active[0].device)
            for step, batch in enumerate(batches):
                for unit in units:
                    c0 = time.perf_counter()
                    if isinstance(unit, StackedGroup):
                        if not unit.members:
                            continue
                        members = list(unit.members)
                        lrs = [ts.opt.param_groups[0]["lr"] for ts in members]
                        got = unit.step(batch, states_train, t.max_grad_norm)
                        share = (time.perf_counter() - c0) / len(members)
                    else:
                        if unit.stopped is not None:
                            continue
                        members = [unit]
                        lrs = [unit.opt.param_groups[0]["lr"]]  # the rate this step uses
                        graphs = _graphs()
                        got = [train_step(unit, batch, states_train, t.max_grad_norm)]
                        share = time.perf_counter() - c0
                        if _graphs() != graphs:  # this step compiled: reported apart
                            unit.compile_s += share
                            compile_s += share
                            share = 0.0
                    stopped = []
                    for ts, lr, loss in zip(members, lrs, got, strict=True):
                        ts.compute_s += share
                        if not math.isfinite(loss):
                            ts.stopped = (
                                f"training loss became {loss} at epoch {epoch + 1}, step {step + 1} "
                                f"(learning rate {ts.trial.lr:g}); stopped"
                            )
                            stopped.append(ts)
                        losses[index[id(ts)]].append(loss)
                        tracker.log(
                            ts.trial.name,
                            {"train/loss": loss, "train/learning_rate": lr},
                            epoch * n_batches + step + 1,
                        )
                    if stopped and isinstance(unit, StackedGroup):
                        unit.drop(stopped)
                bar.update(1)
            for unit in units:
                if isinstance(unit, StackedGroup):
                    unit.unpack()
        epoch_s = time.perf_counter() - t0 - compile_s
        going = [ts for ts in active if ts.stopped is None]
        desc = f"train-side: validation after epoch {epoch + 1}/{epochs}"
        scores = (
            evaluate(
                going,
                val,
                states_eval,
                spec,
                candidates,
                desc if progress else None,
                split_targets(cache, "validation"),
            )  # fmt: skip
            if going
            else []
        )
        score_of = {ts.trial.name: sc for ts, sc in zip(going, scores, strict=True)}
        for ts, loss in zip(active, losses, strict=True):
            if ts.stopped is None:
                score = score_of[ts.trial.name]
                ts.history.append(
                    {
                        "epoch": epoch + 1,
                        "train_loss": float(np.mean(loss)),
                        "validation": score,
                        "epoch_s": epoch_s,
                        **({"compile_s": compile_s} if ts.compiled is not None else {}),
                    }
                )
                if score["score"] > ts.best_score:
                    ts.best_score, ts.best_epoch = score["score"], epoch + 1
                    save_best(folder, ts, side_config(cfg, ts.trial.r, spec, cache), cache)
                tracker.log(
                    ts.trial.name,
                    {
                        "train/epoch_loss": float(np.mean(loss)),
                        **{f"eval/{k}": float(v) for k, v in score.items()},
                        "epoch": float(epoch + 1),
                    },
                    (epoch + 1) * n_batches,
                )
            save_checkpoint(folder, ts, epoch)
            ts.next_epoch = epoch + 1
            if say is not None:
                say(epoch_line(ts, epoch + 1, epochs, spec, epoch_s, loss))
        _write_metrics(folder, runs, cache, spec, final=None)


def _units(active: list[TrialState], groups: dict[str, int]) -> list[Any]:
    """This epoch's networks as training units, in the order of their first network: a
    :class:`StackedGroup` per group with networks to train, the other networks as they are."""
    units: list[Any] = []
    seen: dict[int, list[TrialState]] = {}
    for ts in active:
        g = groups.get(ts.trial.name)
        if g is None:
            units.append(ts)
        elif g not in seen:
            seen[g] = [ts]
            units.append(seen[g])
        else:
            seen[g].append(ts)
    return [StackedGroup(u) if isinstance(u, list) else u for u in units]


def score_name(spec: TaskSpec) -> str:
    """What a network's ``score`` holds for a task, from the cache: its metric, except
    captioning's, whose score is minus the teacher-forced caption loss (CIDEr needs generated
    captions, hence the live backbone: ``pipeline evaluate``)."""
    return "-caption_loss" if spec.captioning else spec.metric


def epoch_line(
    ts: TrialState, epoch: int, epochs: int, spec: TaskSpec, seconds: float, losses: list[float]
) -> str:
    """``epoch 3/5  r8-s0-lr0.003  loss 0.412  val accuracy 85.7  (best 85.7 @3)  12.3s``."""
    head = f"epoch {epoch}/{epochs}  {ts.trial.name}"
    if ts.stopped is not None:
        return f"{head}  stopped: {ts.stopped}"
    h = ts.history[-1]
    if spec.captioning:  # the score is the negative caption loss: shown as the loss
        return (
            f"{head}  loss {h['train_loss']:.3f}  val caption loss "
            f"{h['validation']['caption_loss']:.3f}  (best {-ts.best_score:.3f} @{ts.best_epoch})"
            f"  {seconds:.1f}s"
        )
    return (
        f"{head}  loss {h['train_loss']:.3f}  val {spec.metric} {h['validation']['score']:.1f}  "
        f"(best {ts.best_score:.1f} @{ts.best_epoch})  {seconds:.1f}s"
    )


def _check_cache_still_there(
    cfg: StageConfig, cache: CommittedCache, folder: Path, error: Exception | None = None
) -> None:
    """A one-line error when the cache was removed (``cache rm``) while the run read it.

    Reading a removed cache may fail in many ways, or (zarr fills missing chunks) not at all:
    after the test split is scored, and after any failure, the cache's commit must still be there.
    """
    try:
        open_cache(cfg.cache.resolved_root, cache.key, cfg.cache.storage_options)
        return
    except Exception:
        pass
    raise StageError(
        f"cache {cache.key} disappeared from {cfg.cache.resolved_root} while this run read it "
        f"(removed?); the checkpoints in {folder} are kept: extract the cache again and run the "
        "same command to finish (resume and test figures)"
    ) from error


def network_metrics(
    ts: TrialState, final: dict[str, dict] | None, majority: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One network's entry in ``metrics.json``: its trial, size, best epoch and score, compute
    time, per-epoch history, why it stopped early, the majority-class note (given the task's
    majority-class figures) and its test figures (``final``, once scored)."""
    name = ts.trial.name
    note = majority_note(ts.best_score, ts.best_epoch, majority)
    return {
        **asdict(ts.trial),
        "trainable_parameters": trainable_parameters(ts.net),
        "best_epoch": ts.best_epoch,
        "best_validation": ts.best_score,
        "compute_s": ts.compute_s,
        **({"compile_s": ts.compile_s} if ts.compiled is not None else {}),
        "epochs": ts.history,
        **({"stopped": ts.stopped} if ts.stopped else {}),
        **({"note": note} if note else {}),
        **({"test": final[name]} if final and name in final else {}),
    }


def _write_metrics(
    folder: Path,
    runs: list[TrialState],
    cache: CommittedCache,
    spec: TaskSpec,
    final: dict[str, dict] | None,
) -> dict[str, Any]:
    majority = majority_class(cache, spec)
    out = {
        "cache": cache.key,
        "task": spec.name,
        "metric": spec.metric,
        **({"score": score_name(spec)} if spec.captioning else {}),
        **({"majority_class": majority} if majority is not None else {}),
        "networks": {ts.trial.name: network_metrics(ts, final, majority) for ts in runs},
    }
    _save_json(folder / "metrics.json", out)
    return out


SMALL_MULTIPLES = 4  # beyond this many networks, one panel per network


def _span(lo: float, hi: float, least: float, bounds: tuple[float, float] | None = None) -> tuple:
    """``(lo, hi)`` widened around its middle to at least ``least`` (so noise is not drama),
    with a 5% margin, kept within ``bounds`` by shifting."""
    width = max(hi - lo, least)
    mid = (lo + hi) / 2
    lo, hi = mid - width / 2, mid + width / 2
    lo, hi = lo - 0.05 * width, hi + 0.05 * width
    if bounds is not None:
        if hi > bounds[1]:
            lo, hi = lo - (hi - bounds[1]), bounds[1]
        if lo < bounds[0]:
            lo, hi = bounds[0], min(bounds[1], hi + (bounds[0] - lo))
    return lo, hi


def curves_figure(
    networks: dict[str, dict[str, Any]], task: str, metric: str, majority: float | None = None
) -> Any:
    """The figure of training-curves.png from metrics.json's ``networks``.

    Up to 4 networks: a training-loss panel and a validation panel, one line per network (its
    own colour, marker and dash, in the legend). More: small multiples, a loss row and a
    validation row of one panel per network, sharing their axes. Validation panels mark the
    kept checkpoint (star) and its test score (diamond), and the majority-class baseline
    (dashed). The loss axis spans at least 5% of its level, the validation axis 10 points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(networks)
    n = len(names)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers, dashes = "os^vPXh<>p", ["-", "--", "-.", ":"]  # star and diamond: checkpoints
    losses = [h["train_loss"] for v in networks.values() for h in v["epochs"]]
    losses = [x for x in losses if math.isfinite(x)]
    vals = [h["validation"]["score"] for v in networks.values() for h in v["epochs"]]
    vals += [v["test"]["score"] for v in networks.values() if v.get("test")]
    vals += [] if majority is None else [majority]
    if n <= SMALL_MULTIPLES:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        pairs = [(a, b)] * n
    else:
        cols = math.ceil(math.sqrt(n))
        groups = math.ceil(n / cols)
        fig, grid = plt.subplots(
            2 * groups, cols, figsize=(3.2 * cols, 2.5 * 2 * groups), sharex=True, squeeze=False
        )
        pairs = [
            (grid[2 * (i // cols), i % cols], grid[2 * (i // cols) + 1, i % cols]) for i in range(n)
        ]
        for i in range(n, groups * cols):  # empty slots of the last group
            fig.delaxes(grid[2 * (i // cols), i % cols])
            fig.delaxes(grid[2 * (i // cols) + 1, i % cols])
    loss_axes = list(dict.fromkeys(a for a, _ in pairs))
    val_axes = list(dict.fromkeys(b for _, b in pairs))
    for i, (name, (a, b)) in enumerate(zip(names, pairs, strict=True)):
        net = networks[name]
        style = {
            "color": colours[i % len(colours)],
            "marker": markers[i % len(markers)],
            "linestyle": dashes[(i // len(colours)) % len(dashes)],
            "markersize": 4,
            "label": name,
        }
        ep = [h["epoch"] for h in net["epochs"]]
        a.plot(ep, [h["train_loss"] for h in net["epochs"]], **style)
        b.plot(ep, [h["validation"]["score"] for h in net["epochs"]], **style)
        if net.get("best_epoch", 0) >= 1:  # the checkpoint that was kept, and its test score
            b.plot([net["best_epoch"]], [net["best_validation"]], marker="*", markersize=13,
                   color=style["color"], linestyle="none",
                   label="kept checkpoint (validation)" if b is val_axes[0] and i == 0 else None)  # fmt: skip
            if net.get("test"):
                b.plot([net["best_epoch"]], [net["test"]["score"]], marker="D", markersize=6,
                       markerfacecolor="none", color=style["color"], linestyle="none",
                       label="its test score" if i == 0 else None)  # fmt: skip
        if n > SMALL_MULTIPLES:
            a.set_title(name, fontsize=9)
    if majority is not None:
        for k, b in enumerate(val_axes):
            b.axhline(majority, color="grey", linestyle="--", linewidth=1,
                      label=f"majority class ({majority:.1f})" if k == 0 else None)  # fmt: skip
    if losses:
        level = float(np.mean(losses))
        lo, hi = _span(min(losses), max(losses), 0.05 * abs(level) or 0.05)
        for a in loss_axes:
            a.set_ylim(lo, hi)
    if vals:
        for b in val_axes:
            b.set_ylim(*_span(min(vals), max(vals), 10.0, (-100.0, 100.0)))
    first = [a for a, _ in pairs[:: math.ceil(math.sqrt(n))]] if n > SMALL_MULTIPLES else loss_axes
    for a, b in dict.fromkeys(pairs):
        if a in first:  # small multiples: the shared axes are labelled once per row
            a.set_ylabel("train loss", fontsize=9)
            b.set_ylabel(f"val {metric}", fontsize=9)
        b.set_xlabel("epoch", fontsize=9)
        if n <= SMALL_MULTIPLES:
            a.set_xlabel("epoch", fontsize=9)
    for ax in loss_axes + val_axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    if n <= SMALL_MULTIPLES:
        loss_axes[0].set_title("training loss")
        val_axes[0].set_title(f"{task}: validation {metric} (x100)")
        loss_axes[0].legend(fontsize=8)
        val_axes[0].legend(fontsize=8)
        fig.tight_layout()
    else:
        val_axes[0].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{task}: training loss and validation {metric} (x100), per network")
        fig.tight_layout()
    return fig


def plot_curves(path: Path, metrics: dict[str, Any], spec: TaskSpec) -> Path:
    """training-curves.png from metrics.json's figures (see :func:`curves_figure`), with its
    ``majority_class`` score (:func:`majority_class`) as the baseline."""
    import matplotlib.pyplot as plt

    majority = (metrics.get("majority_class") or {}).get("score")
    fig = curves_figure(metrics["networks"], spec.name, score_name(spec), majority)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path
