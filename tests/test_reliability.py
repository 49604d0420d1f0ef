"""Stage two keeps the README's promises: a kill anywhere loses nothing, bad input is one line.

Real caches (a tiny random BERT, or the packaged MiniLM where the live backbone is needed) built
from the real GLUE files; faults are injected from the test side at deterministic points.
"""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

from pipeline.config import apply_overrides
from stages.errors import StageError
from stages.extract import extract
from tests.conftest import make_config, strip_timing, tiny_bert


class Killed(BaseException):
    """Stands for kill -9 at a chosen point: nothing after it runs (not even ``except Exception``)."""


def _errors(stderr: str) -> list[str]:
    """stderr's lines but the per-epoch progress lines (stderr with --json)."""
    return [ln for ln in stderr.strip().splitlines() if not ln.startswith("epoch ")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, glue_dir, minilm_tokenizer):
    """A float32 cache of RTE (8 examples a split) from a tiny random BERT; configs to train on it."""
    tmp = tmp_path_factory.mktemp("tiny")
    backbone = tiny_bert(minilm_tokenizer)
    cfg = make_config(tmp, glue_dir, **{"cache.dtype": "float32", "task.limit": 8})
    cfg = apply_overrides(
        cfg,
        {
            "backbone.name": backbone.name,
            "train_side.init": "random",
            "train_side.epochs": 3,
            "train_side.batch_size": 4,
            "train_side.warmup_steps": 2,
            "train_side.reduction_factors": [4],
            "train_side.seeds": [0, 1],
            "train_side.ladder_dropout": 0.3,  # the RNG matters
        },
    )
    key = extract(cfg, backbone=backbone, progress=False).key
    return {"cfg": cfg, "key": key, "tmp": tmp, "backbone": backbone}


def _cfg(tiny, tmp_path, **over):
    return apply_overrides(tiny["cfg"], {"train_side.run_dir": str(tmp_path / "runs"), **over})


def _cli_args(tiny, tmp_path, *extra):
    return [
        "run", "train-side", "--task", "rte", "--backbone", tiny["backbone"].name,
        "--cache-root", tiny["cfg"].cache.root, "--cache-key", tiny["key"], "--init", "random",
        "--epochs", "3", "--batch-size", "4", "--warmup-steps", "2", "--reduction-factors", "4",
        "--seeds", "0,1", "--ladder-dropout", "0.3", "--run-dir", str(tmp_path / "runs"), *extra,
    ]  # fmt: skip


def _metrics(folder):
    return strip_timing(json.loads((folder / "metrics.json").read_text()))


def _kill_at(monkeypatch, net: str, epoch: int, before: bool = True, symlink_full: bool = False):
    """Stop the run when ``save_checkpoint`` is called for ``net`` after 0-based ``epoch``.

    ``before``: the kill comes before that checkpoint is written; ``symlink_full``: instead of a
    kill, the checkpoint's temporary file is a link to /dev/full, so writing it fails with a
    real ENOSPC.
    """
    import stages.train_side as ts_mod

    real = ts_mod.save_checkpoint

    def save(folder, ts, ep):
        if ts.trial.name == net and ep == epoch:
            if symlink_full:
                path = folder / "checkpoints" / f".{ts.trial.name}.last.pt.tmp"
                path.parent.mkdir(exist_ok=True)
                os.symlink("/dev/full", path)
                return real(folder, ts, ep)
            if before:
                raise Killed
            real(folder, ts, ep)
            raise Killed
        return real(folder, ts, ep)

    monkeypatch.setattr(ts_mod, "save_checkpoint", save)


# --- 3: several networks resume each from its own epoch, on its own RNG ---------------------------


