"""easy-VQA (the PyPI package ``easy-vqa``): questions, answers and image files, read as plain data.

The package ships 4,000 training and 1,000 test images (64x64 PNG), 38,575 training and 9,673
test questions, and 13 answers. ``--data-dir`` may name a folder in the package's own layout
(``answers.txt``, ``train/questions.json``, ``train/images/<id>.png``, the same under ``test/``);
without it the installed package's data is read.

Splits (``vqa_splits``): the paper holds out 1,000 training examples of a large task as its
validation set; here the held-out part is every question of 100 training images (about 960
questions), drawn with ``split_seed``, so that no validation image is seen in training. Test is
the package's test set. Image keys are ``train/<id>`` and ``test/<id>`` (the two sets number
their images from 0 each).

This module returns plain tuples; ``stages.tasks`` turns them into examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.errors import StageError

EASY_VQA_ANSWERS = (
    "circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle",
    "brown", "blue", "no",
)  # fmt: skip
VALIDATION_IMAGES = 100  # training images whose questions form the validation split

Row = tuple[str, int, str]  # question, answer id, image key


def easy_vqa_folder(data_dir: str | Path | None) -> Path:
    """The folder with ``answers.txt``, ``train/`` and ``test/``: ``data_dir`` or the package's."""
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise StageError(f"data directory {folder} does not exist")
        return folder
    try:
        import easy_vqa
    except ImportError:
        raise StageError(
            "task 'easy-vqa' needs the easy-vqa package (pip install 'lst-pipeline[vl]'), or "
            "--data-dir with a folder in its layout"
        ) from None
    return Path(easy_vqa.__file__).parent / "data"


def read_easy_vqa(folder: Path) -> tuple[dict[str, list[Row]], dict[str, str]]:
    """The original splits (``train``, ``test``) as rows, and every image key's file path.

    An image id that a question names without a file, an unknown answer or a malformed file is
    one line naming the file.
    """
    answers_file = folder / "answers.txt"
    if not answers_file.is_file():
        raise StageError(f"missing {answers_file} (easy-VQA layout: answers.txt, train/, test/)")
    answers = tuple(a.strip() for a in answers_file.read_text().splitlines() if a.strip())
    if answers != EASY_VQA_ANSWERS:
        raise StageError(
            f"{answers_file} lists {len(answers)} answers {list(answers)[:4]}...; task "
            f"'easy-vqa' has the package's {len(EASY_VQA_ANSWERS)}: {', '.join(EASY_VQA_ANSWERS)}"
        )
    splits: dict[str, list[Row]] = {}
    images: dict[str, str] = {}
    for split in ("train", "test"):
        qfile = folder / split / "questions.json"
        if not qfile.is_file():
            raise StageError(f"missing data file {qfile} for task 'easy-vqa'")
        try:
            raw = json.loads(qfile.read_text())
            rows = [(str(q), str(a), int(i)) for q, a, i in raw]
        except (ValueError, TypeError) as e:
            raise StageError(
                f"{qfile} is not a list of [question, answer, image id] ({type(e).__name__})"
            ) from None
        image_dir = folder / split / "images"
        files = {p.stem: p for p in image_dir.glob("*.png")} if image_dir.is_dir() else {}
        out = []
        for n, (q, a, i) in enumerate(rows):
            if a not in EASY_VQA_ANSWERS:
                raise StageError(f"{qfile}: question {n} has answer {a!r}, not one of the 13")
            path = files.get(str(i))
            if path is None:
                raise StageError(
                    f"{qfile}: question {n} names image {i}, which has no file "
                    f"{image_dir / f'{i}.png'}"
                )
            key = f"{split}/{i}"
            images[key] = str(path)
            out.append((q, EASY_VQA_ANSWERS.index(a), key))
        splits[split] = out
    return splits, images


def vqa_splits(original: dict[str, list[Row]], seed: int) -> dict[str, list[Row]]:
    """Train / validation / test: every question of ``VALIDATION_IMAGES`` training images
    (drawn with ``seed``) is held out as validation; test is the original test split."""
    train = original["train"]
    ids = sorted({key for _, _, key in train}, key=lambda k: int(k.rsplit("/", 1)[1]))
    order = np.random.RandomState(seed).permutation(len(ids))
    held = {ids[i] for i in order[: min(VALIDATION_IMAGES, max(1, len(ids) // 10))]}
    return {
        "train": [r for r in train if r[2] not in held],
        "validation": [r for r in train if r[2] in held],
        "test": original["test"],
    }


QUESTION_TYPES = ("color", "shape", "yes/no")  # easy-VQA's kinds of question


def question_type(question: str) -> str:
    """An easy-VQA question's type, from its text alone: ``yes/no`` when it opens with "is" or
    "does" ("is there a red shape?", "is no circle present?", "does the image not contain a
    triangle?"), else ``color`` when it names the colour ("what color is the shape?", "what is
    the color of the circle?"), else ``shape`` ("what shape is present?", "what is the blue
    shape?"). easy-VQA's question templates are of these three kinds only."""
    words = question.lower().split()
    if words and words[0] in ("is", "does", "are", "do"):
        return "yes/no"
    return "color" if "color" in words or "colour" in words else "shape"
