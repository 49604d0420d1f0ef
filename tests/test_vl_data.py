"""VL-T5-format readers (vqa, gqa, nlvr2, coco-caption) on small fixtures in the real formats,
written here into tmp_path, and their bad input; the classification tasks through extract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stages.errors import StageError
from stages.tasks import load_task
from stages.vl_data import NO_ANSWER

COLOURS = [(255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 0), (128, 128, 128)]


def png(path: Path, i: int) -> None:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (16, 16), (255, 255, 255))
    ImageDraw.Draw(im).rectangle([2, 2, 4 + i % 9, 12], fill=COLOURS[i % len(COLOURS)])
    im.save(path)


def dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def write_vqa(folder: Path, n_train: int = 8, n_val: int = 3, n_test: int = 3) -> Path:
    """VL-T5's vqa/karpathy_{train,val,test}.json and COCO images under images/train2014|val2014."""
    folder.mkdir(parents=True, exist_ok=True)
    answers = ["yes", "no", "2", "red"]

    def records(split: str, n: int, coco: str, first: int = 0) -> list[dict]:
        rows = []
        for i in range(first, first + n):
            img = f"COCO_{coco}_{i:012d}"
            png(folder / "images" / coco / f"{img}.jpg", i)
            for q in range(2):
                a, b = answers[(i + q) % 4], answers[(i + q + 1) % 4]
                rows.append({
                    "answer_type": "other",
                    "img_id": img,
                    "label": {a: 1, b: 0.3},
                    "question_id": i * 1000 + q,
                    "question_type": "what is",
                    "sent": f"What is {split} thing {i} number {q}?",
                })  # fmt: skip
        return rows

    dump(folder / "karpathy_train.json", records("train", n_train, "train2014"))
    dump(folder / "karpathy_val.json", records("val", n_val, "val2014"))
    test = records("test", n_test, "val2014", first=100)  # Karpathy val/test: other images
    test[0]["label"] = {"purple": 1}  # no answer in the answer set
    dump(folder / "karpathy_test.json", test)
    return folder


def write_gqa(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 6), ("valid", 2), ("testdev", 2)):
        rows = []
        for i in range(n):
            img = f"{split[0]}{2375429 + i}"
            png(folder / "images" / f"{img}.jpg", i)
            rows.append({"img_id": img, "label": {["pipe", "left", "yes"][i % 3]: 1.0},
                         "question_id": f"0733{i}", "sent": f"What is on wall {i}?"})  # fmt: skip
        dump(folder / f"{split}.json", rows)
    return folder


