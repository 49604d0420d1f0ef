"""Several tasks in one run: one side network, a shared body and a head per task.

    pipeline run train-side --task rte,mrpc --data-dir ../shared/data/glue --limit 500 --epochs 2

Each task has its own committed cache (``pipeline run extract --task rte``, then ``--task mrpc``),
resolved as a one-task run resolves its cache; all caches must come from the same backbone
(weights, tokenizer, revision) and max length. The network (``ladder.multitask``) shares the
ladders and side blocks and gives each task its own classification head (its own labels;
regression allowed). With a T5 backbone every task is text to text, so the tasks share the whole
T5 side network, its frozen LM head included: classification tasks train on their verbalised
label and are scored on their candidate label strings, captioning (``coco-caption``) on its
captions, as in VL-Adapter's multi-task CLIP-T5 (``--task vqa,gqa,nlvr2,coco-caption``).

Vision-and-language tasks mix in (``--task easy-vqa,sst2 --vision-encoder random-vit``): the
body takes the VL tasks' visual tokens (``ladder.vision``) and runs text tasks on the text alone.
The vision encoder (and its pooling) applies to the VL tasks of the list, whose caches must hold
its features; their training images give the visual standardisation together. A list may mix
one-image tasks with NLVR2's two images per example: the network is built for two, tells a
batch's images apart by its token count, and a one-image task's tokens take image index 0 (as
VL-T5's image ids). In a list that mixes text and VL tasks, ``--data-dir`` names the text
tasks' data (a glue_data folder), and in a list of several VL tasks it names none (each has its
own folder): the VL tasks' caches are then matched on task, backbone, vision encoder and limit,
as when stage two is given no data.

Task-mixed batches, as VL-Adapter's multi-task training samples a task per step: every batch
comes from one task's loader, and an epoch is every batch of every task once, in an order drawn
from the run's seed and the epoch (a random interleaving in which each task keeps its share of the
steps, its number of batches). A run of one task is the single-task run, step for step.

Each epoch reports every task's metric on its validation split and their unweighted average; the
best checkpoint is the best average, and every task is scored on its test split at the end
(captioning's score is minus its teacher-forced caption loss, as in a one-task run: CIDEr needs
the live backbone, ``pipeline evaluate``). The
run folder, checkpoints, resume, progress bar, tracker and ``--json`` follow ``train_side``: the
helpers are its own, and a killed run resumes from each network's last finished epoch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from cache_store.images import ImageTable
from cache_store.loader import CacheLoader
from cache_store.reader import CommittedCache
from ladder.families import T5_TYPES
from ladder.multitask import MultiTaskSideNetwork, VisualSpec
from ladder.side import SideConfig, build_side_network
from ladder.vision import (
    VisualInput,
    build_visual_side_network,
    saved_visual_fusion,
    saved_visual_readout,
)
from stages import tracking
from stages.batches import Batch, on_device, torch_batches
from stages.config import StageConfig
from stages.errors import StageError
from stages.images import image_layout, visual_of
from stages.runfiles import (
    DiskFull,
    write_atomic,
    write_json_atomic,
)
from stages.tasks import VL_TASKS, TaskConfig, TaskSpec, check_trainable, paper_epochs
from stages.train_side import (
    TrainResult,
    Trial,
    TrialState,
    backbone_config_of,
    build_trial,
    cached_states,
    candidates_of,
    check_trials,
    class_weight_of,
    curves_figure,
    evaluate,
    frozen_lm_head,
    load_into,
    load_side_init,
    majority_class,
    majority_note,
    network_metrics,
    open_run,
    resolve_cache,
    run_folder,
    run_signature,
    save_best_weights,
    save_checkpoint,
    score_name,
    side_config,
    split_outputs,
    split_targets,
    stream_layers,
    task_spec_of,
    task_spec_record,
    train_step,
    train_visual_stats,
    training_device,
    trial_state,
    visual_config,
    warmup_warning,
)


def task_config(cfg: StageConfig, task: str) -> StageConfig:
    """``cfg`` for one task of its list (what that task's cache is resolved with): a text task
    without the vision encoder; in a list mixing text and VL tasks, a VL task without
    ``task.data_dir`` (it names the text tasks' data)."""
    update: dict[str, Any] = {"task": task_of_list(cfg.task, task)}
    if task not in VL_TASKS and cfg.backbone.vision is not None:
        update["backbone"] = cfg.backbone.model_copy(update={"vision": None, "vision_pool": None})
    return cfg.model_copy(update=update)


def task_of_list(tasks: TaskConfig, task: str) -> TaskConfig:
    """``task:`` for one task of its list: in a list of several tasks, a VL task without
    ``data_dir`` (it names the text tasks' data; each VL task has its own folder)."""
    update: dict[str, Any] = {"name": task}
    if task in VL_TASKS and len(tasks.names) > 1:
        update["data_dir"] = None
    return tasks.model_copy(update=update)


def resolve_caches(cfg: StageConfig, cache_key: str | None) -> dict[str, CommittedCache]:
    """Each task's cache, as a one-task run resolves it; ``cache_key``: one key per task, in the
    task list's order (comma-separated). All must share the backbone and the max length."""
    tasks = cfg.task.names
    keys: list[str | None] = [None] * len(tasks)
    if cache_key is not None:
        keys = [k.strip() for k in cache_key.split(",")]
        if len(keys) != len(tasks):
            raise StageError(
                f"--cache-key names {len(keys)} cache(s) for {len(tasks)} tasks ({cfg.task.name}); "
                "allowed: one key per task, comma-separated in the same order, or none"
            )
    caches = {t: resolve_cache(task_config(cfg, t), k) for t, k in zip(tasks, keys, strict=True)}
    first = tasks[0]

    def identity(c: CommittedCache) -> dict[str, Any]:
        inputs = c.manifest.get("key_inputs", {})
        template = str(inputs.get("template"))
        return {
            "backbone": inputs.get("backbone", c.manifest["backbone"]["name"]),
            "max length": inputs.get("max_length"),
            # T5's captioning template feeds the encoder a prompt and the decoder the caption,
            # the classification prefix template the fields and the label: both text to text
            "template": template.replace("t5-caption-", "t5-prefix-"),
        }

    want = identity(caches[first])
    for t in tasks[1:]:
        have = identity(caches[t])
        diff = [k for k in want if have[k] != want[k]]
        if diff:
            raise StageError(
                f"the caches of {first} ({caches[first].key}) and {t} ({caches[t].key}) come from "
                f"different {' and '.join(diff)}; allowed: caches extracted with the same backbone "
                "and max length (re-extract one of them)"
            )
    return caches


def specs_of(cfg: StageConfig, caches: dict[str, CommittedCache]) -> dict[str, TaskSpec]:
    """Each task's spec, checked: tasks with a classification or regression head; with a
    vision encoder, at least one VL task."""
    if cfg.backbone.vision is not None:
        vl = [t for t in caches if t in VL_TASKS]
        if not vl:
            raise StageError(
                f"vision encoder {cfg.backbone.vision!r} was asked for, but no task of "
                f"{cfg.task.name} has images; allowed: a list with a vision-and-language task "
                f"({', '.join(VL_TASKS)}), or no --vision-encoder"
            )
    specs = {}
    for t, cache in caches.items():
        spec = task_spec_of(cache)
        family = cache.manifest["backbone"].get("family")
        check_trainable(spec, family, visual_of(task_config(cfg, t), cache) is not None)
        specs[t] = spec
    return specs


def is_t5(backbone_config: Any) -> bool:
    """Whether a task list's network is the T5 side network the tasks share whole (text to
    text), not a shared body with a head per task."""
    return getattr(backbone_config, "model_type", None) in T5_TYPES


def select_task(net: torch.nn.Module, task: str) -> torch.nn.Module:
    """The network as ``task`` uses it: a multi-task body with that task's head; a T5 side
    network, which every task shares whole, as it is."""
    return net.select(task) if isinstance(net, MultiTaskSideNetwork) else net


def epochs_of_tasks(cfg: StageConfig, tasks: list[str]) -> int:
    """``train_side.epochs``, else the paper's count of the task that gets the most."""
    return cfg.train_side.epochs or max(paper_epochs(t) for t in tasks)


def task_order(counts: dict[str, int], seed: int, epoch: int) -> list[str]:
    """An epoch's task per step: each task as many times as it has batches, randomly
    interleaved with the run's seed and the epoch (so a resumed epoch has the same order)."""
    steps = [t for t, n in counts.items() for _ in range(n)]
    rng = np.random.default_rng([seed, epoch, 7])  # 7: apart from the loaders' [seed, epoch]
    return [steps[int(i)] for i in rng.permutation(len(steps))] if len(counts) > 1 else steps


def mixed_batches(
    loaders: dict[str, CacheLoader],
    seed: int,
    epoch: int,
    device: torch.device,
) -> Iterator[tuple[str, Batch]]:
    """(task, batch) for one epoch, in :func:`task_order`, on ``device`` (each task's batches
    sent one ahead, ``on_device``); a loader with more batches than its length promised
    (streamed buffers) gives the rest at the end, none is lost."""
    its = {t: on_device(torch_batches(ld.epoch(epoch)), device) for t, ld in loaders.items()}
    for task in task_order({t: len(ld) for t, ld in loaders.items()}, seed, epoch):
        batch = next(its[task], None)
        if batch is not None:
            yield task, batch
    for task, it in its.items():
        for batch in it:
            yield task, batch


def build_multitask_trial(
    cfg: StageConfig,
    caches: dict[str, CommittedCache],
    bcfg: Any,
    specs: dict[str, TaskSpec],
    trial: Trial,
    total_steps: int,
    device: torch.device | None = None,
) -> TrialState:
    """A seeded multi-task side network, initialised as asked (side_init from the first task's
    cache: magnitude is every task's, Fisher the first task's), its AdamW and schedule, on
    ``device`` (default: the CPU). T5: the
    one-task network (``train_side.build_trial``) of the first task, reading the VL tasks'
    visual tokens."""
    first = next(iter(caches))
    vl = visual_caches(cfg, caches)
    if is_t5(bcfg):
        return build_trial(
            cfg, caches[first], bcfg, specs[first], trial, total_steps, list(vl.values()), device
        )
    torch.manual_seed(trial.seed)
    labels = {t: s.num_labels for t, s in specs.items()}
    visual = None
    if vl:
        some = next(iter(vl.values()))
        d = int(visual_of(cfg, some)["d"])  # type: ignore[index]
        ts = cfg.train_side
        n_images, tokens_per_image = image_layout(list(vl.values()))
        visual = VisualSpec(d, n_images, ts.visual_fusion, ts.visual_readout)
    net = MultiTaskSideNetwork(bcfg, side_config(cfg, trial.r, specs[first]), labels, visual)
    if vl:
        net.body.set_visual_stats(*train_visual_stats(*vl.values()))  # type: ignore[attr-defined]
        net.body.set_tokens_per_image(tokens_per_image)  # type: ignore[attr-defined]
    if cfg.train_side.init != "random":
        net.load_side_init(load_side_init(caches[first], trial.r, cfg.train_side.init))
    return trial_state(cfg, net, trial, total_steps, device)


def saved_network(
    backbone_config: Any, saved: dict[str, Any], lm_head: torch.Tensor | None = None
) -> torch.nn.Module:
    """The multi-task network a ``<net>.config.json`` describes (:meth:`MultiTaskRun.save_best`),
    unloaded: the body its ``side`` (and ``visual``) rebuild, a head per task of ``tasks`` with
    that task's labels, in the run's task order (the first head is the body's own). T5: the
    side network the tasks share, with ``lm_head`` (the frozen [V, d] LM head)."""
    side = SideConfig(**saved["side"])
    v = saved.get("visual")
    net: torch.nn.Module
    if is_t5(backbone_config):
        net = (
            build_side_network(backbone_config, side, lm_head)
            if v is None
            else build_visual_side_network(
                backbone_config, side, v["d"], v["n_images"], saved_visual_fusion(v), lm_head
            )
        )
    else:
        labels = {t: int(r["num_labels"]) for t, r in saved["tasks"].items()}
        visual = (
            None
            if v is None
            else VisualSpec(v["d"], v["n_images"], saved_visual_fusion(v), saved_visual_readout(v))
        )
        net = MultiTaskSideNetwork(backbone_config, side, labels, visual)
    if v is not None:  # a list mixing one- and two-image tasks: the tokens per image
        getattr(net, "body", net).set_tokens_per_image(v.get("tokens_per_image"))
    return net


def cached_task_outputs(
    cfg: StageConfig, folder: Path, name: str, task: str, split: str = "test"
) -> torch.Tensor:
    """Network ``name``'s raw outputs for ``task`` (its head) per example of a split, in the
    split's order, from the best checkpoint of run ``folder`` and the task's cache: what the
    run's evaluation computes (``train_side.cached_outputs`` for one task of a list)."""
    saved = json.loads((Path(folder) / f"{name}.config.json").read_text())
    task_cfg = task_config(cfg, task)
    cache = resolve_cache(task_cfg, saved["tasks"][task]["cache"])
    net = saved_network(backbone_config_of(cache), saved, frozen_lm_head(cache))
    best = Path(folder) / f"{name}.best.safetensors"
    load_into(net, load_file(str(best)), str(best))
    return split_outputs(task_cfg, select_task(net, task), cache, split, candidates_of(cache))


def visual_caches(cfg: StageConfig, caches: dict[str, CommittedCache]) -> dict[str, CommittedCache]:
    """The caches whose image features the run reads (VL tasks, with a vision encoder set)."""
    return {t: c for t, c in caches.items() if visual_of(task_config(cfg, t), c) is not None}


def train_multitask(
    cfg: StageConfig,
    *,
    cache_key: str | None = None,
    run_name: str | None = None,
    progress: bool = True,
    echo: bool = True,
) -> dict[str, Any]:
    """Train every trial of ``cfg.train_side`` on the tasks of ``cfg.task.name`` (a list) as one
    multi-task side network each; returns the CLI's summary (``run``, ``caches``, ``networks``)."""
    result = train_multitask_run(
        cfg, cache_key=cache_key, run_name=run_name, progress=progress, echo=echo
    )
    return summary(result)


def train_multitask_run(
    cfg: StageConfig,
    *,
    cache_key: str | None = None,
    run_name: str | None = None,
    progress: bool = True,
    echo: bool = True,
) -> TrainResult:
    """The run (see the module docstring); ``progress``, ``echo`` as ``train_side``."""
    tracking.require(cfg.train_side.report_to)
    device = training_device(cfg)
    tasks = cfg.task.names
    if cfg.train_side.head != "cls":
        raise StageError(
            f"--head {cfg.train_side.head} is not built for multi-task training (one head per "
            "task); allowed: --head cls"
        )
    caches = resolve_caches(cfg, cache_key)
    specs = specs_of(cfg, caches)
    first = caches[tasks[0]]
    bcfg = backbone_config_of(first)
    trials = check_trials(task_config(cfg, tasks[0]), first)
    # each head's class weights (its own task's classes), checked before any work
    class_weights = {task: class_weight_of(cfg, c, specs[task]) for task, c in caches.items()}
    t = cfg.train_side
    epochs = epochs_of_tasks(cfg, tasks)
    steps_per_epoch = sum(
        -(-c.manifest["splits"]["train"]["n_examples"] // t.batch_size) for c in caches.values()
    )
    total_steps = epochs * steps_per_epoch
    if (warning := warmup_warning(cfg, total_steps)) is not None:
        print(warning, file=sys.stderr, flush=True)
    runs = [
        build_multitask_trial(cfg, caches, bcfg, specs, tr, total_steps, device) for tr in trials
    ]
    for ts in runs:
        for task, weight in class_weights.items():
            if weight is not None:  # T5 label scoring refuses class weights (class_weight_of)
                ts.net.heads[task].set_class_weight(weight)
    # the streams each task's loaders read: (training, evaluation)
    layers = {
        t: stream_layers(runs[0].net, candidates_of(c), specs[t].captioning)
        for t, c in caches.items()
    }
    keys = [c.key for c in caches.values()]
    signature = {
        **run_signature(cfg, "+".join(keys), None),
        "epochs": epochs,
        "tasks": tasks,
    }
    private = bool(cfg.cache.storage_options)
    folder = run_folder(cfg, signature, run_name, private=private)

    seed0 = trials[0].seed
    budget = (t.memory_mb << 20) // len(tasks)  # the tasks' loaders share the budget
    with_images = visual_caches(cfg, caches)
    tables = {c.key: ImageTable(c, budget) for c in with_images.values()}  # shared by the splits

    def loader(task: str, split: str) -> CacheLoader:
        train, cache = split == "train", caches[task]
        return CacheLoader(
            cache,
            split,
            layers[task][0 if train else 1],
            batch_size=t.batch_size if train else t.batch_size * 2,
            shuffle=train,
            seed=seed0,
            memory_budget=budget,
            images=tables.get(cache.key),
            widen=train and device.type == "cpu",  # a GPU widens its own copy
        )

    loaders = {s: {t: loader(t, s) for t in caches} for s in ("train", "validation")}
    start, tracker, say = open_run(cfg, folder, runs, epochs, total_steps, progress, echo)
    run = MultiTaskRun(cfg, folder, caches, specs, loaders, epochs, tracker, say)
    try:
        run.train(runs, start, progress)
        scored = [ts for ts in runs if ts.stopped is None]
        for ts in scored:  # the best checkpoint of each network, scored on every test split
            best = folder / f"{ts.trial.name}.best.safetensors"
            load_into(ts.net, load_file(str(best)), str(best))
        tests = {t: loader(t, "test") for t in caches}
        final = {
            ts.trial.name: sc
            for ts, sc in zip(scored, run.scores(scored, tests, "test"), strict=True)
        }
    except DiskFull as e:
        raise StageError(
            f"{e}; the run folder {folder} keeps every network's last finished epoch: free "
            "space and run the same command again to resume"
        ) from None
    finally:
        tracker.close()
    metrics = run.write_metrics(runs, final)
    name = "+".join(tasks)
    write_atomic(
        folder / "training-curves.png",
        lambda tmp: _plot(tmp, metrics["networks"], name),
    )
    return TrainResult(folder, "+".join(keys), metrics)


def _plot(path: Path, networks: dict[str, Any], name: str) -> Path:
    import matplotlib.pyplot as plt

    fig = curves_figure(networks, name, "average")
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


class MultiTaskRun:
    """The epochs of a multi-task run: task-mixed training, per-task validation, checkpoints."""

    def __init__(
        self,
        cfg: StageConfig,
        folder: Path,
        caches: dict[str, CommittedCache],
        specs: dict[str, TaskSpec],
        loaders: dict[str, dict[str, CacheLoader]],
        epochs: int,
        tracker: tracking.Tracker,
        say: Callable[[str], None] | None,
    ) -> None:
        self.cfg, self.folder, self.caches, self.specs = cfg, folder, caches, specs
        self.train_loaders, self.val_loaders = loaders["train"], loaders["validation"]
        self.epochs, self.tracker, self.say = epochs, tracker, say
        self.seed = cfg.train_side.seeds[0]  # the loaders' and the task order's: the run's seed

    def scores(
        self, runs: list[TrialState], loaders: dict[str, CacheLoader], split: str
    ) -> list[dict[str, Any]]:
        """Per network: every task's metrics on ``split`` (its loader), and their average as
        ``score``; one pass over each task's loader for all the networks. Tasks scored by the
        VQA score use the split's scored answers, as a one-task run."""
        if not runs:
            return []
        out: list[dict[str, Any]] = [{} for _ in runs]
        for task, ld in loaders.items():
            for ts in runs:
                select_task(ts.net, task)
            cache = self.caches[task]
            got = evaluate(
                runs,
                ld,
                cached_states,
                self.specs[task],
                candidates_of(cache),
                targets=split_targets(cache, split),
            )
            for o, sc in zip(out, got, strict=True):
                o[task] = sc
        for o in out:
            o["score"] = float(np.mean([o[t]["score"] for t in loaders]))
        return out

    def train(self, runs: list[TrialState], start: int, progress: bool) -> None:
        """Epochs ``start`` .. end; each network trains only the epochs it has not finished."""
        n_batches = sum(len(ld) for ld in self.train_loaders.values())
        max_norm = self.cfg.train_side.max_grad_norm
        for epoch in range(start, self.epochs):
            active = [ts for ts in runs if ts.next_epoch <= epoch and ts.stopped is None]
            if not active:
                continue
            t0 = time.perf_counter()
            losses: dict[str, dict[str, list[float]]] = {
                ts.trial.name: {t: [] for t in self.train_loaders} for ts in active
            }
            with tqdm(
                total=n_batches,
                unit="batch",
                desc=f"train-side: epoch {epoch + 1}/{self.epochs} ({'+'.join(self.specs)})",
                disable=not progress,
                leave=False,
            ) as bar:
                batches = mixed_batches(self.train_loaders, self.seed, epoch, active[0].device)
                for step, (task, batch) in enumerate(batches):
                    for ts in active:
                        if ts.stopped is not None:
                            continue
                        lr = ts.opt.param_groups[0]["lr"]  # the rate this step uses
                        select_task(ts.net, task)
                        c0 = time.perf_counter()
                        loss = train_step(ts, batch, cached_states, max_norm)
                        ts.compute_s += time.perf_counter() - c0
                        if not math.isfinite(loss):
                            ts.stopped = (
                                f"training loss became {loss} at epoch {epoch + 1}, step "
                                f"{step + 1} ({task}; learning rate {ts.trial.lr:g}); stopped"
                            )
                        losses[ts.trial.name][task].append(loss)
                        self.tracker.log(
                            ts.trial.name,
                            {
                                "train/loss": loss,
                                f"train/{task}/loss": loss,
                                "train/learning_rate": lr,
                            },
                            epoch * n_batches + step + 1,
                        )
                    bar.update(1)
            epoch_s = time.perf_counter() - t0
            going = [ts for ts in active if ts.stopped is None]
            scores = self.scores(going, self.val_loaders, "validation")
            val = {ts.trial.name: sc for ts, sc in zip(going, scores, strict=True)}
            for ts in active:
                name = ts.trial.name
                self._end_epoch(ts, epoch, epoch_s, losses[name], val.get(name), n_batches)
            self.write_metrics(runs, None)

    def _end_epoch(
        self,
        ts: TrialState,
        epoch: int,
        epoch_s: float,
        losses: dict[str, list[float]],
        val: dict[str, Any] | None,
        n_batches: int,
    ) -> None:
        """History (``val``: every task's validation, :meth:`scores`), best checkpoint, last
        checkpoint, the epoch line."""
        if val is not None:  # None: stopped
            every = [x for ls in losses.values() for x in ls]
            ts.history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": float(np.mean(every)),
                    "validation": {"score": val["score"]},
                    "tasks": {
                        t: {"train_loss": float(np.mean(ls)), "validation": val[t]}
                        for t, ls in losses.items()
                    },
                    "epoch_s": epoch_s,
                }
            )
            if val["score"] > ts.best_score:
                ts.best_score, ts.best_epoch = val["score"], epoch + 1
                self.save_best(ts)
            self.tracker.log(
                ts.trial.name,
                {
                    "train/epoch_loss": float(np.mean(every)),
                    "eval/average": val["score"],
                    **{f"eval/{t}/{k}": float(v) for t in losses for k, v in val[t].items()},
                    "epoch": float(epoch + 1),
                },
                (epoch + 1) * n_batches,
            )
        save_checkpoint(self.folder, ts, epoch)
        ts.next_epoch = epoch + 1
        if self.say is not None:
            self.say(self.epoch_line(ts, epoch + 1, epoch_s))

    def epoch_line(self, ts: TrialState, epoch: int, seconds: float) -> str:
        """``epoch 2/2  r8-s0-lr0.003  loss 0.61  val rte accuracy 58.0  mrpc acc_f1 78.1
        average 68.1  (best 68.1 @2)  9.8s``."""
        head = f"epoch {epoch}/{self.epochs}  {ts.trial.name}"
        if ts.stopped is not None:
            return f"{head}  stopped: {ts.stopped}"
        h = ts.history[-1]
        per = "  ".join(
            f"{t} {score_name(self.specs[t])} {v['validation']['score']:.1f}"
            for t, v in h["tasks"].items()
        )
        return (
            f"{head}  loss {h['train_loss']:.3f}  val {per}  average {h['validation']['score']:.1f}"
            f"  (best {ts.best_score:.1f} @{ts.best_epoch})  {seconds:.1f}s"
        )

    def save_best(self, ts: TrialState) -> None:
        """The best weights (safetensors) and what they are: side config, tasks, caches, epoch."""
        folder, name = self.folder, ts.trial.name
        save_best_weights(folder, ts)
        first = self.caches[next(iter(self.caches))]
        body = getattr(ts.net, "body", ts.net)  # T5: the shared network is the body
        write_json_atomic(
            folder / f"{name}.config.json",
            {
                "side": asdict(ts.net.side),
                "trial": asdict(ts.trial),
                "tasks": {
                    t: {
                        "cache": c.key,
                        "task_spec": task_spec_record(c),
                        "num_labels": self.specs[t].num_labels,
                    }
                    for t, c in self.caches.items()
                },
                "backbone": first.manifest["backbone"]["name"],
                "epoch": ts.best_epoch,
                **({"visual": visual_config(body)} if isinstance(body, VisualInput) else {}),
            },
        )

    def write_metrics(
        self, runs: list[TrialState], final: dict[str, dict[str, Any]] | None
    ) -> dict[str, Any]:
        """metrics.json: per task (cache, metric, majority class) and per network the average
        and each task's figures per epoch, the best epoch (on the average) and the test scores."""
        out = {
            "tasks": {
                t: {
                    "cache": c.key,
                    "metric": score_name(self.specs[t]),
                    **(
                        {"majority_class": m}
                        if (m := majority_class(c, self.specs[t])) is not None
                        else {}
                    ),
                }
                for t, c in self.caches.items()
            },
            "metric": "average",
            "networks": {ts.trial.name: network_metrics(ts, final) for ts in runs},
        }
        write_json_atomic(self.folder / "metrics.json", out)
        return out


def _note(
    best: dict[str, Any] | None, task: str, info: dict[str, Any], net: dict[str, Any]
) -> str | None:
    """A task's ``equals always predicting ...`` at the best epoch (as a one-task run's note)."""
    if best is None:
        return None
    score = best["tasks"][task]["validation"]["score"]
    return majority_note(score, net["best_epoch"], info.get("majority_class"))


def summary(result: TrainResult) -> dict[str, Any]:
    """The CLI's result: run folder, caches, per network the best epoch, the validation and
    test averages, and each task's metric at the best epoch and on its test split."""
    m = result.metrics
    networks = {}
    for name, v in m["networks"].items():
        best = next((h for h in v["epochs"] if h["epoch"] == v["best_epoch"]), None)
        test = v.get("test")
        networks[name] = {
            "best_epoch": v["best_epoch"],
            "validation": v["best_validation"],
            "test": None if test is None else {"score": test["score"]},
            "tasks": {
                t: {
                    "metric": info["metric"],
                    "validation": None if best is None else best["tasks"][t]["validation"]["score"],
                    "test": None if test is None else test[t]["score"],
                    **({"test_metrics": test[t]} if test is not None else {}),
                    **({"note": note} if (note := _note(best, t, info, v)) else {}),
                }
                for t, info in m["tasks"].items()
            },
            **({"stopped": v["stopped"]} if v.get("stopped") else {}),
        }
    return {
        "run": str(result.folder),
        "cache": result.cache_key,
        "caches": {t: info["cache"] for t, info in m["tasks"].items()},
        "tasks": list(m["tasks"]),
        "networks": networks,
    }
