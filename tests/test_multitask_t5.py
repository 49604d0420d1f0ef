"""Task lists with a T5 backbone: every task is text to text, so the tasks share the whole T5 side
network (no head per task): VQA scored on its candidate answers, captioning on its captions, a
GLUE task on its label strings, with the VL tasks' visual tokens in the side encoder only.

A tiny random T5 (the MiniLM tokenizer) and a tiny random CLIP, on the small easy-VQA and
Karpathy-format COCO folders the VL tests write, and the real RTE files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from cache_store.reader import open_cache
from ladder.vision import VisualT5SideNetwork
from pipeline.config import apply_overrides
from stages.extract import extract
from stages.multitask import cached_task_outputs, train_multitask_run
from stages.tasks import compute_metrics, load_task_of
from stages.train_side import candidates_of, predictions_of, train_side
from tests.conftest import assert_one_task_run_is_the_single, make_config, tiny_t5
from tests.test_vl import tiny_clip, write_vqa
from tests.test_vl_caption import write_captions
from tests.test_vl_data import write_nlvr2
from tests.test_vl_data import write_vqa as write_vqa_v2

TRAIN = {
    "train_side.epochs": 2,
    "train_side.batch_size": 4,
    "train_side.warmup_steps": 2,
    "train_side.reduction_factors": [4],
    "train_side.learning_rates": [0.003],
    "train_side.init": "magnitude",
}


@pytest.fixture(scope="module")
def t5_caches(tmp_path_factory, glue_dir, minilm_tokenizer):
    """float32 caches of one tiny T5 (magnitude side_init at r = 4): easy-VQA, VQA v2 (VL-T5's
    format), NLVR2 and COCO captions with a tiny CLIP's image features, and RTE (text)."""
    tmp = tmp_path_factory.mktemp("mt-t5")
    backbone, vision = tiny_t5(minilm_tokenizer), tiny_clip()
    data = {
        "easy-vqa": write_vqa(tmp / "vqa", n_train=10, n_test=3, per_image=3),
        "vqa": write_vqa_v2(tmp / "vqa-v2"),  # scored answers: the VQA score
        "nlvr2": write_nlvr2(tmp / "nlvr2"),  # two images per example
        "coco-caption": write_captions(tmp / "coco"),
        "rte": glue_dir,
    }
    common = {
        "backbone.name": "tiny-t5",
        "cache.dtype": "float32",
        "task.limit": 12,  # every task of a list is read with the list's limit
        "extract.side_init": ["magnitude"],
        "extract.reduction_factors": [4],
    }
    for task, folder in data.items():
        vl = {"backbone.vision": "tiny-clip"} if task != "rte" else {}
        cfg = make_config(tmp, folder, **{**common, "task.name": task, **vl})
        extract(cfg, backbone=backbone, vision=vision if vl.get("backbone.vision") else None,
                progress=False)  # fmt: skip
    return {"tmp": tmp, "data": data, "backbone": backbone, "vision": vision}


def _cfg(c, tmp_path, tasks: str, **extra):
    first = tasks.split(",")[0]
    vl = any(t != "rte" for t in tasks.split(","))
    over = {
        "task.name": tasks,
        "task.limit": 12,
        "backbone.name": "tiny-t5",
        **({"backbone.vision": "tiny-clip"} if vl else {}),
    }
    cfg = make_config(c["tmp"], c["data"]["rte" if "rte" in tasks else first], **over)
    return apply_overrides(cfg, {**TRAIN, "train_side.run_dir": str(tmp_path / "runs"), **extra})


@pytest.mark.parametrize("task", ["easy-vqa", "vqa", "coco-caption"])
def test_one_t5_task_is_the_single_task_run(t5_caches, tmp_path, task):
    """A list of one T5 task trains the one-task network step for step (same seed, batches,
    init, RNG stream, dropout on) and scores it the same: VQA on its candidate answers (VQA v2
    with the VQA score of its scored answers), captioning on its teacher-forced caption loss."""
    cfg = _cfg(t5_caches, tmp_path, task)
    single = train_side(cfg, run_name="single", progress=False, echo=False)
    multi = train_multitask_run(cfg, run_name="multi", progress=False, echo=False)
    assert_one_task_run_is_the_single(single, multi, task)