def test_a_kill_between_two_networks_checkpoints_resumes_to_the_same_figures(
    tiny, tmp_path, monkeypatch
):
    from stages.train_side import train_side

    cfg = _cfg(tiny, tmp_path)
    full = train_side(cfg, run_name="full", progress=False)
    # epoch 2 of 3: the first network's checkpoint is written, the second's is not
    _kill_at(monkeypatch, "r4-s1-lr0.003", epoch=1)
    with pytest.raises(Killed):
        train_side(cfg, run_name="killed", progress=False)
    monkeypatch.undo()
    folder = tmp_path / "runs" / "killed"
    import torch

    done = {
        p.name: torch.load(p, weights_only=False)["epoch"]
        for p in (folder / "checkpoints").glob("*.last.pt")
    }
    assert done == {"r4-s0-lr0.003.last.pt": 1, "r4-s1-lr0.003.last.pt": 0}
    resumed = train_side(cfg, run_name="killed", progress=False)
    assert _metrics(resumed.folder) == _metrics(full.folder)
    for name in ("r4-s0-lr0.003", "r4-s1-lr0.003"):
        a = (full.folder / f"{name}.best.safetensors").read_bytes()
        assert (folder / f"{name}.best.safetensors").read_bytes() == a


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_the_rerun_ends_the_same(
    tiny, tmp_path, monkeypatch, capsys
):
    from pipeline.cli import run_cli

    assert run_cli(_cli_args(tiny, tmp_path, "--run-name", "full", "--json")) == 0
    capsys.readouterr()
    _kill_at(monkeypatch, "r4-s1-lr0.003", epoch=1, symlink_full=True)
    args = _cli_args(tiny, tmp_path, "--run-name", "full-disk", "--json")
    assert run_cli(args) == 2
    err = _errors(capsys.readouterr().err)
    folder = tmp_path / "runs" / "full-disk"
    assert len(err) == 1 and err[0].startswith("error: no space left"), err
    assert str(folder) in err[0] and "run the same command again to resume" in err[0]
    monkeypatch.undo()
    assert not list((folder / "checkpoints").glob(".*tmp"))  # nothing half-written left
    assert run_cli(args) == 0
    assert _metrics(folder) == _metrics(tmp_path / "runs" / "full")


# --- 8: every run-folder file is written whole: temporary name, fsync, rename ---------------------


