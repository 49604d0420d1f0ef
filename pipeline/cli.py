"""The ``pipeline`` command: parse, build the configuration, dispatch to a stage, report.

    pipeline run extract --task rte --data-dir ../shared/data/glue
    pipeline run train-side --task rte --reduction-factors 4,8
    pipeline cache ls
    pipeline cache verify KEY

This is the only module that knows about exit codes: every error the packages below raise
(``StageError``, ``CacheError``, ``LadderError``, ``PipelineError``) is one ``error: ...`` line and
exit status 2; anything else that escapes is one line too, with the traceback behind
``--verbose`` (or ``LST_DEBUG=1``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import click

from pipeline.config import (
    Config,
    apply_overrides,
    config_sources,
    load_config,
    schema_default,
    schema_field,
)
from pipeline.errors import USER_ERRORS, PipelineError
from stages.tasks import TASKS, get_task


def _option_name(param: click.Parameter | None) -> str:
    return param.opts[0] if param is not None and param.opts else "option"


def _ints(value: str | None, param: click.Parameter | None = None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise PipelineError(
            f"{_option_name(param)}: expected comma-separated integers, got {value!r}"
        ) from None


def _nonempty(values: list | None, param: click.Parameter, example: str) -> list | None:
    """A list option of stage two's grid must name at least one value."""
    if values is not None and not values:
        raise PipelineError(
            f"{param.opts[0]} is empty; give at least one value, comma-separated (e.g. {example})"
        )
    return values


def _strs(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _emit(obj: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, default=str))
    else:
        human(obj)


# --- options: each defined once, in one list per stage, applied to every command that takes it

OPTION_KEYS: dict[str, str] = {}
"""Parameter name of an option -> the configuration key it sets (``section.key``)."""


def _default_text(key: str, none: str | None) -> str:
    """The schema's default of ``key`` as the help shows it (``none`` says what None means)."""
    value = schema_default(key)
    if value is None:
        return none or "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or '""'
    return str(value)


def _choices(key: str) -> list[str]:
    """The values a ``Literal`` key of the schema allows (also inside ``list[Literal]``)."""
    ann = schema_field(key).annotation
    while get_args(ann) and not all(isinstance(a, str) for a in get_args(ann)):
        ann = next(a for a in get_args(ann) if a is not type(None))
    return list(get_args(ann))


def config_option(
    flag: str, key: str, help: str, *, name: str | None = None, none: str | None = None, **kw: Any
) -> Callable:
    """An option that sets configuration key ``key``; its help shows the schema's default.

    The option's own default stays None, so that an option not given keeps the value of
    pipeline.yaml (and LST_CACHE_ROOT) instead of the schema's.
    """
    param = name or flag.lstrip("-").replace("-", "_")
    OPTION_KEYS[param] = key
    decls = (flag, param) if name else (flag,)
    decorator = click.option(*decls, help=f"{help}  [default: {_default_text(key, none)}]", **kw)
    decorator.config_key = key  # type: ignore[attr-defined]
    return decorator


def _task_name(value: str | None) -> str | None:
    for name in [] if value is None else value.split(","):  # several: a multi-task run
        if name.strip() != "custom":
            get_task(name.strip())  # unknown task: one line naming the allowed ones
    return value


def _side_init(value: str | None, param: click.Parameter) -> list[str] | None:
    methods = _strs(value)
    allowed = _choices("extract.side_init")
    for m in methods or []:
        if m not in allowed:
            raise PipelineError(
                f"{param.opts[0]}: {m!r} is not allowed; allowed: {', '.join(allowed)} "
                "(comma-separated; empty: none)"
            )
    return methods


CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(),
    help="pipeline.yaml to use  [default: ./pipeline.yaml when present, else the built-in defaults]",
)
ROOT_HELP = "local path or fsspec URL of the cache root (LST_CACHE_ROOT overrides the file)"

COMMON_OPTIONS = [
    CONFIG_OPTION,
    config_option(
        "--task",
        "task.name",
        f"{' | '.join([*TASKS, 'custom'])} (custom: task.files in pipeline.yaml); train-side: "
        "several, comma-separated (rte,mrpc), one side network with a head per task",
        callback=lambda c, p, v: _task_name(v),
    ),
    config_option(
        "--data-dir", "task.data_dir", "a glue_data folder (TSV)", none="the Hugging Face hub"
    ),
    config_option("--limit", "task.limit", "first N examples of each split", none="all", type=int),
    config_option(
        "--backbone",
        "backbone.name",
        "short name (minilm-l6), Hugging Face name or local model folder",
    ),
    config_option(
        "--vision-encoder",
        "backbone.vision",
        "VL tasks: random-vit (not pretrained), or a CLIP/SigLIP/ViT name or folder",
        none="none (text only)",
    ),
    config_option(
        "--vision-pool",
        "backbone.vision_pool",
        "VL tasks: average-pool the encoder's patch tokens to a KxK grid (e.g. 4x4) in stage one",
        none="none (every patch token)",
    ),
    config_option("--max-length", "backbone.max_length", "truncation length in tokens", type=int),
    config_option(
        "--quantization",
        "backbone.quantization",
        "backbone weights through bitsandbytes (4bit NF4, 8bit), CUDA only; part of the cache key",
        type=click.Choice(_choices("backbone.quantization")),
    ),
    config_option("--cache-root", "cache.root", ROOT_HELP),
    config_option(
        "--head",
        "train_side.head",
        "decoder-only classification: cls (a head on the last token) or lm (the LM head scores "
        "each label word after an answer prompt); part of the cache key",
        type=click.Choice(_choices("train_side.head")),
    ),
]

