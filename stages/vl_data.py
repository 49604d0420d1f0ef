"""Readers for the vision-and-language data of the paper's CLIP-T5 experiments, in the formats of
VL-T5 / VL-Adapter (github.com/j-min/VL-T5: ``VL-T5/src/{vqa,gqa,nlvr}_data.py``, and Karpathy's
``dataset_coco.json`` for captions), read as plain data from ``--data-dir``.

Folder layouts (``<dir>`` = ``--data-dir``); every image is found by its id, the file's name without
its extension, anywhere under ``<dir>/images/`` (``.jpg``, ``.jpeg`` or ``.png``; two files with
the same id is an error):

  vqa           <dir>/karpathy_{train,val,test}.json   [{"img_id", "sent", "label": {answer:
                score}, "question_id", ...}], optional <dir>/trainval_ans2label.json
                <dir>/images/**/COCO_train2014_000000458752.jpg ...
  gqa           <dir>/{train,valid,testdev}.json        [{"img_id", "sent", "label": {answer:
                score}, "question_id"}]; <dir>/images/**/2375429.jpg ...
  nlvr2         <dir>/{train,valid,test}.json           [{"identifier", "img0", "img1", "sent",
                "label": 0|1, "uid"}]; <dir>/images/**/train-10171-0-img0.png ...
  coco-caption  <dir>/dataset_coco.json  {"images": [{"filepath", "filename", "split",
                "sentences": [{"raw"}], "cocoid"}]}; <dir>/images/<filepath>/<filename>

Splits: the files' own (VQA: Karpathy train / val / test as VL-T5; GQA: train / valid / testdev;
NLVR2: train / valid (dev) / test (test-P); captions: Karpathy train + restval / val / test).

VQA answers (classification): the answer set is ``trainval_ans2label.json`` when present (VL-T5's
3,129 answers, ordered by id), else the ``VQA_TOP_K`` (3,129) most frequent answers of the
training labels (count of training questions whose label names the answer with a score above 0;
ties alphabetical). Then one more class, ``NO_ANSWER``: a validation or test question none of whose
answers is in the set gets it (its VQA score is 0 whatever is predicted, as for any classifier over
that set); a training question with none is left out (VL-T5's classifier gives it an all-zero
target: no signal for a cross-entropy head) and counted in the source line. Each question's class
is its highest-scoring answer in the set (ties: the lower class id); its soft targets (class id,
score) are kept for the VQA score (``stages.vl_metrics``).

GQA answers: every answer of the training labels (ordered by frequency, then alphabetically); a
validation or test question whose answer is not one of them is an error naming the file and record.

Every malformed record (a missing field, a label that is not an {answer: score} object, an NLVR2
example with one image, an image id with no file) is one line naming the file and the record.
This module returns plain rows; ``stages.tasks`` turns them into examples.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.errors import StageError

VQA_TOP_K = 3129  # VL-T5 / LXMERT / bottom-up: answers seen at least 9 times in train + val
NO_ANSWER = "<no answer in the answer set>"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VL_DATA_TASKS = ("vqa", "gqa", "nlvr2", "coco-caption")
NLVR2_LABELS = ("false", "true")

SPLIT_FILES = {
    "vqa": {"train": "karpathy_train.json", "validation": "karpathy_val.json",
            "test": "karpathy_test.json"},
    "gqa": {"train": "train.json", "validation": "valid.json", "test": "testdev.json"},
    "nlvr2": {"train": "train.json", "validation": "valid.json", "test": "test.json"},
}  # fmt: skip
COCO_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class Row:
    text: str
    label: int | float
    images: tuple[str, ...]  # image ids (NLVR2: two)
    targets: tuple[tuple[int, float], ...] = ()  # VQA/GQA: (class id, score) of each answer
    references: tuple[str, ...] = ()  # captions: every reference caption of the image


@dataclass
class VLData:
    labels: tuple[str, ...] | None  # class names in id order; None: no classes (captions)
    splits: dict[str, list[Row]]
    images: dict[str, str]  # image id -> file
    source: str
    references: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # captions


def _folder(data_dir: str | Path | None, task: str) -> Path:
    if data_dir is None:
        raise StageError(
            f"task {task!r} needs --data-dir with its files (README, 'Vision and language')"
        )
    folder = Path(data_dir)
    if not folder.is_dir():
        raise StageError(f"data directory {folder} does not exist")
    return folder


def image_files(folder: Path) -> dict[str, str]:
    """Every image under ``folder/images`` by id (the file name without its extension)."""
    root = folder / "images"
    if not root.is_dir():
        raise StageError(f"{folder} has no images/ folder (the images, found by id under it)")
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            if p.stem in out:
                raise StageError(f"two files for image id {p.stem!r}: {out[p.stem]} and {p}")
            out[p.stem] = str(p)
    return out


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise StageError(f"missing data file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise StageError(f"{path} is not valid JSON ({str(e).splitlines()[0][:80]})") from None


def _records(path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = _load_json(path)
    if not isinstance(rows, list):
        raise StageError(f"{path} is a JSON {type(rows).__name__}; expected a list of records")
    for n, r in enumerate(rows):
        if not isinstance(r, dict):
            raise StageError(f"{path}: record {n} is a JSON {type(r).__name__}, not an object")
        missing = [f for f in fields if f not in r]
        if missing:
            raise StageError(
                f"{path}: record {n}{_rid(r)} has no {', '.join(repr(f) for f in missing)} "
                f"(fields: {', '.join(fields)})"
            )
    return rows


def _rid(r: dict[str, Any]) -> str:
    for k in ("question_id", "identifier", "uid"):
        if k in r:
            return f" ({k} {r[k]})"
    return ""


def _image(files: dict[str, str], path: Path, n: int, r: dict[str, Any], key: str) -> str:
    img = str(r[key])
    if img not in files:
        raise StageError(
            f"{path}: record {n}{_rid(r)} names image {img!r} ({key}), which has no file "
            f"<id>.jpg/.jpeg/.png under {path.parent / 'images'}"
        )
    return img


def _label_dict(path: Path, n: int, r: dict[str, Any]) -> dict[str, float]:
    lab = r["label"]
    if not isinstance(lab, dict) or not all(
        isinstance(s, int | float) and not isinstance(s, bool) for s in lab.values()
    ):
        raise StageError(
            f"{path}: record {n}{_rid(r)} has label {str(lab)[:60]!r}; expected an object "
            "{answer: score}"
        )
    return {str(a): float(s) for a, s in lab.items()}


def _answer_set(counts: Counter[str], top_k: int | None) -> tuple[str, ...]:
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    return tuple(ranked[:top_k] if top_k else ranked)


def read_qa(task: str, data_dir: str | Path | None) -> VLData:
    """VQA v2 (VL-T5's Karpathy split files) or GQA (VL-T5's files): questions with soft labels."""
    folder = _folder(data_dir, task)
    files = image_files(folder)
    names = SPLIT_FILES[task]
    raw = {
        split: (folder / fn, _records(folder / fn, ("img_id", "sent", "label")))
        for split, fn in names.items()
    }
    labels = {s: [_label_dict(p, n, r) for n, r in enumerate(rs)] for s, (p, rs) in raw.items()}
    vocab_file = folder / "trainval_ans2label.json"
    if task == "vqa" and vocab_file.is_file():
        ans2label = _load_json(vocab_file)
        if not isinstance(ans2label, dict):
            raise StageError(f"{vocab_file} is not an object {{answer: id}}")
        answers = tuple(sorted(ans2label, key=lambda a: ans2label[a]))
        how = f"{len(answers)} answers of {vocab_file.name}"
    else:
        counts = Counter(a for lab in labels["train"] for a, s in lab.items() if s > 0)
        answers = _answer_set(counts, VQA_TOP_K if task == "vqa" else None)
        how = f"{len(answers)} answers of the training labels"
    index = {a: i for i, a in enumerate(answers)}
    classes = (*answers, NO_ANSWER) if task == "vqa" else answers
    splits: dict[str, list[Row]] = {}
    skipped = 0
    for split, (path, records) in raw.items():
        out = []
        for n, (r, lab) in enumerate(zip(records, labels[split], strict=True)):
            img = _image(files, path, n, r, "img_id")
            targets = tuple(sorted((index[a], s) for a, s in lab.items() if a in index and s > 0))
            if not targets:
                if task == "gqa":
                    outside = ", ".join(repr(a) for a in lab) or "none"
                    raise StageError(
                        f"{path}: record {n}{_rid(r)} has answer(s) {outside}, none of them in "
                        f"the answer set ({how})"
                    )
                if split == "train":
                    skipped += 1
                    continue
                label = len(answers)  # NO_ANSWER
            else:
                label = min(targets, key=lambda t: (-t[1], t[0]))[0]
            out.append(Row(str(r["sent"]), label, (img,), targets))
        splits[split] = out
    source = f"{task} ({', '.join(names.values())}) at {folder.resolve()}; {how}"
    if skipped:
        source += f"; {skipped} training questions with no answer in the set left out"
    return VLData(classes, splits, files, source)


def read_nlvr2(data_dir: str | Path | None) -> VLData:
    """NLVR2 in VL-T5's files: a statement about two images, true (1) or false (0)."""
    folder = _folder(data_dir, "nlvr2")
    files = image_files(folder)
    splits: dict[str, list[Row]] = {}
    for split, fn in SPLIT_FILES["nlvr2"].items():
        path = folder / fn
        out = []
        for n, r in enumerate(_records(path, ("sent", "label"))):
            have = [k for k in ("img0", "img1") if r.get(k)]
            if len(have) != 2:
                raise StageError(
                    f"{path}: record {n}{_rid(r)} has {len(have)} image(s) "
                    f"({', '.join(have) or 'no img0, img1'}); an NLVR2 example needs two: img0, img1"
                )
            lab = r["label"]
            if isinstance(lab, str) and lab.lower() in NLVR2_LABELS:
                lab = NLVR2_LABELS.index(lab.lower())
            if isinstance(lab, bool) or lab not in (0, 1):
                raise StageError(
                    f"{path}: record {n}{_rid(r)} has label {lab!r}; allowed: 0, 1 (or "
                    "'False', 'True')"
                )
            imgs = tuple(_image(files, path, n, r, k) for k in ("img0", "img1"))
            out.append(Row(str(r["sent"]), int(lab), imgs))
        splits[split] = out
    return VLData(NLVR2_LABELS, splits, files, f"nlvr2 at {folder.resolve()}")