def test_every_run_folder_file_is_written_to_a_temporary_name_synced_and_renamed(
    tiny, tmp_path, monkeypatch
):
    from stages.train_side import train_side

    synced, renamed = set(), {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        renamed[os.path.realpath(dst)] = os.path.realpath(src)
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    result = train_side(_cfg(tiny, tmp_path, **{"train_side.epochs": 1}), progress=False)
    monkeypatch.undo()
    files = [p for p in result.folder.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {
        "run.json", "config.json", "metrics.json", "training-curves.png",
        "r4-s0-lr0.003.best.safetensors", "r4-s0-lr0.003.config.json", "r4-s0-lr0.003.last.pt",
    }  # fmt: skip
    for p in files:
        path = os.path.realpath(p)
        assert path in renamed, f"{p.name} was written in place"
        assert renamed[path] in synced, f"{p.name} was renamed without an fsync"


# --- 4: no secret in run folders ----------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, glue_dir):
    """A float32 MiniLM cache of RTE (8 examples a split): predict/evaluate need a real backbone."""
    from pipeline.cli import run_cli

    tmp = tmp_path_factory.mktemp("minilm")
    root = tmp / "cache"
    args = ["run", "extract", "--task", "rte", "--data-dir", str(glue_dir), "--limit", "8"]
    args += ["--cache-root", str(root), "--dtype", "float32", "--side-init", "", "--json"]
    assert run_cli(args) == 0
    return {"root": root, "key": next(p.name for p in root.iterdir() if p.is_dir())}


SECRETS = ["AKIA-not-a-real-key", "s3cr3t-value", "session-t0ken", "pa55word"]


def _minilm_args(minilm, tmp_path):
    """train-side on the MiniLM cache, with credentials in the config file's storage_options."""
    config = tmp_path / "pipeline.yaml"
    options = {
        "key": SECRETS[0],
        "secret": SECRETS[1],
        "client_kwargs": {"aws_session_token": SECRETS[2]},
        "Password": SECRETS[3],
    }
    config.write_text(json.dumps({"cache": {"storage_options": options}}))
    return [
        "run", "train-side", "--config", str(config), "--task", "rte", "--cache-root",
        str(minilm["root"]), "--epochs", "2", "--batch-size", "4", "--init", "random",
        "--run-dir", str(tmp_path / "runs"), "--run-name", "r", "--json",
    ]  # fmt: skip


def _predict_evaluate(folder, glue_dir):
    predict = ["predict", "--run", str(folder), "A cat sat on the mat.", "A cat sat."]
    evaluate = ["evaluate", "--run", str(folder), "--split", "test", "--limit", "8", "--json"]
    return predict, [*evaluate, "--data-dir", str(glue_dir)]


def test_secrets_stay_out_of_run_folders(minilm, tmp_path, glue_dir, capsys):
    from pipeline.cli import run_cli

    runs, folder = tmp_path / "runs", tmp_path / "runs" / "r"
    assert run_cli(_minilm_args(minilm, tmp_path)) == 0
    out = capsys.readouterr().out
    saved = json.loads((folder / "config.json").read_text())["cache"]["storage_options"]
    assert saved == {
        "key": "***",
        "secret": "***",
        "client_kwargs": {"aws_session_token": "***"},
        "Password": "***",
    }
    for p in [*folder.rglob("*"), *runs.iterdir()]:
        if p.is_file():
            data = p.read_bytes()
            assert not any(s.encode() in data for s in SECRETS), p
    assert not any(s in out for s in SECRETS)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    predict, evaluate = _predict_evaluate(folder, glue_dir)
    assert run_cli(evaluate) == 0  # evaluate and predict need no secret
    assert run_cli([*predict, "--json"]) == 0


def test_predict_and_evaluate_refuse_an_unfinished_run(
    minilm, tmp_path, glue_dir, monkeypatch, capsys
):
    import stages.train_side as ts_mod
    from pipeline.cli import run_cli

    args = _minilm_args(minilm, tmp_path)
    folder = tmp_path / "runs" / "r"
    real = ts_mod._write_metrics

    def write_metrics(*a, **k):  # killed once the first epoch is recorded: 1 of 2 epochs
        real(*a, **k)
        raise Killed

    monkeypatch.setattr(ts_mod, "_write_metrics", write_metrics)
    with pytest.raises(Killed):
        run_cli(args)
    monkeypatch.undo()
    capsys.readouterr()
    predict, evaluate = _predict_evaluate(folder, glue_dir)
    assert run_cli(predict) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unfinished" in err[0] and "--allow-unfinished" in err[0], err
    assert "1 of 2 epochs" in err[0]
    assert run_cli(evaluate) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unfinished" in err[0], err
    assert run_cli([*predict, "--allow-unfinished"]) == 0
    assert run_cli([*evaluate, "--allow-unfinished"]) == 0
    assert run_cli(args) == 0  # finishes the run; then it is answered without the flag
    assert run_cli(predict) == 0


# --- 6: silent nonsense -------------------------------------------------------------------------


@pytest.mark.parametrize("empty", ["", "   ", "missing"])
def test_an_empty_or_missing_label_in_a_custom_file_names_the_file_and_row(tmp_path, empty):
    from stages.tasks import TaskConfig, load_task_of

    train, val = tmp_path / "train.jsonl", tmp_path / "validation.csv"
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cell = "" if empty == "missing" else empty
    val.write_text(f"text,label\nfine,pos\nmeh,{cell}\n")
    if empty == "missing":  # a JSON record without the label
        val = tmp_path / "validation.jsonl"
        val.write_text('{"text": "fine", "label": "pos"}\n{"text": "meh"}\n')
    cfg = TaskConfig(name="custom", files={"train": str(train), "validation": str(val)})
    cfg = cfg.model_copy(update={"text_columns": ["text"]})
    with pytest.raises(StageError, match=rf"{val}: data row 2 has (an empty|no) label"):
        load_task_of(cfg)


def test_a_non_finite_loss_stops_that_network_and_the_exit_status_says_so(tiny, tmp_path, capsys):
    from pipeline.cli import run_cli

    args = _cli_args(tiny, tmp_path, "--learning-rates", "1e30,3e-3", "--seeds", "0", "--json")
    assert run_cli(args) == 1
    cap = capsys.readouterr()
    err = _errors(cap.err)
    assert len(err) == 1 and err[0].startswith("error: network r4-s0-lr1e+30"), err
    assert re.search(r"^epoch 2/3  r4-s0-lr1e\+30  stopped: training loss became", cap.err, re.M)
    assert "training loss became" in err[0]
    out = json.loads(cap.out)
    metrics = json.loads(
        (tmp_path / "runs" / os.path.basename(out["run"]) / "metrics.json").read_text()
    )
    bad, good = metrics["networks"]["r4-s0-lr1e+30"], metrics["networks"]["r4-s0-lr0.003"]
    assert "training loss became" in bad["stopped"] and "test" not in bad
    assert "stopped" not in good and len(good["epochs"]) == 3 and "accuracy" in good["test"]


def test_without_a_key_the_cache_that_matches_every_given_input_is_used(
    tiny, tmp_path, glue_dir, minilm_tokenizer
):
    from stages.train_side import resolve_cache

    # two caches of the same task and backbone; the newer one from fewer examples
    root = str(tmp_path / "cache")
    cfg8 = _cfg(tiny, tmp_path, **{"cache.root": root})
    key8 = extract(cfg8, backbone=tiny["backbone"], progress=False).key
    cfg4 = apply_overrides(cfg8, {"task.limit": 4})
    key4 = extract(cfg4, backbone=tiny["backbone"], progress=False).key
    assert key4 != key8
    assert resolve_cache(cfg8, None).key == key8
    assert resolve_cache(cfg4, None).key == key4
    with pytest.raises(StageError, match=r"differs in train split size \(\d examples, asked 6\)"):
        resolve_cache(apply_overrides(cfg8, {"task.limit": 6}), None)
    with pytest.raises(StageError, match=r"differs in max length \(128, asked 64\)"):
        resolve_cache(apply_overrides(cfg8, {"backbone.max_length": 64}), None)
    # no data folder (the hub, not loaded offline): --limit alone still rules out larger caches
    hub = cfg8.model_copy(update={"task": cfg8.task.model_copy(update={"data_dir": None})})
    hub4 = hub.model_copy(update={"task": hub.task.model_copy(update={"limit": 4})})
    assert resolve_cache(hub4, None).key == key4
    hub2 = hub.model_copy(update={"task": hub.task.model_copy(update={"limit": 2})})
    with pytest.raises(StageError, match=r"split size \(4 examples, asked at most 2\)"):
        resolve_cache(hub2, None)


def test_the_cli_and_the_files_number_the_best_epoch_alike(tiny, tmp_path, capsys):
    from pipeline.cli import run_cli

    assert run_cli(_cli_args(tiny, tmp_path, "--seeds", "0")) == 0
    out = capsys.readouterr().out
    folder = next((tmp_path / "runs").iterdir())
    net = json.loads((folder / "metrics.json").read_text())["networks"]["r4-s0-lr0.003"]
    assert [h["epoch"] for h in net["epochs"]] == [1, 2, 3]  # from 1, as the CLI counts
    assert f"best epoch {net['best_epoch']}," in out
    assert (
        json.loads((folder / "r4-s0-lr0.003.config.json").read_text())["epoch"] == net["best_epoch"]
    )
    best = max(net["epochs"], key=lambda h: h["validation"]["score"])
    assert net["best_epoch"] == best["epoch"]


# --- 7: one line instead of a traceback ----------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--seeds", "", "--seeds is empty"),
        ("--learning-rates", "", "--learning-rates is empty"),
        ("--reduction-factors", "", "--reduction-factors is empty"),
        ("--learning-rates", "nan", "must be finite numbers greater than 0"),
        ("--learning-rates", "inf", "must be finite numbers greater than 0"),
        ("--learning-rates", "-1e-3", "must be finite numbers greater than 0"),
        ("--learning-rates", "0", "must be finite numbers greater than 0"),
        ("--seeds", "0,x", "--seeds: expected comma-separated integers"),
    ],
)
def test_bad_grid_options_are_one_line_naming_the_option(
    tiny, tmp_path, capsys, option, value, message
):
    from pipeline.cli import run_cli

    assert run_cli([*_cli_args(tiny, tmp_path), option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert option in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train_side.seeds", [], "train_side.seeds: Value error, the list is empty"),
        ("train_side.learning_rates", [float("nan")], "finite numbers greater than 0"),
        ("train_side.learning_rates", [0.0], "finite numbers greater than 0"),
        ("train_side.reduction_factors", [0], "positive integers"),
    ],
)
def test_bad_grid_values_in_the_config_name_the_key(tiny, key, value, message):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=message) as e:
        apply_overrides(tiny["cfg"], {key: value})
    assert key in str(e.value)