EXTRACT_OPTIONS = [
    config_option(
        "--dtype",
        "cache.dtype",
        "storage dtype of the states (int8: per-token absmax scale)",
        type=click.Choice(_choices("cache.dtype")),
    ),
    config_option(
        "--codec",
        "cache.codec",
        "lossless codec of the chunks",
        type=click.Choice(_choices("cache.codec")),
    ),
    config_option(
        "--device",
        "extract.device",
        "where the backbone runs, free text: auto (cuda when present) | cpu | cuda | cuda:N | mps",
    ),
    config_option(
        "--batch-tokens", "extract.batch_tokens", "padded tokens per extraction batch", type=int
    ),
    config_option(
        "--layers",
        "extract.layers",
        "states to store, e.g. 0,2,4,6 (0 = embeddings)",
        none="all",
        callback=lambda c, p, v: _ints(v, p),
    ),
    config_option(
        "--side-init-factors",
        "extract.reduction_factors",
        "reduction factors to compute side_init for, e.g. 4,8,16,32 (empty: none)",
        callback=lambda c, p, v: _ints(v, p),
    ),
    config_option(
        "--side-init",
        "extract.side_init",
        f"side_init methods, comma-separated: {','.join(_choices('extract.side_init'))} "
        "(empty: none)",
        callback=lambda c, p, v: _side_init(v, p),
    ),
    config_option(
        "--fisher-samples",
        "extract.fisher_samples",
        "training examples for the Fisher pass",
        type=int,
    ),
]


def _apply(options: list[Callable]) -> Callable[[Callable], Callable]:
    def decorate(f: Callable) -> Callable:
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorate


common_options = _apply(COMMON_OPTIONS)
"""Options every command that touches a task, a backbone or a cache takes."""
extract_options = _apply(EXTRACT_OPTIONS)
"""Options of stage one (``run extract`` and ``run all``)."""


def build_config(config_path: str | None, **opts: Any) -> Config:
    """pipeline.yaml (or the defaults), then LST_CACHE_ROOT, then the options given."""
    cfg = load_config(config_path)
    if opts.get("warmup_steps") is not None and opts.get("warmup_ratio") is not None:
        raise PipelineError(
            "--warmup-steps and --warmup-ratio were both given; pass one of them "
            "(--warmup-ratio overrides warmup_steps)"
        )
    overrides = {OPTION_KEYS[k]: v for k, v in opts.items() if k in OPTION_KEYS}
    if opts.get("warmup_steps") is not None:
        cfg.train_side.warmup_ratio = None  # the flag beats a ratio from the file
    if opts.get("cache_root"):
        os.environ.pop("LST_CACHE_ROOT", None)  # an explicit option beats the environment
    return apply_overrides(cfg, overrides)


