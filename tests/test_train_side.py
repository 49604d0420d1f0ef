"""Stage two: from the cache alone, the same trajectory as online LST, resumable, with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.config import apply_overrides
from stages.extract import extract
from stages.train_side import train_side
from tests.conftest import REPO, make_config, tiny_bert, tiny_llama, tiny_t5


def _trainable(cfg):
    return apply_overrides(
        cfg,
        {
            "train_side.epochs": 2,
            "train_side.batch_size": 4,
            "train_side.warmup_steps": 2,
            "train_side.reduction_factors": [2, 4],
            "train_side.init": "magnitude",
            "extract.side_init": ["magnitude"],
            "extract.reduction_factors": [2, 4],
        },
    )


def _last_params(folder, name):
    return torch.load(folder / "checkpoints" / f"{name}.last.pt", weights_only=False)["net"]


@pytest.mark.parametrize(
    "family",
    ["bert", "bert-stacked", pytest.param("bert-compiled", marks=pytest.mark.slow), "t5", "llama"],
)
def test_cache_and_online_lst_follow_the_same_trajectory(
    tmp_path, glue_dir, minilm_tokenizer, family
):
    """float32 cache vs the live backbone (dropout off), same seed and batches: same losses and
    weights; ``bert-stacked``: two seeds per r, trained as stacked groups in both modes;
    ``bert-compiled``: each network's forward and loss compiled (inductor) in both modes."""
    tiny = {"bert": tiny_bert, "t5": tiny_t5, "llama": tiny_llama}[family.split("-")[0]]
    backbone = tiny(minilm_tokenizer)
    cfg = _trainable(
        make_config(tmp_path, glue_dir, **{"cache.dtype": "float32", "task.limit": 12})
    )
    cfg = apply_overrides(
        cfg, {"backbone.name": backbone.name, "train_side.run_dir": str(tmp_path / "runs")}
    )
    stacked = family.endswith("stacked")
    if stacked:
        cfg = apply_overrides(cfg, {"train_side.batched": "on", "train_side.seeds": [0, 1]})
    compiled = family.endswith("compiled")
    if compiled:  # one network: compiling is most of this case's time
        cfg = apply_overrides(
            cfg, {"train_side.compile": "on", "train_side.reduction_factors": [2]}
        )
    extract(cfg, backbone=backbone, progress=False)
    cached = train_side(cfg, run_name="cached", progress=False)
    online = train_side(
        cfg, run_name="online", online=backbone, online_dropout=False, progress=False
    )
    names = {"r2-s0-lr0.003"} if compiled else {"r2-s0-lr0.003", "r4-s0-lr0.003"}
    names |= {"r2-s1-lr0.003", "r4-s1-lr0.003"} if stacked else set()
    assert set(cached.metrics["networks"]) == names
    if compiled:
        assert all("compile_s" in n for n in cached.metrics["networks"].values())
    for name, c in cached.metrics["networks"].items():
        o = online.metrics["networks"][name]
        c_loss = [h["train_loss"] for h in c["epochs"]]
        o_loss = [h["train_loss"] for h in o["epochs"]]
        assert len(c_loss) == 2
        torch.testing.assert_close(torch.tensor(c_loss), torch.tensor(o_loss), rtol=1e-5, atol=0)
        assert c["test"] == o["test"]
        pc, po = _last_params(cached.folder, name), _last_params(online.folder, name)
        assert pc.keys() == po.keys()
        for k in pc:
            torch.testing.assert_close(pc[k], po[k], rtol=1e-4, atol=1e-6, msg=k)
    # training moved the weights: the comparison above is not between two untouched inits
    first = train_side(
        apply_overrides(cfg, {"train_side.epochs": 1}), run_name="one", progress=False
    )
    moved = _last_params(first.folder, "r2-s0-lr0.003")
    assert any(
        not torch.equal(moved[k], _last_params(cached.folder, "r2-s0-lr0.003")[k]) for k in moved
    )