@pytest.mark.parametrize("victim", ["config.json", "r4-s0-lr0.003.best.safetensors"])
def test_a_truncated_run_file_under_predict_is_one_line_naming_it(tiny, tmp_path, capsys, victim):
    from pipeline.cli import run_cli

    assert run_cli(_cli_args(tiny, tmp_path, "--seeds", "0", "--epochs", "1")) == 0
    folder = next((tmp_path / "runs").iterdir())
    path = folder / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    assert run_cli(["predict", "--run", str(folder), "A cat sat on the mat.", "A cat sat."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}") and "truncated" in err[0], err


def test_a_cache_removed_during_training_is_one_line_and_the_checkpoints_are_kept(
    tiny, tmp_path, glue_dir, monkeypatch
):
    import stages.train_side as ts_mod
    from cache_store.registry import remove_cache

    # a cache of its own, removed right after training, before the test split is read
    cfg = _cfg(tiny, tmp_path, **{"cache.root": str(tmp_path / "cache"), "train_side.seeds": [0]})
    key = extract(cfg, backbone=tiny["backbone"], progress=False).key
    real = ts_mod.load_file

    def load_file(path):
        if os.path.isdir(tmp_path / "cache" / key):
            remove_cache(str(tmp_path / "cache"), key)
        return real(path)

    monkeypatch.setattr(ts_mod, "load_file", load_file)
    with pytest.raises(StageError, match=rf"cache {key} disappeared .* checkpoints in .* are kept"):
        ts_mod.train_side(cfg, cache_key=key, run_name="gone", progress=False)
    folder = tmp_path / "runs" / "gone"
    assert (folder / "checkpoints" / "r4-s0-lr0.003.last.pt").exists()
    assert (folder / "r4-s0-lr0.003.best.safetensors").exists()
    assert (
        "test" not in json.loads((folder / "metrics.json").read_text())["networks"]["r4-s0-lr0.003"]
    )