def _check_task(cfg: Config, one_task: str | None = None) -> None:
    """An unknown task (from the file too) fails here, before torch is imported; so does a task
    list given to ``one_task``, a command that takes one task (extraction)."""
    _task_name(cfg.task.name)
    names = cfg.task.names
    if one_task is not None and len(names) > 1:
        raise PipelineError(
            f"{one_task} takes one task, got {cfg.task.name!r}; extract each task (--task "
            f"{names[0]}, then --task {names[1]}, ...), then train them together with "
            f"`pipeline run train-side --task {cfg.task.name}`"
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lst-pipeline", prog_name="pipeline")
@click.option("--verbose", is_flag=True, help="show the traceback of an error (also: LST_DEBUG=1)")
def cli(verbose: bool) -> None:
    """lst-pipeline: Ladder Side-Tuning from an activation cache."""
    if verbose:
        os.environ["LST_DEBUG"] = "1"


@cli.group()
def run() -> None:
    """Run a stage."""


def cluster_options(f: Callable) -> Callable:
    """Dask options: a local cluster (--workers N) or an existing one (--scheduler ADDRESS)."""
    for opt in reversed(
        [
            click.option(
                "--workers", type=int, help="run on a local Dask cluster of N worker processes"
            ),
            click.option("--scheduler", help="run on an existing Dask cluster: tcp://host:8786"),
            click.option(
                "--scheduler-timeout",
                type=float,
                default=30.0,
                show_default=True,
                help="seconds to wait for --scheduler to answer",
            ),
        ]
    ):
        f = opt(f)
    return f


def _cluster(
    workers: int | None, scheduler: str | None, timeout: float, default_workers: int | None = None
) -> Any:
    """A ``stages.cluster.Cluster`` context when Dask is asked for, else a null context."""
    import contextlib

    if workers is None and scheduler is None and default_workers is None:
        return contextlib.nullcontext()
    from stages.cluster import Cluster

    return Cluster(
        workers if workers is not None or scheduler else default_workers, scheduler, timeout
    )


@run.command("extract")
@common_options
@extract_options
@cluster_options
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def run_extract(
    config_path: str | None,
    as_json: bool,
    workers: int | None,
    scheduler: str | None,
    scheduler_timeout: float,
    **opts: Any,
) -> None:
    """Stage one: run the frozen backbone once and write the activation cache."""
    cfg = build_config(config_path, **opts)
    _check_task(cfg, "run extract")
    with _cluster(workers, scheduler, scheduler_timeout) as cluster:
        result = _extract(cfg, cluster, progress=not as_json)
    out = {"key": result.key, "root": result.root, "reused": result.reused}
    if not result.reused:
        out["timings"] = result.manifest.get("timings", {})
        if "distributed" in result.manifest:
            out["distributed"] = result.manifest["distributed"]

    def human(o: dict) -> None:
        if o["reused"]:
            click.echo(f"cache exists, nothing to do: {o['key']}  ({o['root']})")
        else:
            t = o["timings"]
            on = f" on {o['distributed']['workers']} Dask workers" if "distributed" in o else ""
            click.echo(f"committed {o['key']}  ({o['root']})  in {t.get('total_s', 0):.1f}s{on}")

    _emit(out, as_json, human)


def _extract(cfg: Config, cluster: Any, progress: bool) -> Any:
    """Stage one, on the Dask ``cluster`` when there is one.

    The task's data is loaded first, without torch: a data error (no --data-dir offline, a
    missing file) is one line within a second or two.
    """
    from stages.tasks import load_task_of

    data = load_task_of(cfg.task)
    from stages.extract import extract

    runner = None
    if cluster is not None:
        from stages.extract_dask import DaskSegments

        runner = DaskSegments(cluster)
    return extract(cfg, data=data, progress=progress, runner=runner)


def _floats(value: str | None, param: click.Parameter | None = None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise PipelineError(
            f"{_option_name(param)}: expected comma-separated numbers, got {value!r}"
        ) from None


def _learning_rates(value: str | None, param: click.Parameter) -> list[float] | None:
    lrs = _nonempty(_floats(value, param), param, "3e-3,1e-3")
    for lr in lrs or []:
        if not math.isfinite(lr) or lr <= 0:
            raise PipelineError(
                f"{param.opts[0]}: {lr:g} is not allowed; learning rates must be finite numbers "
                "greater than 0 (e.g. 3e-3)"
            )
    return lrs


TRAIN_OPTIONS = [
    click.option(
        "--cache-key",
        help="train from this cache  [default: the newest committed cache matching the task, "
        "data, limit, backbone and max length]",
    ),
    config_option(
        "--reduction-factors",
        "train_side.reduction_factors",
        "one side network per factor, e.g. 4,8,16,32",
        name="train_reduction_factors",
        callback=lambda c, p, v: _nonempty(_ints(v, p), p, "4,8,16,32"),
    ),
    config_option(
        "--seeds",
        "train_side.seeds",
        "one side network per seed, e.g. 0,1,2",
        callback=lambda c, p, v: _nonempty(_ints(v, p), p, "0,1,2"),
    ),
    config_option(
        "--learning-rates",
        "train_side.learning_rates",
        "one side network per learning rate, e.g. 3e-3,1e-3",
        callback=lambda c, p, v: _learning_rates(v, p),
    ),
    config_option(
        "--epochs",
        "train_side.epochs",
        "training epochs",
        none="20 for rte mrpc stsb cola, 10 for the rest (the paper)",
        type=int,
    ),
    config_option("--batch-size", "train_side.batch_size", "examples per batch", type=int),
    config_option(
        "--warmup-steps",
        "train_side.warmup_steps",
        "linear warm-up steps (the authors' default; a warning says when it is most of the run)",
        type=int,
    ),
    config_option(
        "--warmup-ratio",
        "train_side.warmup_ratio",
        "warm-up as a share of the run's optimizer steps, in [0, 1), e.g. 0.06: "
        "ceil(ratio * steps); overrides warmup_steps",
        none="unset (warmup_steps)",
        type=float,
    ),
    config_option(
        "--kept-layers",
        "train_side.kept_layers",
        "backbone blocks with a ladder, e.g. 1,3,5",
        none="all",
        callback=lambda c, p, v: _ints(v, p),
    ),
    config_option(
        "--fusion",
        "train_side.fusion",
        "how the side network reads the backbone",
        type=click.Choice(_choices("train_side.fusion")),
    ),
    config_option(
        "--visual-fusion",
        "train_side.visual_fusion",
        "VL tasks: visual tokens into every side block through a gate (ladder), or once at the "
        "input (the authors')",
        type=click.Choice(_choices("train_side.visual_fusion")),
    ),
    config_option(
        "--visual-readout",
        "train_side.visual_readout",
        "VL tasks, encoder-only backbones: the head reads the first text token (text), or also "
        "a pooling over the visual positions (text+visual)",
        type=click.Choice(_choices("train_side.visual_readout")),
    ),
    config_option(
        "--class-weight",
        "train_side.class_weight",
        "classification: weigh each class's loss by n / (n_classes * n_class) over the training "
        "split (balanced), or every example alike (none)",
        type=click.Choice(_choices("train_side.class_weight")),
    ),
    config_option(
        "--xladder-depth",
        "train_side.xladder_depth",
        "fusion xladder: the top N backbone blocks ladder into the first N of 2N side blocks",
        none="half the backbone's blocks, at least 1",
        type=int,
    ),
    config_option(
        "--init",
        "train_side.init",
        "side network initialisation (magnitude, fisher: the cache's side_init)",
        type=click.Choice(_choices("train_side.init")),
    ),
    config_option(
        "--ladder-dropout",
        "train_side.ladder_dropout",
        "dropout on the cached states, in [0, 1)",
        type=float,
    ),
    config_option(
        "--dropout",
        "train_side.dropout",
        "one rate for every side-network dropout, in [0, 1)",
        none="the backbone's own rates",
        type=float,
    ),
    config_option("--run-dir", "train_side.run_dir", "parent folder of run folders"),
    config_option(
        "--batched",
        "train_side.batched",
        "train networks of one shape as one stacked model (auto: where a shape has several)",
        type=click.Choice(_choices("train_side.batched")),
    ),
    config_option(
        "--compile",
        "train_side.compile",
        "torch.compile each network's step (auto: on for CUDA, off on CPU)",
        type=click.Choice(_choices("train_side.compile")),
    ),
    config_option(
        "--side-device",
        "train_side.device",
        "where the side networks train, free text: auto (cuda when present) | cpu | cuda | "
        "cuda:N | mps",
    ),
    config_option(
        "--precision",
        "train_side.precision",
        "the side networks' forward: float32, or under bfloat16 / float16 autocast (float16: "
        "with a loss scale)",
        type=click.Choice(_choices("train_side.precision")),
    ),
    config_option(
        "--report-to",
        "train_side.report_to",
        "experiment trackers, comma-separated: tensorboard, mlflow (none or empty: no tracking)",
        callback=lambda c, p, v: _strs(v),
    ),
    click.option(
        "--run-name", help="run folder name  [default: the cache key and a digest of the settings]"
    ),
    click.option(
        "--online",
        type=click.Choice(["dropout", "eval"]),
        help="reference: online LST with the live backbone (dropout on or off)  [default: off]",
    ),
]
train_options = _apply(TRAIN_OPTIONS)
"""Options of stage two (``run train-side`` and ``run all``)."""


def _train(
    cfg: Config, cache_key: str | None, run_name: str | None, online: str | None, progress: bool
) -> dict:
    from stages.train_side import train_side

    if len(cfg.task.names) > 1:  # several tasks, one side network (stages.multitask)
        from stages.multitask import train_multitask

        if online is not None:
            raise PipelineError("--online trains one task; a task list trains from the caches")
        return train_multitask(cfg, cache_key=cache_key, run_name=run_name, progress=progress)
    backbone = None
    if online is not None:
        from ladder.backbones import load_backbone
        from stages.train_side import side_device

        backbone = load_backbone(  # beside the side networks: its states feed them
            cfg.backbone.name,
            revision=cfg.backbone.revision,
            device=side_device(cfg),
            quantization=cfg.backbone.quantization,
        )
    result = train_side(
        cfg,
        cache_key=cache_key,
        run_name=run_name,
        online=backbone,
        online_dropout=online == "dropout",
        progress=progress,
    )
    nets = result.metrics["networks"]
    return {
        "run": str(result.folder),
        "cache": result.cache_key,
        "networks": {
            k: {
                "best_epoch": v["best_epoch"],
                "validation": v["best_validation"],
                "test": v.get("test"),
                **({"stopped": v["stopped"]} if v.get("stopped") else {}),
                **({"note": v["note"]} if v.get("note") else {}),
            }
            for k, v in nets.items()
        },
    }


def _exit_if_stopped(out: dict) -> None:
    """Exit status 1, one line per network that stopped early (non-finite training loss)."""
    stopped = {k: v["stopped"] for k, v in out.get("networks", {}).items() if v.get("stopped")}
    for name, why in stopped.items():
        click.echo(
            f"error: network {name} {why}: lower its learning rate; its figures are not valid",
            err=True,
        )
    if stopped:
        sys.exit(1)


def _print_train(o: dict) -> None:
    if "tasks" in o:
        return _print_multitask(o)
    click.echo(f"run folder: {o['run']}  (cache {o['cache']})")
    for name, v in o["networks"].items():
        test = v["test"] or {}
        click.echo(
            f"  {name}: best epoch {v['best_epoch']}, validation {v['validation']:.2f}, test {test.get('score', float('nan')):.2f}"
            + (" (stopped)" if v.get("stopped") else "")
            + (f"; validation {v['note']}" if v.get("note") else "")
        )


def _print_multitask(o: dict) -> None:
    caches = ", ".join(o["caches"].values())
    click.echo(f"run folder: {o['run']}  (caches {caches})")
    nan = float("nan")
    for name, v in o["networks"].items():
        test = v["test"] or {}
        click.echo(
            f"  {name}: best epoch {v['best_epoch']}, validation average {v['validation']:.2f}, "
            f"test average {test.get('score', nan):.2f}"
            + (" (stopped)" if v.get("stopped") else "")
        )
        for task, t in v["tasks"].items():
            click.echo(
                f"    {task} {t['metric']}: validation {t['validation']:.2f}, test "
                f"{nan if t['test'] is None else t['test']:.2f}"
                + (f"; validation {t['note']}" if t.get("note") else "")
            )


def _sweep(
    cfg: Config,
    cluster: Any,
    cache_key: str | None,
    run_name: str | None,
    online: str | None,
    progress: bool,
) -> dict:
    from stages.sweep import SWEEP_COLUMNS, sweep_train_side

    if online is not None:
        raise PipelineError("--sweep trains from the cache; --online runs in one process")
    res = sweep_train_side(
        cfg, cluster, cache_key=cache_key, sweep_name=run_name, progress=progress
    )
    return {
        "sweep": str(res.folder),
        "cache": res.cache_key,
        "task": res.task,
        "metric": res.metric,
        "trials": [{k: row[k] for k in SWEEP_COLUMNS} for row in res.rows],
        "networks": {row["trial"]: {"stopped": row["stopped"]} for row in res.rows},
    }


def _print_sweep(o: dict) -> None:
    click.echo(f"sweep folder: {o['sweep']}  (cache {o['cache']}, {o['task']} {o['metric']})")
    nan = float("nan")
    rows = [
        [
            t["trial"], str(t["r"]), str(t["seed"]), f"{t['lr']:g}", str(t["best_epoch"]),
            f"{t['validation']:.2f}", f"{nan if t['test'] is None else t['test']:.2f}",
            f"{t['wall_s']:.1f}", t["worker"],
        ]
        for t in o["trials"]
    ]  # fmt: skip
    head = ["trial", "r", "seed", "lr", "best epoch", "validation", "test", "wall s", "worker"]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    for r in [head, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _sweep_workers(cfg: Config, sweep: bool) -> int | None:
    """Local workers for a --sweep given neither --workers nor --scheduler: one per trial, per core."""
    if not sweep:
        return None
    from stages.train_side import trials_of

    return max(1, min(len(trials_of(cfg)), os.cpu_count() or 1))


def sweep_option(f: Callable) -> Callable:
    return click.option(
        "--sweep",
        is_flag=True,
        help="one Dask task per (reduction factor, seed, learning rate); a local cluster by default",
    )(f)


@run.command("train-side")
@common_options
@train_options
@sweep_option
@cluster_options
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def run_train_side(
    config_path: str | None,
    cache_key: str | None,
    run_name: str | None,
    online: str | None,
    sweep: bool,
    workers: int | None,
    scheduler: str | None,
    scheduler_timeout: float,
    as_json: bool,
    **opts: Any,
) -> None:
    """Stage two: train side networks from the cache (never loads the backbone).

    Takes what affects training and what picks the cache (task, data, limit, backbone, max
    length, cache root or key); extraction's options belong to `run extract` and `run all`.
    """
    cfg = build_config(config_path, **opts)
    _check_task(cfg)
    if not sweep and (workers is not None or scheduler is not None):
        raise PipelineError("--workers/--scheduler spread a --sweep over Dask workers; add --sweep")
    with _cluster(workers, scheduler, scheduler_timeout, _sweep_workers(cfg, sweep)) as cluster:
        _stage_two(cfg, cluster, sweep, cache_key, run_name, online, as_json)


def _stage_two(
    cfg: Config,
    cluster: Any,
    sweep: bool,
    cache_key: str | None,
    run_name: str | None,
    online: str | None,
    as_json: bool,
) -> None:
    """``train-side`` and the second half of ``all``: one run, or a sweep on ``cluster``."""
    if sweep and len(cfg.task.names) > 1:
        raise PipelineError("--sweep runs one task; a task list trains in one process")
    if sweep:
        out = _sweep(cfg, cluster, cache_key, run_name, online, not as_json)
        _emit(out, as_json, _print_sweep)
        _exit_if_stopped(out)
    else:
        out = _train(cfg, cache_key, run_name, online, not as_json)
        _emit(out, as_json, _print_train)
        _exit_if_stopped(out)


@run.command("all")
@common_options
@extract_options
@train_options
@sweep_option
@cluster_options
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def run_all(
    config_path: str | None,
    cache_key: str | None,
    run_name: str | None,
    online: str | None,
    sweep: bool,
    workers: int | None,
    scheduler: str | None,
    scheduler_timeout: float,
    as_json: bool,
    **opts: Any,
) -> None:
    """Extract (or reuse) the cache, then train side networks from it.

    --workers/--scheduler run the extraction on Dask workers (and the --sweep, when given).
    """
    cfg = build_config(config_path, **opts)
    _check_task(cfg, "run all")
    on_dask = workers is not None or scheduler is not None
    with _cluster(workers, scheduler, scheduler_timeout, _sweep_workers(cfg, sweep)) as cluster:
        if cache_key is None:
            result = _extract(cfg, cluster if on_dask else None, progress=not as_json)
            cache_key = result.key
            if not as_json:
                click.echo(f"cache {'reused' if result.reused else 'committed'}: {cache_key}")
        _stage_two(cfg, cluster, sweep, cache_key, run_name, online, as_json)


NUM_BEAMS_OPTION = click.option(
    "--num-beams",
    type=int,
    default=1,
    show_default=True,
    help="captioning: beam search with N beams (1: greedy)",
)


@cli.command("predict")
@click.option("--run", "run_folder", required=True, help="a train-side run folder")
@click.option("--network", help="which network of the run (default: the first)")
@click.option("--task", "task_name", help="which task of a multi-task run (required there)")
@click.argument("texts", nargs=-1)
@click.option(
    "--input",
    "input_path",
    help="many inputs: a .jsonl, .csv or .tsv file with the task's text columns, or - (stdin, JSONL)",
)
@click.option(
    "--batch-size",
    "predict_batch",
    type=int,
    default=64,
    show_default=True,
    help="examples per batch",
)
@click.option(
    "--allow-unfinished",
    is_flag=True,
    help="use the best checkpoint of a run that has not finished (no test figures yet)",
)
@NUM_BEAMS_OPTION
@click.option(
    "--json", "as_json", is_flag=True, help="one JSON line per input, every class's probability"
)
def predict(
    run_folder: str,
    network: str | None,
    task_name: str | None,
    texts: tuple[str, ...],
    input_path: str | None,
    predict_batch: int,
    allow_unfinished: bool,
    num_beams: int,
    as_json: bool,
) -> None:
    """Backbone + trained side network on new text: TEXT (or TEXT_A TEXT_B for pair tasks), or
    every row of --input. Prints the predicted label and its probability (regression: the score).
    """
    import time

    from stages.evaluate import Predictor, read_inputs, run_tasks
    from stages.tasks import Example

    if (input_path is None) == (not texts):
        raise PipelineError(
            "give either TEXT (TEXT_A TEXT_B for pair tasks) or --input FILE (- for stdin)"
        )
    if task_name is None and len(tasks := run_tasks(run_folder)) > 1:
        raise PipelineError(
            f"run {run_folder} trained several tasks; predict takes one: --task "
            f"{' or --task '.join(tasks)}"
        )
    t0 = time.perf_counter()
    p = Predictor(
        run_folder, network, task=task_name, allow_unfinished=allow_unfinished, num_beams=num_beams
    )
    load_s = time.perf_counter() - t0
    if input_path is None and p.spec.images:
        raise PipelineError(
            f"task {p.spec.name!r} reads images: give --input FILE (- for stdin) whose JSONL rows "
            f"hold {', '.join([*p.spec.text_fields, 'image'])} (a file path)"
        )
    if input_path is None:
        n = len(p.spec.text_fields)
        if len(texts) != n:
            raise PipelineError(
                f"task {p.spec.name!r} takes {n} text(s) ({', '.join(p.spec.text_fields)}), got {len(texts)}"
            )
        examples = [Example(tuple(texts), 0)]
    else:
        examples = read_inputs(input_path, p.spec)
    t1 = time.perf_counter()
    desc = f"predict: {p.spec.name} ({len(examples)} examples)" if input_path else None
    rows = p.explain(examples, batch_size=predict_batch, progress=desc)
    seconds = time.perf_counter() - t1
    rows = [{"task": p.spec.name, **row} for row in rows]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    elif input_path is None:
        row = rows[0]
        prob = f"  {row['probability']:.3f}" if "probability" in row else ""
        click.echo(f"{row['prediction']}{prob}")
    else:
        _print_predictions(examples, rows)
    if input_path is not None:
        click.echo(
            f"predicted {len(rows)} examples in {seconds:.2f}s ({len(rows) / max(seconds, 1e-9):.1f} "
            f"examples/s; backbone and network loaded in {load_s:.1f}s)",
            err=True,
        )


def _print_predictions(examples: list, rows: list[dict]) -> None:
    """A table: row number, prediction, its probability (classification), the text(s)."""
    head = ["#", "prediction", *(["probability"] if "probability" in rows[0] else []), "text"]
    table = [
        [
            str(i),
            r["prediction"],
            *([f"{r['probability']:.3f}"] if "probability" in r else []),
            " | ".join(ex.texts)[:80],
        ]
        for i, (ex, r) in enumerate(zip(examples, rows, strict=True), start=1)
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *table, strict=True)]
    for r in [head, *table]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@cli.command("evaluate")
@click.option("--run", "run_folder", required=True, help="a train-side run folder")
@click.option("--network", help="which network of the run (default: the first)")
@click.option("--task", "task_name", help="which task of a multi-task run (default: every task)")
@click.option(
    "--split",
    default="test",
    show_default=True,
    type=click.Choice(["train", "validation", "test"]),
    help="the split to score",
)
@click.option("--data-dir", help="a glue_data folder  [default: the run's]")
@click.option("--limit", type=int, help="first N examples  [default: all]")
@click.option(
    "--allow-unfinished",
    is_flag=True,
    help="use the best checkpoint of a run that has not finished (no test figures yet)",
)
@NUM_BEAMS_OPTION
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def evaluate_cmd(
    run_folder: str,
    network: str | None,
    task_name: str | None,
    split: str,
    data_dir: str | None,
    limit: int | None,
    allow_unfinished: bool,
    num_beams: int,
    as_json: bool,
) -> None:
    """Backbone + trained side network on a dataset split, with the task's metric (a multi-task
    run: every task's, or --task's, as its metrics.json records them)."""
    from stages.evaluate import Predictor, evaluate_task, evaluate_tasks

    p = Predictor(
        run_folder, network, task=task_name, allow_unfinished=allow_unfinished, num_beams=num_beams
    )
    if task_name is None and len(p.tasks) > 1:
        every = evaluate_tasks(p, split, data_dir=data_dir, limit=limit)
        _emit({"split": split, **every}, as_json, _print_tasks)
        return
    metrics = evaluate_task(p, split, data_dir=data_dir, limit=limit)
    _emit({"split": split, **metrics}, as_json, lambda o: click.echo(_figures(o)))


def _figures(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in metrics.items() if k != "split")


def _print_tasks(o: dict[str, Any]) -> None:
    """A multi-task evaluation: a line per task, then the average."""
    for task, metrics in o.items():
        if isinstance(metrics, dict):
            click.echo(f"{task}  {_figures(metrics)}")
    click.echo(f"average  score={o['score']:.2f}")


@cli.group()
def cache() -> None:
    """List, inspect, verify, remove and copy caches (local roots or s3://, gs:// URLs)."""


def _root_option(f: Callable) -> Callable:
    f = click.option("--json", "as_json", is_flag=True, help="machine-readable output")(f)
    f = click.option(
        "--cache-root", help=f"{ROOT_HELP}  [default: {_default_text('cache.root', None)}]"
    )(f)
    return CONFIG_OPTION(f)


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cache.command("ls")
@_root_option
def cache_ls(config_path: str | None, cache_root: str | None, as_json: bool) -> None:
    """List the caches under the cache root."""
    from cache_store.registry import list_caches

    cfg = build_config(config_path, cache_root=cache_root)
    rows = list_caches(cfg.cache.resolved_root, cfg.cache.storage_options)

    def human(rows: list[dict]) -> None:
        if not rows:
            click.echo(f"no caches under {cfg.cache.resolved_root}")
        for r in rows:
            if r["status"] != "complete":
                fix = f"  (fix: {r['fix']})" if r.get("fix") else ""
                click.echo(f"{r['key']}  {r['status']}{fix}")
                continue
            click.echo(
                f"{r['key']}  {r['task']}  {r['backbone']}  {r['dtype']}/{r['codec']}  "
                f"{r['examples']} ex  {_human_size(r['bytes'])}  "
                f"{r['created_by'] or '-'}  {r['created_at'] or '-'}"
            )

    _emit(rows, as_json, human)


@cache.command("info")
@click.argument("key")
@_root_option
def cache_info_cmd(
    key: str, config_path: str | None, cache_root: str | None, as_json: bool
) -> None:
    """Show a cache's manifest."""
    from cache_store.registry import cache_info

    cfg = build_config(config_path, cache_root=cache_root)
    info = cache_info(cfg.cache.resolved_root, key, cfg.cache.storage_options)

    def human(i: dict) -> None:
        click.echo(f"key:       {i['key']}")
        click.echo(f"task:      {i['task']['name']}  ({i['task']['source']})")
        b = i["backbone"]
        click.echo(
            f"backbone:  {b['name']}  {b['model_type']}  d={b['d_model']}  layers={b['n_layers']}"
        )
        click.echo(f"stored:    {i['layers_stored']}  {i['dtype']}/{i['codec']}")
        for split, s in i["splits"].items():
            toks = ", ".join(f"{k}={v['n_tokens']}" for k, v in s["streams"].items())
            click.echo(f"{split + ':':<10} {s['n_examples']} examples, tokens {toks}")
        click.echo(f"side_init: {i['side_init']}")
        click.echo(f"size:      {_human_size(i['bytes'])}")
        click.echo(f"made by:   {i['created_by']} at {i['created_at']}")

    _emit(info, as_json, human)


@cache.command("verify")
@click.argument("key")
@_root_option
def cache_verify(key: str, config_path: str | None, cache_root: str | None, as_json: bool) -> None:
    """Read every chunk back, checking checksums; exit 1 and name what is missing or corrupt."""
    from cache_store.registry import verify_cache

    cfg = build_config(config_path, cache_root=cache_root)
    report = verify_cache(cfg.cache.resolved_root, key, cfg.cache.storage_options)

    def human(r: dict) -> None:
        for p in r["problems"]:
            click.echo(p)
        status = "ok" if r["ok"] else f"FAILED ({len(r['problems'])} problems)"
        click.echo(f"{r['key']}: {r['objects']} objects checked, {status}")

    _emit(report, as_json, human)
    if not report["ok"]:
        sys.exit(1)


@cache.command("rm")
@click.argument("key")
@_root_option
def cache_rm(key: str, config_path: str | None, cache_root: str | None, as_json: bool) -> None:
    """Delete a cache (its commit first, so no reader opens a half-deleted cache)."""
    from cache_store.registry import remove_cache

    cfg = build_config(config_path, cache_root=cache_root)
    remove_cache(cfg.cache.resolved_root, key, cfg.cache.storage_options)
    _emit({"key": key, "removed": True}, as_json, lambda o: click.echo(f"removed {o['key']}"))


def _copy_command(
    verb: str, key: str, to: str, config_path: str | None, cache_root: str | None, as_json: bool
) -> None:
    from cache_store.registry import copy_cache

    cfg = build_config(config_path, cache_root=cache_root)
    to = to if "://" in to else os.path.abspath(os.path.expanduser(to))
    out = copy_cache(
        cfg.cache.resolved_root, to, key, cfg.cache.storage_options, progress=not as_json, verb=verb
    )

    def human(o: dict) -> None:
        if o["already_committed"]:
            click.echo(f"{o['key']} is already committed under {o['to']}, nothing to do")
        else:
            click.echo(
                f"{verb}ed {o['key']} to {o['to']}: {o['objects']} objects, "
                f"{_human_size(o['bytes'])} in {o['seconds']:.1f}s; "
                f"{o['verified_objects']} objects verified, committed"
            )

    _emit(out, as_json, human)


@cache.command("pull")
@click.argument("key")
@click.option("--to", "to", required=True, help="local cache root to copy the cache into")
@_root_option
def cache_pull(
    key: str, to: str, config_path: str | None, cache_root: str | None, as_json: bool
) -> None:
    """Copy cache KEY from the cache root (e.g. s3://...) to a local root; verified, then committed.

    The local commit is written last: a killed pull leaves nothing committed, and running it
    again resumes (objects already copied are skipped).
    """
    _copy_command("pull", key, to, config_path, cache_root, as_json)


@cache.command("push")
@click.argument("key")
@click.option("--to", "to", required=True, help="remote cache root (s3://bucket/prefix)")
@_root_option
def cache_push(
    key: str, to: str, config_path: str | None, cache_root: str | None, as_json: bool
) -> None:
    """Copy cache KEY from the (local) cache root to a remote root; its commit object last."""
    _copy_command("push", key, to, config_path, cache_root, as_json)


@cli.group("config")
def config_group() -> None:
    """The effective configuration."""


def _config_keys_only(options: list[Callable]) -> list[Callable]:
    return [o for o in options if hasattr(o, "config_key")]


@config_group.command("show")
@common_options
@_apply(_config_keys_only(EXTRACT_OPTIONS + TRAIN_OPTIONS))
@click.option("--json", "as_json", is_flag=True, help="print the configuration as JSON")
def config_show(config_path: str | None, as_json: bool, **opts: Any) -> None:
    """Print the configuration a run with these options would use, and where each value comes
    from: default, file (path), environment (LST_CACHE_ROOT) or flag. Secrets are shown as ***."""
    from stages.runfiles import redact_config

    params = click.get_current_context().command.params
    flags = {
        OPTION_KEYS[p.name]: p.opts[0]
        for p in params
        if p.name in OPTION_KEYS and opts.get(p.name) is not None
    }
    if opts.get("warmup_steps") is not None:
        flags["train_side.warmup_ratio"] = "--warmup-steps"
    sources = config_sources(config_path, flags)
    env_root = os.environ.get("LST_CACHE_ROOT") if opts.get("cache_root") is None else None
    cfg = build_config(config_path, **opts)
    data = redact_config(cfg.model_dump())
    if env_root:
        data["cache"]["root"] = env_root
    rows = {
        f"{section}.{key}": {"value": value, "source": sources[f"{section}.{key}"]}
        for section, values in data.items()
        for key, value in values.items()
    }

    def human(r: dict) -> None:
        shown = {k: json.dumps(v["value"]) for k, v in r.items()}
        kw = max(len(k) for k in r)
        vw = min(40, max(len(v) for v in shown.values()))
        for k, v in r.items():
            click.echo(f"{k:<{kw}}  {shown[k]:<{vw}}  {v['source']}")

    _emit(rows, as_json, human)


def _one_line(e: BaseException) -> str:
    """``error: ...`` for an exception: its own message for a user error, else its type too."""
    text = " ".join(str(e).split())
    if isinstance(e, USER_ERRORS):
        return f"error: {text}"
    where = ""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" (in {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
    return (
        f"error: {type(e).__name__}: {text or 'no message'}{where}; "
        "re-run with --verbose (or LST_DEBUG=1) for the traceback"
    )


def run_cli(args: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for an error, one line on stderr)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        result = cli(args=args, prog_name="pipeline", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.NoArgsIsHelpError as e:
        e.show()
        return e.exit_code
    except click.UsageError as e:  # a bad option or value: one line too, naming the command
        where = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
        click.echo(f"error: {' '.join(e.format_message().split()).rstrip('.')}{where}", err=True)
        return 2
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # one handler at the top: every failure is one line and exit 2
        if os.environ.get("LST_DEBUG") not in (None, "", "0"):
            traceback.print_exc()
        click.echo(_one_line(e), err=True)
        return 2
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