def test_online_dropout_changes_the_trajectory(tmp_path, glue_dir, minilm_tokenizer):
    backbone = tiny_bert(minilm_tokenizer)  # BertConfig's dropout defaults: 0.1
    cfg = _trainable(
        make_config(tmp_path, glue_dir, **{"cache.dtype": "float32", "task.limit": 12})
    )
    cfg = apply_overrides(
        cfg, {"backbone.name": backbone.name, "train_side.run_dir": str(tmp_path / "runs")}
    )
    extract(cfg, backbone=backbone, progress=False)
    a = train_side(cfg, run_name="a", online=backbone, online_dropout=False, progress=False)
    b = train_side(cfg, run_name="b", online=backbone, online_dropout=True, progress=False)
    name = "r2-s0-lr0.003"
    la = [h["train_loss"] for h in a.metrics["networks"][name]["epochs"]]
    lb = [h["train_loss"] for h in b.metrics["networks"][name]["epochs"]]
    assert la != lb


@pytest.fixture(scope="module")
def minilm_cache(tmp_path_factory, glue_dir):
    """A real MiniLM cache of RTE made with a *copy* of the backbone, which is then deleted."""
    from ladder.backbones import packaged_minilm
    from pipeline.cli import run_cli

    tmp = tmp_path_factory.mktemp("minilm")
    copy = tmp / "minilm-copy"
    shutil.copytree(packaged_minilm(), copy)
    root = tmp / "cache"
    args = ["run", "extract", "--task", "rte", "--data-dir", str(glue_dir), "--limit", "24"]
    args += ["--backbone", str(copy), "--cache-root", str(root), "--json"]
    args += ["--side-init-factors", "8", "--side-init", "magnitude,fisher", "--fisher-samples", "8"]
    assert run_cli(args) == 0
    shutil.rmtree(copy)
    key = next(p.name for p in root.iterdir() if p.is_dir())
    return {"root": root, "backbone": str(copy), "key": key, "tmp": tmp}


def _train_args(c, *extra):
    return [
        "run", "train-side", "--task", "rte", "--backbone", c["backbone"], "--cache-root", str(c["root"]),
        "--epochs", "3", "--batch-size", "8", "--warmup-steps", "2", "--reduction-factors", "8", *extra,
    ]  # fmt: skip