def read_coco_captions(data_dir: str | Path | None) -> VLData:
    """COCO captions, Karpathy split (``dataset_coco.json``). Train (+ restval): one row per
    (image, reference caption), the caption as ``text``; validation and test: one row per image,
    its first reference as ``text`` (the teacher-forced validation loss's target) and all of them
    as ``references`` (CIDEr). ``references`` per split: image id -> its reference captions."""
    folder = _folder(data_dir, "coco-caption")
    path = folder / "dataset_coco.json"
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise StageError(f"{path} has no 'images' list (Karpathy's dataset_coco.json)")
    splits: dict[str, list[Row]] = {"train": [], "validation": [], "test": []}
    references: dict[str, dict[str, list[str]]] = {s: {} for s in splits}
    images: dict[str, str] = {}
    for n, im in enumerate(data["images"]):
        missing = [k for k in ("filepath", "filename", "split", "sentences") if k not in im]
        if missing:
            raise StageError(f"{path}: images[{n}] has no {', '.join(missing)}")
        split = COCO_SPLITS.get(im["split"])
        if split is None:
            raise StageError(
                f"{path}: images[{n}] has split {im['split']!r}; allowed: {', '.join(COCO_SPLITS)}"
            )
        file = folder / "images" / im["filepath"] / im["filename"]
        if not file.is_file():
            raise StageError(f"{path}: images[{n}] names image file {file}, which does not exist")
        key = Path(im["filename"]).stem
        images[key] = str(file)
        caps = [
            str(s["raw"]).strip() for s in im["sentences"] if isinstance(s, dict) and "raw" in s
        ]
        if not caps:
            raise StageError(f"{path}: images[{n}] ({im['filename']}) has no sentences[].raw")
        references[split][key] = caps
        if split == "train":
            splits[split] += [Row(c, 0, (key,)) for c in caps]
        else:
            splits[split].append(Row(caps[0], 0, (key,), references=tuple(caps)))
    return VLData(None, splits, images, f"coco-caption (Karpathy) at {path.resolve()}", references)


def read_vl(task: str, data_dir: str | Path | None) -> VLData:
    if task in ("vqa", "gqa"):
        return read_qa(task, data_dir)
    if task == "nlvr2":
        return read_nlvr2(data_dir)
    return read_coco_captions(data_dir)
