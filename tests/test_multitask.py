"""Several tasks in one run: one shared side body, a head per task, task-mixed batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import apply_overrides
from stages.extract import extract
from stages.multitask import task_order, train_multitask_run
from stages.train_side import train_side
from tests.conftest import assert_one_task_run_is_the_single, make_config, strip_timing, tiny_bert

TRAIN = {
    "train_side.epochs": 2,
    "train_side.batch_size": 4,
    "train_side.warmup_steps": 2,
    "train_side.reduction_factors": [4],
    "train_side.init": "magnitude",
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, glue_dir, minilm_tokenizer):
    """float32 caches of RTE, MRPC and STS-B (regression) from one tiny BERT, magnitude
    side_init at r = 4; and under another root an MRPC cache of another tiny BERT of the same
    name (other weights)."""
    tmp = tmp_path_factory.mktemp("multitask")
    backbone = tiny_bert(minilm_tokenizer)
    common = {
        "backbone.name": backbone.name,
        "cache.dtype": "float32",
        "extract.side_init": ["magnitude"],
        "extract.reduction_factors": [4],
    }
    for task in ("rte", "mrpc", "stsb"):
        extract(
            make_config(tmp, glue_dir, **common, **{"task.name": task}),
            backbone=backbone,
            progress=False,
        )
    other = tmp / "other"
    for task, seed in (("rte", 0), ("mrpc", 1)):
        extract(
            make_config(other, glue_dir, **common, **{"task.name": task}),
            backbone=tiny_bert(minilm_tokenizer, seed=seed),
            progress=False,
        )
    return {"tmp": tmp, "other": other, "glue": glue_dir, "backbone": backbone.name}


def _cfg(c, tmp_path, tasks, **extra):
    cfg = make_config(c["tmp"], c["glue"], **{"task.name": tasks, "backbone.name": c["backbone"]})
    return apply_overrides(cfg, {**TRAIN, "train_side.run_dir": str(tmp_path / "runs"), **extra})


def test_two_tasks_train_one_body_and_a_head_each(caches, tmp_path):
    res = train_multitask_run(_cfg(caches, tmp_path, "rte,stsb"), progress=False)
    net = res.metrics["networks"]["r4-s0-lr0.003"]
    weights = load_file(str(res.folder / "r4-s0-lr0.003.best.safetensors"))
    heads = {k.split(".")[1] for k in weights if k.startswith("heads.")}
    assert heads == {"rte", "stsb"}
    assert weights["heads.rte.head_out.weight"].shape[0] == 2  # two labels
    assert weights["heads.stsb.head_out.weight"].shape[0] == 1  # regression
    body = [k for k in weights if k.startswith("body.")]
    assert body and not any(".up." in k or "head_" in k for k in body)  # one body, no head in it
    # every epoch: each task's metric on its validation split, and their average
    assert len(net["epochs"]) == 2
    for h in net["epochs"]:
        per = {t: v["validation"]["score"] for t, v in h["tasks"].items()}
        assert set(per) == {"rte", "stsb"} and "accuracy" in h["tasks"]["rte"]["validation"]
        assert "pearson" in h["tasks"]["stsb"]["validation"]
        assert h["validation"]["score"] == pytest.approx(np.mean(list(per.values())))
        assert all(np.isfinite(v["train_loss"]) for v in h["tasks"].values())
    averages = [h["validation"]["score"] for h in net["epochs"]]
    assert net["best_epoch"] == 1 + int(np.argmax(averages))
    assert net["best_validation"] == max(averages)
    # the test split of each task, scored with the best checkpoint, and their average
    test = net["test"]
    assert test["score"] == pytest.approx((test["rte"]["score"] + test["stsb"]["score"]) / 2)
    saved = json.loads((res.folder / "metrics.json").read_text())
    assert saved["tasks"]["stsb"]["metric"] == "pearson_spearman"
    assert saved["networks"]["r4-s0-lr0.003"]["test"] == test
    assert (res.folder / "training-curves.png").exists()


@pytest.mark.parametrize("class_weight", ["none", "balanced"])
def test_one_task_is_the_single_task_run(caches, tmp_path, class_weight):
    """The same seed, batches, init (the first head is the body's own) and RNG stream, dropout
    on: the multi-task code with one task trains the single-task network step for step (with
    balanced class weights: the task's head weighs its classes as the single-task network)."""
    extra = {"train_side.epochs": 3, "train_side.class_weight": class_weight}
    cfg = _cfg(caches, tmp_path, "rte", **extra)
    single = train_side(cfg, run_name="single", progress=False, echo=False)
    multi = train_multitask_run(cfg, run_name="multi", progress=False, echo=False)
    assert_one_task_run_is_the_single(single, multi, "rte")


def test_task_order_mixes_tasks_in_proportion_and_depends_on_seed_and_epoch():
    order = task_order({"rte": 3, "mrpc": 5}, seed=0, epoch=0)
    assert sorted(order) == sorted(["rte"] * 3 + ["mrpc"] * 5)
    assert order == task_order({"rte": 3, "mrpc": 5}, seed=0, epoch=0)
    others = [task_order({"rte": 3, "mrpc": 5}, seed=s, epoch=e) for s, e in ((0, 1), (1, 0))]
    assert any(o != order for o in others)
    assert task_order({"rte": 4}, seed=0, epoch=3) == ["rte"] * 4


def test_an_interrupted_epoch_resumes_to_the_uninterrupted_end(caches, tmp_path, monkeypatch):
    import stages.multitask as mt

    cfg = _cfg(caches, tmp_path, "rte,mrpc", **{"train_side.epochs": 3})
    full = train_multitask_run(cfg, run_name="full", progress=False, echo=False)
    real, calls = mt.train_step, {"n": 0}
    per_epoch = 6  # 12 + 12 training examples in batches of 4

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == per_epoch + 3:
            raise KeyboardInterrupt  # as a kill in the middle of epoch 2
        return real(*args, **kwargs)

    monkeypatch.setattr(mt, "train_step", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_multitask_run(cfg, run_name="cut", progress=False, echo=False)
    folder = tmp_path / "runs" / "cut"
    done = json.loads((folder / "metrics.json").read_text())["networks"]["r4-s0-lr0.003"]
    assert len(done["epochs"]) == 1 and "test" not in done
    monkeypatch.setattr(mt, "train_step", real)
    resumed = train_multitask_run(cfg, run_name="cut", progress=False, echo=False)
    assert strip_timing(resumed.metrics["networks"]) == strip_timing(full.metrics["networks"])


def _cli(caches, tmp_path, root, *args):
    from pipeline.cli import run_cli

    return run_cli(
        [
            "run", "train-side", "--data-dir", str(caches["glue"]), "--limit", "12",
            "--backbone", caches["backbone"], "--cache-root", str(root / "cache"),
            "--run-dir", str(tmp_path / "runs"), "--epochs", "1", "--batch-size", "4",
            "--reduction-factors", "4", "--init", "random", "--json", *args,
        ]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("tasks", "root", "message"),
    [
        ("rte,nope", "tmp", "unknown task 'nope'; allowed: cola"),
        ("rte,mrpc,rte", "tmp", "the task list repeats rte; list each task once"),
        ("rte,custom", "tmp", "'custom' trains alone"),
        ("rte,mrpc", "other", "come from different backbone; allowed: caches extracted with"),
        ("rte,cola", "tmp", "no committed cache of task 'cola'"),
    ],
)
def test_bad_task_lists_are_one_line_and_exit_2(caches, tmp_path, capsys, tasks, root, message):
    assert _cli(caches, tmp_path, caches[root], "--task", tasks) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("tasks", ["stsb", "rte,stsb"])
def test_class_weights_on_a_regression_task_are_one_line(caches, tmp_path, capsys, tasks):
    args = ["--task", tasks, "--class-weight", "balanced"]
    assert _cli(caches, tmp_path, caches["tmp"], *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = "class_weight 'balanced' on stsb (a regression task); allowed: 'none'"
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_the_cli_trains_a_task_list_and_extract_refuses_one(caches, tmp_path, capsys):
    from pipeline.cli import run_cli

    assert _cli(caches, tmp_path, caches["tmp"], "--task", "rte,mrpc") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"] == ["rte", "mrpc"] and set(out["caches"]) == {"rte", "mrpc"}
    net = out["networks"]["r4-s0-lr0.003"]
    assert set(net["tasks"]) == {"rte", "mrpc"} and net["test"]["score"] is not None
    assert net["tasks"]["mrpc"]["metric"] == "acc_f1"
    run = out["run"]
    assert run_cli(["predict", "--run", run, "a", "b"]) == 2  # which task: one line, no load
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predict takes one: --task rte or --task mrpc" in err[0], err
    args = ["run", "extract", "--task", "rte,mrpc", "--data-dir", str(caches["glue"])]
    assert run_cli([*args, "--cache-root", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run extract takes one task, got 'rte,mrpc'" in err[0], err
    assert not (tmp_path / "c").exists()


def test_pipeline_yaml_takes_a_task_list(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    f = tmp_path / "pipeline.yaml"
    f.write_text("task:\n  name: [rte, mrpc]\n")
    task = load_config(f).task
    assert task.name == "rte,mrpc" and task.names == ["rte", "mrpc"]
    f.write_text("task:\n  name: [rte, rte]\n")
    with pytest.raises(PipelineError, match="task.name: .*the task list repeats rte"):
        load_config(f)


def test_a_vl_task_and_a_text_task_train_one_body(
    tmp_path, glue_dir, minilm_tokenizer, monkeypatch, capsys
):
    """``--task easy-vqa,rte --vision-encoder``: the VL task's batches carry their visual tokens
    into the shared (visual) body, the text task's none; the VL task's cache is found without
    the glue folder that names the text task's data. evaluate scores each task as training did."""
    from ladder.multitask import MultiTaskSideNetwork
    from tests.test_vl import tiny_clip, write_vqa

    backbone, vision = tiny_bert(minilm_tokenizer), tiny_clip()
    vqa = write_vqa(tmp_path / "vqa")
    common = {
        "backbone.name": backbone.name,
        "cache.dtype": "float32",
        "extract.side_init": ["magnitude"],
        "extract.reduction_factors": [4],
    }
    vl = {"task.name": "easy-vqa", "backbone.vision": "tiny-clip"}
    extract(make_config(tmp_path, vqa, **common, **vl), backbone=backbone, vision=vision,
            progress=False)  # fmt: skip
    extract(make_config(tmp_path, glue_dir, **common), backbone=backbone, progress=False)
    cfg = _cfg(
        {"tmp": tmp_path, "glue": glue_dir, "backbone": backbone.name},
        tmp_path,
        "easy-vqa,rte",
        **{"backbone.vision": "tiny-clip"},
    )
    seen: list[tuple[str, bool]] = []
    real = MultiTaskSideNetwork.forward

    def spy(self, *a, **k):
        seen.append((self.task, k.get("visual") is not None))
        return real(self, *a, **k)

    MultiTaskSideNetwork.forward = spy  # type: ignore[method-assign]
    try:
        res = train_multitask_run(cfg, progress=False, echo=False)
    finally:
        MultiTaskSideNetwork.forward = real  # type: ignore[method-assign]
    assert {("easy-vqa", True), ("rte", False)} == set(seen)
    (net,) = res.metrics["networks"].values()
    assert set(net["test"]) >= {"easy-vqa", "rte", "score"}
    (name,) = res.metrics["networks"]
    saved = json.loads((res.folder / f"{name}.config.json").read_text())
    assert saved["visual"] == {"d": 32, "n_images": 1, "fusion": "ladder", "readout": "text"}
    weights = load_file(str(res.folder / f"{name}.best.safetensors"))
    assert "body.visual_proj.weight" in weights and "body.visual_gates" in weights
    # the visual standardisation: the VL task's training images, not the identity
    assert not torch.equal(weights["body.visual_std"], torch.ones(32))
    # evaluate: the VL task on its data (its cache's image features), the text task on the text
    import stages.evaluate
    from pipeline.cli import run_cli

    monkeypatch.setattr(stages.evaluate, "load_backbone", lambda *a, **k: backbone)
    monkeypatch.setattr(stages.evaluate, "load_vision_encoder", lambda *a, **k: vision)
    from stages.evaluate import Predictor

    p = Predictor(res.folder, task="easy-vqa")
    assert p.vision is vision and p.select("rte").vision is None  # the text task: text alone
    capsys.readouterr()
    for task, data in (("easy-vqa", vqa), ("rte", glue_dir)):
        args = ["--run", str(res.folder), "--task", task, "--data-dir", str(data), "--json"]
        assert run_cli(["evaluate", *args]) == 0, capsys.readouterr().err
        got = json.loads(capsys.readouterr().out)
        assert got.pop("split") == "test"
        _close(got, net["test"][task])


def test_a_one_image_task_and_nlvr2_train_one_body(tmp_path, minilm_tokenizer, monkeypatch, capsys):
    """``--task easy-vqa,nlvr2``: one body built for two images per example reads easy-VQA's
    batches (one image, image index 0) and NLVR2's (two); the saved network rebuilds with its
    token count per image, and evaluate scores each task as training did."""
    from ladder.vision import VisualSideNetwork
    from tests.test_vl import tiny_clip, write_vqa
    from tests.test_vl_data import write_nlvr2

    backbone, vision = tiny_bert(minilm_tokenizer), tiny_clip()
    data = {"easy-vqa": write_vqa(tmp_path / "vqa"), "nlvr2": write_nlvr2(tmp_path / "nlvr2")}
    common = {
        "backbone.name": backbone.name,
        "backbone.vision": "tiny-clip",
        "cache.dtype": "float32",
        "task.limit": None,
    }
    for task, folder in data.items():
        cfg = make_config(tmp_path, folder, **{**common, "task.name": task})
        extract(cfg, backbone=backbone, vision=vision, progress=False)
    cfg = make_config(tmp_path, data["nlvr2"], **{**common, "task.name": "easy-vqa,nlvr2"})
    cfg = apply_overrides(cfg, {**TRAIN, "train_side.init": "random",
                                "train_side.run_dir": str(tmp_path / "runs")})  # fmt: skip
    seen: set[int] = set()
    real = VisualSideNetwork.visual_tokens

    def spy(self, visual, drop):
        seen.add(visual.shape[1])
        return real(self, visual, drop)

    monkeypatch.setattr(VisualSideNetwork, "visual_tokens", spy)
    res = train_multitask_run(cfg, progress=False, echo=False)
    monkeypatch.undo()
    tokens = min(seen)
    assert seen == {tokens, 2 * tokens}
    (name,) = res.metrics["networks"]
    net = res.metrics["networks"][name]
    saved = json.loads((res.folder / f"{name}.config.json").read_text())
    assert saved["visual"]["n_images"] == 2 and saved["visual"]["tokens_per_image"] == tokens
    import stages.evaluate
    from pipeline.cli import run_cli

    monkeypatch.setattr(stages.evaluate, "load_backbone", lambda *a, **k: backbone)
    monkeypatch.setattr(stages.evaluate, "load_vision_encoder", lambda *a, **k: vision)
    capsys.readouterr()
    for task, folder in data.items():
        args = ["--run", str(res.folder), "--task", task, "--data-dir", str(folder), "--json"]
        assert run_cli(["evaluate", *args]) == 0, capsys.readouterr().err
        got = json.loads(capsys.readouterr().out)
        assert got.pop("split") == "test"
        _close(got, net["test"][task])


def test_a_vision_encoder_with_no_vl_task_is_one_line(caches, tmp_path, capsys):
    code = _cli(caches, tmp_path, caches["tmp"], "--task", "rte,mrpc",
                "--vision-encoder", "random-vit")  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "no task of rte,mrpc has images" in err[0], err


# --- evaluate and predict on a multi-task run ----------------------------------------------------


@pytest.fixture(scope="module")
def mt_run(caches, tmp_path_factory):
    """A finished rte,mrpc,stsb run (two heads of 2 labels, one regression head)."""
    cfg = _cfg(caches, tmp_path_factory.mktemp("mt-run"), "rte,mrpc,stsb")
    res = train_multitask_run(cfg, progress=False, echo=False)
    (name,) = res.metrics["networks"]
    net = res.metrics["networks"][name]
    best = next(h for h in net["epochs"] if h["epoch"] == net["best_epoch"])
    return {"folder": res.folder, "cfg": cfg, "name": name, "test": net["test"], "best": best}


@pytest.fixture
def live_bert(monkeypatch, minilm_tokenizer):
    """evaluate and predict run the tiny BERT the caches were extracted with (same seed)."""
    import stages.evaluate

    backbone = tiny_bert(minilm_tokenizer)
    monkeypatch.setattr(stages.evaluate, "load_backbone", lambda *a, **k: backbone)


def _close(got: dict, want: dict) -> None:
    """Equal to 1e-4 (relative, and absolute in points): the live backbone batches otherwise than
    extraction did, so the states differ in their last bits, and a continuous figure of a tiny
    network (STS-B's Pearson) moves in its 5th or 6th digit; accuracies are exact. A wrong head
    or wrong weights move the figures by whole points."""
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, dict):
            _close(got[k], v)
        else:
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-4), k


def test_evaluate_a_multitask_run_reproduces_its_metrics(mt_run, live_bert, capsys):
    """Live backbone + the rebuilt network (body, each task's head) scores every task as training
    did from the float32 caches: test at the end, validation at the best epoch."""
    from pipeline.cli import run_cli

    run = str(mt_run["folder"])
    capsys.readouterr()
    assert run_cli(["evaluate", "--run", run, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got.pop("split") == "test"
    _close(got, mt_run["test"])  # rte, mrpc, stsb and their average, as metrics.json has them
    assert run_cli(["evaluate", "--run", run, "--split", "validation", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got.pop("split") == "validation"
    want = {t: v["validation"] for t, v in mt_run["best"]["tasks"].items()}
    _close(got, {**want, "score": mt_run["best"]["validation"]["score"]})
    assert run_cli(["evaluate", "--run", run, "--task", "stsb", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)  # one task: the single-task shape
    assert got.pop("split") == "test"
    _close(got, mt_run["test"]["stsb"])
    assert run_cli(["evaluate", "--run", run]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["rte", "mrpc", "stsb", "average"]


def test_predict_a_task_of_a_multitask_run(mt_run, live_bert, capsys):
    """Each task's predictions come from its own head: its logits are the ones the run's
    evaluation computes from the task's cache, the predicted labels their argmax, and their
    accuracy on the validation split the one recorded at the best epoch."""
    from pipeline.cli import run_cli
    from stages.evaluate import Predictor
    from stages.multitask import cached_task_outputs
    from stages.tasks import load_task_of

    p = Predictor(mt_run["folder"], task="mrpc")
    assert p.tasks == ["rte", "mrpc", "stsb"] and p.spec.name == "mrpc"
    for task in p.tasks:
        examples = load_task_of(p.select(task).task).splits["validation"]
        logits = p.outputs(examples)
        want = cached_task_outputs(
            mt_run["cfg"], mt_run["folder"], mt_run["name"], task, "validation"
        )
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
        preds = p.predict(examples)
        if task == "stsb":
            assert np.array_equal(preds, logits.squeeze(-1).numpy())
            continue
        assert np.array_equal(preds, logits.argmax(-1).numpy())
        labels = np.asarray([ex.label for ex in examples])
        recorded = mt_run["best"]["tasks"][task]["validation"]["accuracy"]
        assert 100 * float(np.mean(preds == labels)) == pytest.approx(recorded, abs=1e-6)
    capsys.readouterr()
    pair = ["A cat sat on the mat.", "A cat sat."]
    args = ["predict", "--run", str(mt_run["folder"]), "--task", "stsb", "--json", *pair]
    assert run_cli(args) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["task"] == "stsb" and row["score"] == pytest.approx(
        float(row["prediction"]), abs=1e-3
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["predict", "a", "b"],
            "trained several tasks; predict takes one: --task rte or --task mrpc or --task stsb",
        ),
        (
            ["predict", "--task", "cola", "a", "b"],
            "did not train task 'cola'; allowed: rte, mrpc, stsb",
        ),
        (["evaluate", "--task", "cola"], "did not train task 'cola'; allowed: rte, mrpc, stsb"),
    ],
)
def test_a_missing_or_untrained_task_is_one_line(mt_run, capsys, args, message):
    from pipeline.cli import run_cli

    code = run_cli([args[0], "--run", str(mt_run["folder"]), *args[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_checkpoint_that_does_not_fit_its_config_is_one_line(mt_run, live_bert, tmp_path):
    """Strict loading: a config naming fewer tasks than the weights hold is refused, not loaded
    partially."""
    import shutil

    from stages.errors import StageError
    from stages.evaluate import Predictor

    folder = tmp_path / "run"
    shutil.copytree(mt_run["folder"], folder)
    (config,) = folder.glob("*.config.json")
    saved = json.loads(config.read_text())
    del saved["tasks"]["stsb"]
    config.write_text(json.dumps(saved))
    with pytest.raises(StageError, match=r"does not fit .*unexpected heads\.stsb\."):
        Predictor(folder, task="rte")


def test_a_saved_multi_task_body_is_rebuilt_with_its_visual_readout():
    from transformers import BertConfig

    from stages.multitask import saved_network

    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    saved = {
        "side": {"reduction_factor": 4},
        "tasks": {"easy-vqa": {"num_labels": 13}, "sst2": {"num_labels": 2}},
        "visual": {"d": 24, "n_images": 1, "fusion": "ladder", "readout": "text+visual"},
    }
    net = saved_network(cfg, saved)
    assert net.body.visual_readout == "text+visual" and hasattr(net.body, "readout_out")
    del saved["visual"]["readout"]  # saved before the option: the text token alone
    assert saved_network(cfg, saved).body.visual_readout == "text"