def test_train_side_from_the_cache_after_the_backbone_was_deleted(minilm_cache, tmp_path, capsys):
    from pipeline.cli import run_cli

    assert not os.path.exists(minilm_cache["backbone"])
    args = _train_args(minilm_cache, "--run-dir", str(tmp_path), "--json", "--seeds", "0,1")
    assert run_cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cache"] == minilm_cache["key"]
    assert set(out["networks"]) == {"r8-s0-lr0.003", "r8-s1-lr0.003"}
    folder = tmp_path / os.path.basename(out["run"])
    metrics = json.loads((folder / "metrics.json").read_text())
    for net in metrics["networks"].values():
        assert len(net["epochs"]) == 3 and 0 <= net["test"]["accuracy"] <= 100
        assert net["trainable_parameters"] > 0
    assert (folder / "training-curves.png").stat().st_size > 10_000
    assert (folder / "r8-s0-lr0.003.best.safetensors").exists()
    assert (folder / "run.json").exists() and (folder / "config.json").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_final_metrics(minilm_cache, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = "from pipeline.cli import main; main()"
    full = subprocess.run(
        [sys.executable, "-c", code, *_train_args(minilm_cache, "--run-dir", str(tmp_path / "a"), "--json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert full.returncode == 0, full.stderr
    args = _train_args(minilm_cache, "--run-dir", str(tmp_path / "b"), "--json")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not list((tmp_path / "b").glob("*/checkpoints/*.last.pt")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "finished before it could be killed"
    folder = next((tmp_path / "b").iterdir())
    done = torch.load(next(folder.glob("checkpoints/*.last.pt")), weights_only=False)["epoch"]
    assert done < 2, "the kill came after the last epoch"
    resumed = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads(next((tmp_path / "a").glob("*/metrics.json")).read_text())
    b = json.loads((folder / "metrics.json").read_text())
    for name, net in a["networks"].items():
        assert b["networks"][name]["test"] == net["test"]
        assert [h["train_loss"] for h in b["networks"][name]["epochs"]] == [
            h["train_loss"] for h in net["epochs"]
        ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reduction-factors", "5"], "does not divide"),
        (["--kept-layers", "1,6"], "6"),
        (["--task", "sst2"], "holds task 'rte'"),
        (
            ["--init", "fisher", "--reduction-factors", "4"],
            "has no fisher side_init for reduction factor 4",
        ),
    ],
)
def test_bad_train_side_input_is_one_line_and_exit_2(
    minilm_cache, tmp_path, capsys, extra, message
):
    from pipeline.cli import run_cli

    args = _train_args(
        minilm_cache, "--run-dir", str(tmp_path), "--cache-key", minilm_cache["key"], *extra
    )
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not any(tmp_path.glob("*/checkpoints"))


def test_a_cache_lacking_a_kept_layer_is_refused(tmp_path, glue_dir, minilm_tokenizer):
    from cache_store.errors import CacheError

    backbone = tiny_bert(minilm_tokenizer)
    cfg = make_config(tmp_path, glue_dir, **{"extract.layers": [0, 1, 2], "task.limit": 6})
    cfg = apply_overrides(
        cfg,
        {
            "backbone.name": backbone.name,
            "train_side.init": "random",
            "train_side.run_dir": str(tmp_path / "runs"),
        },
    )
    extract(cfg, backbone=backbone, progress=False)
    with pytest.raises(
        CacheError, match=r"lacks layer state 3 \(enc\) that the side network keeps"
    ):
        train_side(apply_overrides(cfg, {"train_side.kept_layers": [0, 2]}), progress=False)


def test_a_run_folder_of_another_configuration_is_not_overwritten(minilm_cache, tmp_path, capsys):
    from pipeline.cli import run_cli

    base = _train_args(
        minilm_cache, "--run-dir", str(tmp_path), "--run-name", "mine", "--epochs", "1"
    )
    assert run_cli(base) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir() if p.is_file()}
    capsys.readouterr()
    assert run_cli([*base, "--learning-rates", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "run folder" in err and "belongs to another configuration" in err
    after = {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir() if p.is_file()}
    assert after == before


def test_predict_and_evaluate_run_the_live_backbone_like_the_cache(tmp_path, glue_dir, capsys):
    """evaluate (live backbone + side network) reproduces train-side's test figures from a float32 cache."""
    from pipeline.cli import run_cli

    root, runs = tmp_path / "cache", tmp_path / "runs"
    common = [
        "--task",
        "rte",
        "--data-dir",
        str(glue_dir),
        "--limit",
        "16",
        "--cache-root",
        str(root),
    ]
    extract_args = ["--dtype", "float32", "--side-init-factors", "8", "--side-init", "magnitude"]
    assert run_cli(["run", "extract", *common, *extract_args, "--json"]) == 0
    train = [
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--init",
        "magnitude",
        "--run-dir",
        str(runs),
        "--json",
    ]
    assert run_cli(["run", "train-side", *common, *train]) == 0
    folder = next(runs.iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())["networks"]["r8-s0-lr0.003"]["test"]
    capsys.readouterr()
    assert (
        run_cli(["evaluate", "--run", str(folder), "--split", "test", "--limit", "16", "--json"])
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    assert got["accuracy"] == pytest.approx(metrics["accuracy"])
    assert (
        run_cli(["predict", "--run", str(folder), "--json", "A cat sat on the mat.", "A cat sat."])
        == 0
    )
    pred = json.loads(capsys.readouterr().out)
    assert pred["prediction"] in ("entailment", "not_entailment")
    assert run_cli(["predict", "--run", str(folder), "only one text"]) == 2
    assert "takes 2 text(s)" in capsys.readouterr().err