def test_vl_tasks_and_a_text_task_share_one_t5_network(t5_caches, tmp_path, monkeypatch, capsys):
    """``--task easy-vqa,nlvr2,coco-caption,rte`` on T5: one side network, no heads; the VL
    tasks' batches carry their visual tokens (NLVR2's two images, the others' one), the text
    task's none; each task reports its own metric every epoch; the saved network rebuilds to
    the run's figures from the caches, and ``pipeline evaluate`` with the live backbone scores
    each task as training did (captioning: CIDEr of generated captions)."""
    tasks = ("easy-vqa", "nlvr2", "coco-caption", "rte")
    cfg = _cfg(t5_caches, tmp_path, ",".join(tasks))
    seen: set[int | None] = set()
    real = VisualT5SideNetwork.encode_visual

    def spy(self, enc, mask, visual):
        seen.add(None if visual is None else visual.shape[1])
        return real(self, enc, mask, visual)

    monkeypatch.setattr(VisualT5SideNetwork, "encode_visual", spy)
    res = train_multitask_run(cfg, progress=False, echo=False)
    monkeypatch.undo()
    tokens = min(x for x in seen if x)  # the tiny CLIP's tokens per image
    assert seen == {None, tokens, 2 * tokens}  # text alone, one image, two images
    (name,) = res.metrics["networks"]
    net = res.metrics["networks"][name]
    for h in net["epochs"]:
        per = {t: v["validation"] for t, v in h["tasks"].items()}
        assert set(per) == set(tasks)
        assert all("accuracy" in per[t] for t in ("easy-vqa", "nlvr2", "rte"))
        assert per["coco-caption"]["score"] == -per["coco-caption"]["caption_loss"] < 0
        average = np.mean([v["score"] for v in per.values()])
        assert h["validation"]["score"] == pytest.approx(average)
    weights = load_file(str(res.folder / f"{name}.best.safetensors"))
    assert not any(k.startswith(("heads.", "body.")) for k in weights)  # one shared network
    assert "visual_proj.weight" in weights and "enc.0.sa.q.weight" in weights
    assert "lm_head" not in weights  # frozen, from the cache
    saved = json.loads((res.folder / f"{name}.config.json").read_text())
    assert set(saved["tasks"]) == set(tasks)
    assert saved["visual"] == {
        "d": 32, "n_images": 2, "fusion": "ladder", "readout": "text", "tokens_per_image": tokens
    }  # fmt: skip
    # the best checkpoint rebuilt from its config scores each classification task as the run did
    for task in ("easy-vqa", "nlvr2", "rte"):
        outputs = cached_task_outputs(cfg, res.folder, name, task, "test")
        task_cfg = cfg.task.model_copy(
            update={"name": task, "data_dir": str(t5_caches["data"][task])}
        )
        data = load_task_of(task_cfg)
        cache = json.loads((res.folder / "metrics.json").read_text())["tasks"][task]["cache"]
        assert cache == saved["tasks"][task]["cache"]
        spec = data.spec
        candidates = candidates_of(open_cache(cfg.cache.resolved_root, cache))
        assert candidates is not None and outputs.shape[1] == len(candidates)
        preds = predictions_of(outputs, spec, candidates)
        y = np.asarray([ex.label for ex in data.splits["test"]])
        assert compute_metrics(spec, preds, y)["accuracy"] == net["test"][task]["accuracy"]
    # pipeline evaluate: the live T5 (and CLIP) and the rebuilt network
    import stages.evaluate
    from pipeline.cli import run_cli

    monkeypatch.setattr(stages.evaluate, "load_backbone", lambda *a, **k: t5_caches["backbone"])
    monkeypatch.setattr(stages.evaluate, "load_vision_encoder", lambda *a, **k: t5_caches["vision"])
    capsys.readouterr()
    for task in ("rte", "easy-vqa", "nlvr2"):
        data = t5_caches["data"][task]
        args = ["--run", str(res.folder), "--task", task, "--data-dir", str(data), "--json"]
        assert run_cli(["evaluate", *args]) == 0, capsys.readouterr().err
        got = json.loads(capsys.readouterr().out)
        assert got.pop("split") == "test"
        assert got["accuracy"] == pytest.approx(net["test"][task]["accuracy"], abs=1e-4)
    # captioning: generated with the live backbone, scored by CIDEr
    args = ["--run", str(res.folder), "--task", "coco-caption", "--data-dir"]
    assert run_cli(["evaluate", *args, str(t5_caches["data"]["coco-caption"]), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["split"] == "test" and 0 <= got["cider"] == got["score"]