def write_nlvr2(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        rows = []
        for i in range(n):
            ident = f"{split}-{10171 + i}-0"
            for k in (0, 1):
                png(folder / "images" / split / str(i % 2) / f"{ident}-img{k}.png", i + k)
            rows.append({"identifier": f"{ident}-0", "img0": f"{ident}-img0",
                         "img1": f"{ident}-img1", "label": i % 2,
                         "sent": f"One image shows {i} dogs.", "uid": f"nlvr2_{split}_{i}"})  # fmt: skip
        dump(folder / f"{split}.json", rows)
    return folder


def write_coco(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "train"]):
        fp = "val2014" if split != "train" else "train2014"
        fn = f"COCO_{fp}_{i:012d}.jpg"
        png(folder / "images" / fp / fn, i)
        sents = [{"raw": f"A photo of {i} things .", "tokens": ["a"], "imgid": i, "sentid": 2 * i},
                 {"raw": f"Some {i} objects", "tokens": ["some"], "imgid": i,
                  "sentid": 2 * i + 1}]  # fmt: skip
        images.append({"filepath": fp, "filename": fn, "split": split, "cocoid": i,
                       "imgid": i, "sentences": sents, "sentids": [2 * i, 2 * i + 1]})  # fmt: skip
    dump(folder / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return folder


# --- readers -------------------------------------------------------------------------------------


def test_vqa_reader_answer_set_labels_targets_and_images(tmp_path):
    data = load_task("vqa", data_dir=write_vqa(tmp_path / "vqa"))
    labels = data.spec.labels
    # every answer seen in the training labels (4 < VQA_TOP_K), by frequency, then NO_ANSWER
    assert set(labels[:-1]) == {"yes", "no", "2", "red"} and labels[-1] == NO_ANSWER
    assert data.spec.num_labels == 5 and data.spec.images
    ex = data.splits["train"][0]  # label {"yes": 1, "no": 0.3}
    assert ex.texts == ("What is train thing 0 number 0?",)
    assert labels[ex.label] == "yes"
    assert dict(ex.targets) == {labels.index("yes"): 1.0, labels.index("no"): 0.3}
    assert ex.image == "COCO_train2014_000000000000" and ex.image2 is None
    assert data.images[ex.image].endswith("images/train2014/COCO_train2014_000000000000.jpg")
    assert [len(v) for v in data.splits.values()] == [16, 6, 6]
    # a test question none of whose answers is in the set: the NO_ANSWER class, no targets
    bad = data.splits["test"][0]
    assert labels[bad.label] == NO_ANSWER and bad.targets == ()


def test_vqa_answer_set_from_trainval_ans2label(tmp_path):
    folder = write_vqa(tmp_path / "vqa")
    dump(folder / "trainval_ans2label.json", {"no": 0, "yes": 1, "red": 2})
    rows = json.loads((folder / "karpathy_train.json").read_text())
    rows[0]["label"] = {"2": 1}  # no answer in the set
    dump(folder / "karpathy_train.json", rows)
    data = load_task("vqa", data_dir=folder)
    assert data.spec.labels == ("no", "yes", "red", NO_ANSWER)
    # a training question with no answer in the set is left out and counted; one with an
    # answer in the set takes it even when another answer scores higher
    assert len(data.splits["train"]) == 15 and "1 training questions with no answer" in data.source
    assert all(ex.label < 3 for ex in data.splits["train"])
    ex = data.splits["train"][2]  # {"2": 1, "red": 0.3}
    assert data.spec.labels[ex.label] == "red" and ex.targets == ((2, 0.3),)


def test_gqa_and_nlvr2_readers(tmp_path):
    gqa = load_task("gqa", data_dir=write_gqa(tmp_path / "gqa"))
    assert gqa.spec.labels == ("left", "pipe", "yes")  # training answers: 2 each, alphabetical
    assert [gqa.spec.labels[ex.label] for ex in gqa.splits["validation"]] == ["pipe", "left"]
    nlvr = load_task("nlvr2", data_dir=write_nlvr2(tmp_path / "nlvr2"))
    ex = nlvr.splits["train"][1]
    assert nlvr.spec.labels == ("false", "true") and ex.label == 1
    assert (ex.image, ex.image2) == ("train-10172-0-img0", "train-10172-0-img1")
    assert nlvr.images[ex.image2].endswith("images/train/1/train-10172-0-img1.png")


def test_coco_caption_reader_karpathy_split(tmp_path):
    from stages.vl_data import read_coco_captions

    vl = read_coco_captions(write_coco(tmp_path / "coco"))
    # train + restval: 3 images x 2 captions; validation, test: one row per image
    assert [len(v) for v in vl.splits.values()] == [6, 1, 1]
    assert vl.references["test"] == {
        "COCO_val2014_000000000003": ["A photo of 3 things .", "Some 3 objects"]
    }
    assert vl.splits["test"][0].references == ("A photo of 3 things .", "Some 3 objects")
    data = load_task("coco-caption", data_dir=tmp_path / "coco")
    assert data.spec.captioning and data.spec.metric == "cider"


@pytest.mark.parametrize(
    ("task", "damage", "message"),
    [
        ("vqa", "no-image", "karpathy_val.json: record 2 (question_id 1000) names image "
         "'COCO_val2014_000000000001' (img_id), which has no file"),
        ("vqa", "bad-label", "karpathy_train.json: record 1 (question_id 1) has label 'yes'; "
         "expected an object {answer: score}"),
        ("vqa", "no-sent", "karpathy_train.json: record 0 (question_id 0) has no 'sent'"),
        ("gqa", "unseen-answer", "testdev.json: record 1 (question_id 07331) has answer(s) "
         "'purple', none of them in the answer set (3 answers of the training labels)"),
        ("nlvr2", "one-image", "valid.json: record 0 (identifier valid-10171-0-0) has 1 "
         "image(s) (img0); an NLVR2 example needs two: img0, img1"),
        ("nlvr2", "bad-label", "train.json: record 2 (identifier train-10173-0-0) has label 2"),
        ("coco-caption", "no-image", "images[3] names image file"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_the_file_and_record(tmp_path, task, damage, message):
    folder = {"vqa": write_vqa, "gqa": write_gqa, "nlvr2": write_nlvr2, "coco-caption": write_coco}[
        task
    ](tmp_path / task)
    if task == "vqa":
        if damage == "no-image":
            (folder / "images" / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
        else:
            rows = json.loads((folder / "karpathy_train.json").read_text())
            if damage == "bad-label":
                rows[1]["label"] = "yes"
            else:
                del rows[0]["sent"]
            dump(folder / "karpathy_train.json", rows)
    elif task == "gqa":
        rows = json.loads((folder / "testdev.json").read_text())
        rows[1]["label"] = {"purple": 1.0}
        dump(folder / "testdev.json", rows)
    elif task == "nlvr2":
        name = "valid.json" if damage == "one-image" else "train.json"
        rows = json.loads((folder / name).read_text())
        if damage == "one-image":
            del rows[0]["img1"]
        else:
            rows[2]["label"] = 2
        dump(folder / name, rows)
    else:
        (folder / "images" / "val2014" / "COCO_val2014_000000000003.jpg").unlink()
    with pytest.raises(StageError) as e:
        load_task(task, data_dir=folder)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_vl_task_without_data_dir_says_so(tmp_path):
    with pytest.raises(StageError, match="task 'gqa' needs --data-dir"):
        load_task("gqa")


# --- end to end: extract on a fixture folder, two images per NLVR2 example -------------------------


def _extract(tmp_path, task, folder):
    from pipeline.cli import run_cli

    root = tmp_path / "cache"
    args = ["run", "extract", "--task", task, "--data-dir", str(folder), "--json"]
    args += ["--cache-root", str(root), "--vision-encoder", "random-vit", "--max-length", "32"]
    args += ["--side-init", "magnitude", "--side-init-factors", "4"]
    assert run_cli(args) == 0
    from cache_store.reader import open_cache

    (key,) = [p.parent.name for p in root.glob("*/commit.json")]
    return open_cache(str(root), key)


def test_vqa_extract_end_to_end_with_random_vit(tmp_path, capsys):
    from cache_store import layout

    cache = _extract(tmp_path, "vqa", write_vqa(tmp_path / "vqa"))
    m = cache.manifest
    assert m["images"]["n_images"] == 8 + 3 + 3 and m["images"]["n_tokens"] == 65
    assert m["task"]["labels"][-1] == NO_ANSWER
    assert {s: v["n_examples"] for s, v in m["splits"].items()} == {
        "train": 16, "validation": 6, "test": 6,
    }  # fmt: skip
    index = np.asarray(cache.array(layout.image_index_path("test"))[...])
    assert index.shape == (6,) and list(index[:3]) == [11, 11, 12]  # 2 questions per image


def test_nlvr2_extract_stores_two_image_indices(tmp_path, capsys):
    from cache_store import layout
    from cache_store.images import ImageTable

    cache = _extract(tmp_path, "nlvr2", write_nlvr2(tmp_path / "nlvr2"))
    index = np.asarray(cache.array(layout.image_index_path("train"))[...])
    assert index.shape == (6, 2) and index[1].tolist() == [2, 3]
    table = ImageTable(cache)
    got = table.gather("train", np.asarray([1, 0]))
    assert got.shape == (2, 2 * 65, 192)  # img0's 65 tokens, then img1's
    np.testing.assert_array_equal(got[0, 65:], table.grid[3])
    np.testing.assert_array_equal(got[1, :65], table.grid[0])


def test_coco_caption_with_an_encoder_only_backbone_is_one_line(tmp_path, capsys):
    """Captioning needs a T5 backbone (tests/test_vl_caption.py trains one); the default
    encoder-only backbone stops extraction before anything is loaded."""
    from pipeline.cli import run_cli

    folder = write_coco(tmp_path / "coco")
    args = ["run", "extract", "--task", "coco-caption", "--data-dir", str(folder)]
    args += ["--cache-root", str(tmp_path / "cache"), "--vision-encoder", "random-vit"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "captioning needs a T5 backbone" in err[0], err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("commit.json"))


# --- the VQA score in train-side ------------------------------------------------------------------


def test_vqa_train_side_scores_and_keeps_the_vqa_score(tmp_path, capsys):
    from pipeline.cli import run_cli
    from pipeline.config import Config, apply_overrides
    from stages.tasks import compute_metrics
    from stages.train_side import cached_predictions, split_targets, task_spec_of

    folder = write_vqa(tmp_path / "vqa")
    val = json.loads((folder / "karpathy_val.json").read_text())
    for r in val:  # the second answer given by one human of three: min(1/3, 1)
        r["label"] = {a: 1 if s == 1 else 1 / 3 for a, s in r["label"].items()}
    dump(folder / "karpathy_val.json", val)
    cache = _extract(tmp_path, "vqa", folder)
    data = load_task("vqa", data_dir=folder)
    spec = task_spec_of(cache)
    assert spec.metric == "vqa_score" and cache.manifest["splits"]["validation"]["targets"] == 2
    targets = split_targets(cache, "validation")
    assert targets == [ex.targets for ex in data.splits["validation"]]  # exactly, from the cache
    labels = np.asarray([ex.label for ex in data.splits["validation"]])
    third = np.asarray([min(t, key=lambda x: x[1])[0] for t in targets])  # the 1-of-3 answers
    got = compute_metrics(spec, third, labels, targets)
    assert got["score"] == got["vqa_score"] == pytest.approx(100 / 3) and got["accuracy"] == 0
    top = compute_metrics(spec, labels, labels, targets)
    assert top["vqa_score"] == top["accuracy"] == 100
    # train-side: each epoch's validation figure, the kept checkpoint and the test figure
    capsys.readouterr()
    args = ["run", "train-side", "--task", "vqa", "--cache-root", str(tmp_path / "cache")]
    args += ["--cache-key", cache.key, "--run-dir", str(tmp_path / "runs"), "--epochs", "3"]
    args += ["--vision-encoder", "random-vit", "--init", "random", "--batch-size", "4"]
    assert run_cli([*args, "--json"]) == 0
    assert "val vqa_score" in capsys.readouterr().err
    (run,) = [p.parent for p in (tmp_path / "runs").glob("*/metrics.json")]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metric"] == "vqa_score"
    (name, net), = metrics["networks"].items()  # fmt: skip
    scores = [h["validation"]["score"] for h in net["epochs"]]
    assert all(h["validation"]["score"] == h["validation"]["vqa_score"] for h in net["epochs"])
    assert net["best_validation"] == max(scores) and scores[net["best_epoch"] - 1] == max(scores)
    cfg = apply_overrides(
        Config(),
        {"task.name": "vqa", "task.data_dir": str(folder), "backbone.vision": "random-vit",
         "backbone.max_length": 32, "cache.root": str(tmp_path / "cache")},
    )  # fmt: skip
    test = data.splits["test"]
    preds = cached_predictions(cfg, run, name, "test")
    want = compute_metrics(
        spec, preds, np.asarray([ex.label for ex in test]), [ex.targets for ex in test]
    )
    assert net["test"] == want and set(want) == {"vqa_score", "accuracy", "score"}
    # pipeline evaluate (live MiniLM and random-vit) reports the VQA score too
    capsys.readouterr()
    args = ["evaluate", "--run", str(run), "--split", "test", "--data-dir", str(folder)]
    assert run_cli([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) == {"split", "vqa_score", "accuracy", "score"}
    assert got["score"] == got["vqa_score"]
