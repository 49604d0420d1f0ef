"""The command line: warm-up, one set of options per stage, config show, resolved run folders,
fast paths without torch, and one quick line when the hub cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from pipeline.cli import OPTION_KEYS, _print_train, build_config, cli, run_cli
from pipeline.config import Config, apply_overrides, schema_default
from tests.conftest import REPO


def _err_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _commands(group: click.Group, path: str = "pipeline"):
    for name, cmd in group.commands.items():
        yield f"{path} {name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{path} {name}")


def _options(cmd: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in cmd.params if isinstance(p, click.Option)}


# --------------------------------------------------------------------------- 3. warm-up


def test_warmup_ratio_is_ceil_of_the_steps_and_overrides_warmup_steps():
    from stages.train_side import warmup_steps_of, warmup_warning

    cfg = Config()
    assert warmup_steps_of(cfg, 20) == 500  # the authors' default is kept
    ratio = apply_overrides(cfg, {"train_side.warmup_ratio": 0.06})
    assert warmup_steps_of(ratio, 20) == 2  # ceil(1.2)
    assert warmup_steps_of(ratio, 1000) == 60
    assert warmup_steps_of(apply_overrides(cfg, {"train_side.warmup_ratio": 0.0}), 99) == 0
    # more than half the run: one line with the numbers and the remedy
    line = warmup_warning(cfg, 20)
    assert line is not None and "\n" not in line
    assert "500" in line and "20 optimizer steps" in line and "--warmup-ratio 0.06" in line
    assert warmup_warning(cfg, 1000) is None and warmup_warning(cfg, 1001) is None
    assert warmup_warning(cfg, 999) is not None
    assert warmup_warning(ratio, 20) is None


@pytest.mark.parametrize("bad", ["1.0", "-0.1"])
def test_warmup_ratio_out_of_range_is_refused(bad, capsys):
    assert run_cli(["run", "train-side", "--warmup-ratio", bad]) == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("error: ") and "train_side.warmup_ratio" in line


def test_warmup_steps_and_ratio_both_given_is_an_error(capsys):
    code = run_cli(["run", "train-side", "--warmup-steps", "10", "--warmup-ratio", "0.1"])
    (line,) = _err_lines(capsys)
    assert code == 2 and "--warmup-steps" in line and "--warmup-ratio" in line


def test_warmup_steps_flag_beats_a_ratio_from_the_file(tmp_path):
    yaml = tmp_path / "p.yaml"
    yaml.write_text("train_side:\n  warmup_ratio: 0.1\n")
    assert build_config(str(yaml)).train_side.warmup_ratio == 0.1
    cfg = build_config(str(yaml), warmup_steps=7)
    assert (cfg.train_side.warmup_ratio, cfg.train_side.warmup_steps) == (None, 7)
    assert build_config(str(yaml), warmup_ratio=0.2).train_side.warmup_ratio == 0.2


def test_majority_class_note():
    from stages.train_side import majority_note

    maj = {"label": "entailment", "score": 52.5}
    assert majority_note(52.5, 3, maj) == "equals always predicting 'entailment'"
    assert majority_note(52.6, 3, maj) is None
    assert majority_note(52.5, 0, maj) is None  # no checkpoint yet
    assert majority_note(52.5, 3, None) is None  # regression: no majority class


def test_the_summary_says_when_validation_equals_the_majority_class(capsys):
    out = {
        "run": "runs/x",
        "cache": "k",
        "networks": {
            "r8-s0-lr0.003": {
                "best_epoch": 2,
                "validation": 52.5,
                "test": {"score": 50.0},
                "note": "equals always predicting 'entailment'",
            },
            "r4-s0-lr0.003": {"best_epoch": 2, "validation": 60.0, "test": {"score": 58.0}},
        },
    }
    _print_train(out)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("validation equals always predicting 'entailment'")
    assert "predicting" not in lines[2]


# --------------------------------------------------------------------------- 4. options


def test_run_all_takes_every_option_of_extract_and_train_side():
    run = cli.commands["run"]
    extract, train, both = (_options(run.commands[c]) for c in ("extract", "train-side", "all"))
    assert set(extract) | set(train) <= set(both)
    for name in ("codec", "device", "layers", "side_init", "fisher_samples", "batch_tokens"):
        assert name in both
    # every option of both stages is one definition: same flags and help
    for name, opt in {**extract, **train}.items():
        assert both[name].opts == opt.opts and both[name].help == opt.help, name


def test_train_side_takes_only_training_and_cache_picking_options(capsys):
    train = _options(cli.commands["run"].commands["train-side"])
    for extract_only in ("dtype", "codec", "device", "layers", "side_init", "fisher_samples"):
        assert extract_only not in train
    for picks_cache in ("task", "data_dir", "limit", "backbone", "max_length", "cache_root"):
        assert picks_cache in train
    assert "cache_key" in train
    assert run_cli(["run", "train-side", "--dtype", "float16"]) == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("error: ") and "--dtype" in line


def test_every_option_has_help_its_default_and_its_choices():
    checked = 0
    for path, cmd in _commands(cli):
        for name, opt in _options(cmd).items():
            if name == "help":
                continue
            assert opt.help and opt.help.strip(), f"{path} {opt.opts[0]} has no help"
            if name in OPTION_KEYS:
                checked += 1
                unset = opt.default is None or type(opt.default).__name__ == "Sentinel"
                assert unset, f"{path} {opt.opts[0]}: a default would override pipeline.yaml"
                assert "[default: " in opt.help, f"{path} {opt.opts[0]} shows no default"
                value = schema_default(OPTION_KEYS[name])
                if value is not None and not isinstance(value, list):
                    assert f"[default: {value}]" in opt.help, f"{path} {opt.opts[0]}"
    assert checked > 40
    run = cli.commands["run"].commands
    choices = {
        "dtype": ["float32", "float16", "bfloat16", "int8"],
        "codec": ["raw", "lz4", "zstd"],
        "fusion": ["ladder", "late", "none", "xladder"],
        "init": ["random", "magnitude", "fisher"],
    }
    for name, values in choices.items():
        opt = _options(run["all"])[name]
        assert isinstance(opt.type, click.Choice) and list(opt.type.choices) == values
    split = _options(cli.commands["evaluate"])["split"]
    assert list(split.type.choices) == ["train", "validation", "test"]
    assert "free text" in _options(run["extract"])["device"].help


def test_side_init_factors_and_reduction_factors_mean_one_thing_each():
    run = cli.commands["run"].commands
    assert OPTION_KEYS["side_init_factors"] == "extract.reduction_factors"
    assert OPTION_KEYS["train_reduction_factors"] == "train_side.reduction_factors"
    assert "--reduction-factors" not in {o for p in run["extract"].params for o in p.opts}
    both = _options(run["all"])
    assert both["side_init_factors"].opts == ["--side-init-factors"]
    assert both["train_reduction_factors"].opts == ["--reduction-factors"]
    cfg = build_config(None, side_init_factors=[4], train_reduction_factors=[16])
    assert cfg.extract.reduction_factors == [4] and cfg.train_side.reduction_factors == [16]


def test_option_defaults_do_not_override_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipeline.yaml").write_text("cache: {dtype: int8}\ntrain_side: {fusion: late}\n")
    ctx = cli.commands["run"].commands["all"].make_context("all", [])
    cfg = build_config(ctx.params.pop("config_path"), **ctx.params)
    assert cfg.cache.dtype == "int8" and cfg.train_side.fusion == "late"


def test_version(capsys):
    from importlib.metadata import version

    assert run_cli(["--version"]) == 0
    assert version("lst-pipeline") in capsys.readouterr().out


def test_config_show_says_where_each_value_comes_from(tmp_path, monkeypatch, capsys):
    yaml = tmp_path / "p.yaml"
    yaml.write_text(
        "task: {name: cola}\n"
        "cache:\n  storage_options: {key: AKIAEXAMPLE, secret: hunter2, endpoint_url: http://x}\n"
    )
    monkeypatch.setenv("LST_CACHE_ROOT", str(tmp_path / "env-root"))
    args = ["config", "show", "--config", str(yaml), "--epochs", "3", "--side-init-factors", "8"]
    assert run_cli([*args, "--json"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "AKIAEXAMPLE" not in out
    rows = json.loads(out)
    assert rows["task.name"] == {"value": "cola", "source": f"file ({yaml.resolve()})"}
    assert rows["cache.root"] == {
        "value": str(tmp_path / "env-root"),
        "source": "environment (LST_CACHE_ROOT)",
    }
    assert rows["train_side.epochs"] == {"value": 3, "source": "flag (--epochs)"}
    assert rows["extract.reduction_factors"]["source"] == "flag (--side-init-factors)"
    assert rows["backbone.name"] == {"value": "minilm-l6", "source": "default"}
    opts = rows["cache.storage_options"]["value"]
    assert opts == {"key": "***", "secret": "***", "endpoint_url": "http://x"}
    # a flag beats the environment; the human form has one line per key
    assert run_cli(["config", "show", "--cache-root", str(tmp_path / "flag-root")]) == 0
    lines = capsys.readouterr().out.splitlines()
    (root,) = [line for line in lines if line.startswith("cache.root ")]
    assert "flag-root" in root and root.endswith("flag (--cache-root)")
    assert len(lines) == sum(len(f.annotation.model_fields) for f in Config.model_fields.values())


# --------------------------------------------------------------------------- run folders


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory, glue_dir) -> dict:
    """`run all` on RTE with a relative --data-dir (8 examples a split, no --epochs)."""
    tmp = tmp_path_factory.mktemp("glue-run")
    work = tmp / "work"
    work.mkdir()
    rel = os.path.relpath(glue_dir, work)
    args = [
        "run", "all", "--task", "rte", "--data-dir", rel, "--limit", "8",
        "--cache-root", "cache", "--run-dir", "runs", "--dtype", "float32",
        "--side-init", "", "--side-init-factors", "", "--init", "random",
        "--batch-size", "8", "--reduction-factors", "8", "--json",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=work,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return {"work": work, "out": json.loads(proc.stdout), "err": proc.stderr}


def test_warmup_warning_is_one_line_on_stderr_not_in_json(glue_run):
    lines = [line for line in glue_run["err"].splitlines() if "warm-up" in line]
    assert len(lines) == 1, glue_run["err"]
    # 20 epochs (RTE, the paper) of 1 step: the default 500 steps never finish warming up
    assert "500" in lines[0] and "20 optimizer steps" in lines[0]
    assert "--warmup-ratio 0.06" in lines[0]
    assert "run" in glue_run["out"]  # stdout is the JSON alone


def test_run_folder_config_has_resolved_values(glue_run, glue_dir):
    run = Path(glue_run["out"]["run"])
    if not run.is_absolute():
        run = glue_run["work"] / run
    saved = json.loads((run / "config.json").read_text())
    assert saved["train_side"]["epochs"] == 20  # the epochs used, not null
    assert saved["task"]["data_dir"] == os.path.abspath(glue_dir)
    assert saved["cache"]["root"] == str(glue_run["work"] / "cache")
    assert saved["train_side"]["run_dir"] == str(glue_run["work"] / "runs")
    assert saved["train_side"]["warmup_steps"] == 500
    metrics = json.loads((run / "metrics.json").read_text())
    maj = metrics["majority_class"]
    assert maj["label"] in ("entailment", "not_entailment") and 50 <= maj["score"] <= 100


def test_evaluate_a_glue_run_with_a_relative_data_dir_from_another_folder(
    glue_run, tmp_path, monkeypatch, capsys
):
    run = Path(glue_run["out"]["run"])
    run = run if run.is_absolute() else glue_run["work"] / run
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = run_cli(["evaluate", "--run", str(run), "--split", "test", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 0 <= json.loads(out)["accuracy"] <= 100


# --------------------------------------------------------------------------- 5. fast paths

FAST = [
    ["--help"],
    ["run", "--help"],
    ["run", "all", "--help"],
    ["cache", "ls", "--cache-root", "{root}"],
    ["cache", "ls", "--cache-root", "{root}", "--json"],
    ["cache", "info", "no-such-key", "--cache-root", "{root}"],
    ["cache", "rm", "no-such-key", "--cache-root", "{root}"],
    ["config", "show"],
    ["run", "extract", "--dtype", "float64"],
    ["run", "extract", "--task", "mnli2"],
    ["run", "train-side", "--task", "mnli2"],
    ["run", "all", "--fusion", "early"],
    ["run", "extract", "--task", "rte", "--data-dir", "{root}/nowhere"],
    ["run", "train-side", "--warmup-steps", "1", "--warmup-ratio", "0.1"],
]


def test_help_cache_commands_and_argument_errors_do_not_import_torch(tmp_path):
    cases = [[a.format(root=tmp_path) for a in args] for args in FAST]
    code = (
        "import json, sys\n"
        "from pipeline.cli import run_cli\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    code = run_cli(args)\n"
        "    heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "    print('CASE', code, ' '.join(args), heavy, file=sys.stderr)\n"
        "    assert not heavy, (args, heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cases)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [line.split(" ", 2) for line in proc.stderr.splitlines() if line.startswith("CASE")]
    assert len(results) == len(cases)
    codes = {r[2].rsplit(" [", 1)[0]: int(r[1]) for r in results}
    assert codes["--help"] == 0 and codes[f"cache ls --cache-root {tmp_path}"] == 0
    assert codes["run extract --dtype float64"] == 2
    assert codes["run extract --task mnli2"] == 2


# --------------------------------------------------------------------------- 6. offline


def _hub_reachable() -> bool:
    from ladder.hub import hub_unreachable

    env = os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        return hub_unreachable.__wrapped__() is None
    finally:
        if env is not None:
            os.environ["HF_HUB_OFFLINE"] = env


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--task", "mnli"], "pass --data-dir"),
        (
            [
                "--task",
                "rte",
                "--data-dir",
                "{glue}",
                "--limit",
                "4",
                "--backbone",
                "bert-base-uncased",
            ],
            "pass a local model folder as --backbone",
        ),
    ],
    ids=["hub-task", "hub-backbone"],
)
def test_offline_is_one_quick_line(tmp_path, glue_dir, args, says):
    if _hub_reachable():
        pytest.skip("the Hugging Face hub is reachable from here")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))  # nothing cached locally
    args = [a.format(glue=glue_dir) for a in args]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "extract", *args,
         "--cache-root", str(tmp_path / "cache")],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    took = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and says in lines[0] and "not reachable" in lines[0]
    assert "Retry" not in proc.stderr
    assert took < 20, f"{took:.1f} s"
