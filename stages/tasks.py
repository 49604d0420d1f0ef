"""Task registry: the eight GLUE tasks and the user's own files, with the paper's splits and metrics.

Sources, in the order a user meets them:
  * a local directory in the classic ``glue_data`` TSV layout (``--data-dir``),
  * the Hugging Face hub through ``datasets`` (for users who are online),
  * the user's own CSV/JSONL files with a column mapping (task ``custom``); with ``problem:
    generation``, JSONL lines of ``prompt`` and ``answer`` (a decoder-only backbone learns to
    generate the answer; metric ``exact_match``).

Splits follow the authors' code (LST_REFERENCE.md section 6): the small tasks halve the original
validation set into validation and test; the large ones hold out 1000 training examples as
validation and test on the original validation set; MNLI validates on mismatched and tests on
matched. The shuffles use ``split_seed`` (42 in the reference), fixed across runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ladder.hub import hub_or_offline
from stages.errors import StageError
from stages.vl_data import read_vl
from stages.vqa import EASY_VQA_ANSWERS, easy_vqa_folder, read_easy_vqa, vqa_splits

csv.field_size_limit(sys.maxsize)

SPLITS = ("train", "validation", "test")
SMALL_TASKS = {"rte", "cola", "mrpc", "stsb"}  # 20 epochs in the paper; the rest 10


def paper_epochs(task: str) -> int:
    """The paper's epoch budget for a task: 20 for the small GLUE tasks, 10 for the rest."""
    return 20 if task in SMALL_TASKS else 10


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_fields: tuple[str, ...]  # field names, also the keys of the T5 input template
    labels: tuple[str, ...] | None  # class names in id order; None for regression (STS-B)
    metric: str  # "accuracy" | "mcc" | "acc_f1" | "pearson_spearman" | "vqa_score" | "cider"
    glue_dir: str = ""  # folder name in glue_data
    tsv_columns: tuple[str | int, ...] = ()  # TSV header names (or positions) of text fields
    tsv_label: str | int = "label"  # TSV header name (or position) of the label
    tsv_header: bool = True
    tsv_files: dict[str, str] = field(default_factory=dict)  # original split -> file name
    hub_columns: tuple[str, ...] = ()  # column names in the hub's "glue" dataset
    large: bool = False  # large tasks hold out 1000 training examples as validation
    images: bool = False  # vision-and-language: each example names an image (stages.vqa)
    trainable: bool = True  # False: extract only (stage two refuses it)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def generation(self) -> bool:
        """A generation task: the answer is text the model generates (``Example.answer``)."""
        return self.metric == GENERATION_METRIC

    @property
    def captioning(self) -> bool:
        """Image captioning (``coco-caption``): the answer is a caption the T5 side decoder
        generates (``Example.answer`` the training target, ``Example.references`` for CIDEr)."""
        return self.metric == CAPTION_METRIC

    @property
    def is_regression(self) -> bool:
        return self.labels is None and not self.generation and not self.captioning


def _glue(name: str, **kw: object) -> TaskSpec:
    files = {"train": "train.tsv", "validation": "dev.tsv"}
    return TaskSpec(name=name, tsv_files=kw.pop("tsv_files", files), **kw)  # type: ignore[arg-type]


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        _glue(
            "cola",
            text_fields=("sentence",),
            labels=("unacceptable", "acceptable"),
            metric="mcc",
            glue_dir="CoLA",
            tsv_columns=(3,),
            tsv_label=1,
            tsv_header=False,
            hub_columns=("sentence",),
        ),
        _glue(
            "sst2",
            text_fields=("sentence",),
            labels=("negative", "positive"),
            metric="accuracy",
            glue_dir="SST-2",
            tsv_columns=("sentence",),
            hub_columns=("sentence",),
            large=True,
        ),
        _glue(
            "mrpc",
            text_fields=("sentence1", "sentence2"),
            labels=("not_equivalent", "equivalent"),
            metric="acc_f1",
            glue_dir="MRPC",
            tsv_columns=("#1 String", "#2 String"),
            tsv_label="Quality",
            hub_columns=("sentence1", "sentence2"),
        ),
        _glue(
            "qqp",
            text_fields=("question1", "question2"),
            labels=("not_duplicate", "duplicate"),
            metric="acc_f1",
            glue_dir="QQP",
            tsv_columns=("question1", "question2"),
            tsv_label="is_duplicate",
            hub_columns=("question1", "question2"),
            large=True,
        ),
        _glue(
            "stsb",
            text_fields=("sentence1", "sentence2"),
            labels=None,
            metric="pearson_spearman",
            glue_dir="STS-B",
            tsv_columns=("sentence1", "sentence2"),
            tsv_label="score",
            hub_columns=("sentence1", "sentence2"),
        ),
        _glue(
            "mnli",
            text_fields=("premise", "hypothesis"),
            labels=("entailment", "neutral", "contradiction"),
            metric="accuracy",
            glue_dir="MNLI",
            tsv_columns=("sentence1", "sentence2"),
            tsv_label="gold_label",
            tsv_files={
                "train": "train.tsv",
                "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv",
            },
            hub_columns=("premise", "hypothesis"),
            large=True,
        ),
        _glue(
            "qnli",
            text_fields=("question", "sentence"),
            labels=("entailment", "not_entailment"),
            metric="accuracy",
            glue_dir="QNLI",
            tsv_columns=("question", "sentence"),
            hub_columns=("question", "sentence"),
            large=True,
        ),
        _glue(
            "rte",
            text_fields=("sentence1", "sentence2"),
            labels=("entailment", "not_entailment"),
            metric="accuracy",
            glue_dir="RTE",
            tsv_columns=("sentence1", "sentence2"),
            hub_columns=("sentence1", "sentence2"),
        ),
    ]
}
METRICS = ("accuracy", "mcc", "acc_f1", "pearson_spearman")
GENERATION_METRIC = "exact_match"  # generation tasks: the whole answer (+ EOS) right, x100
GENERATION_FIELDS = ("prompt", "answer")  # a generation task's JSONL fields
CAPTION_METRIC = "cider"  # captioning: CIDEr-D of greedy captions (``pipeline evaluate``)
# captioning with T5: the backbone encoder's whole input (template ``t5-caption``; the prompt is
# recorded in the cache key's task record); the caption is the decoder's target
CAPTION_PROMPT = "caption:"
# vision-and-language tasks: each example names an image (stages.vqa, stages.vl_data read them);
# vqa's and gqa's answer sets come from the data (labels=() here: set when the data is read)
VL_TASKS: dict[str, TaskSpec] = {
    "easy-vqa": TaskSpec(
        name="easy-vqa",
        text_fields=("question",),
        labels=EASY_VQA_ANSWERS,
        metric="accuracy",
        large=True,
        images=True,
    ),
    "vqa": TaskSpec(
        name="vqa", text_fields=("question",), labels=(), metric="vqa_score", images=True
    ),
    "gqa": TaskSpec(
        name="gqa", text_fields=("question",), labels=(), metric="accuracy", images=True
    ),
    "nlvr2": TaskSpec(
        name="nlvr2",
        text_fields=("sentence",),
        labels=("false", "true"),
        metric="accuracy",
        images=True,
    ),
    "coco-caption": TaskSpec(
        name="coco-caption",
        text_fields=(),  # no input text: the encoder reads CAPTION_PROMPT, the image the side
        labels=None,
        metric=CAPTION_METRIC,
        images=True,
    ),
}


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: int | float
    image: str | None = None  # vision-and-language tasks: the key of the example's image
    image2: str | None = None  # NLVR2: the second image's key
    targets: tuple[tuple[int, float], ...] = ()  # VQA/GQA: (class id, score) of each answer
    answer: str | None = None  # generation tasks: the text to generate after the prompt
    references: tuple[str, ...] = ()  # captioning (validation, test): the image's references


@dataclass
class TaskData:
    spec: TaskSpec
    splits: dict[str, list[Example]]  # "train", "validation", "test"
    source: str  # a short description of where the data came from
    images: dict[str, str] = field(default_factory=dict)  # image key -> file (VL tasks)

    def fingerprint(self, split: str) -> str:
        return fingerprint_examples(self.splits[split])


def fingerprint_examples(examples: Sequence[Example]) -> str:
    """A digest of a split's content and order: any edit to the data changes the cache key."""
    h = hashlib.sha256()
    for ex in examples:
        row = [ex.texts, ex.label] if ex.image is None else [ex.texts, ex.label, ex.image]
        if ex.image2 is not None:
            row.append(ex.image2)
        if ex.answer is not None:
            row.append({"answer": ex.answer})
        if ex.targets:  # the VQA score's answers: another score is another cache
            row.append([list(t) for t in ex.targets])
        if ex.references:  # captioning: the references CIDEr scores against
            row.append({"references": list(ex.references)})
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


class TaskConfig(BaseModel):
    """``task:`` in pipeline.yaml: which data, from where, split and cut how."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # a GLUE task (cola sst2 mrpc qqp stsb mnli qnli rte) or "custom"; several tasks trained as
    # one side network (stages.multitask): a list or a comma list, kept as "rte,mrpc"
    name: str = "rte"
    data_dir: str | None = None  # glue_data folder; None = the Hugging Face hub
    files: dict[str, str] = {}  # custom task: split -> CSV/TSV/JSONL path
    text_columns: list[str] = []  # custom task: text columns, in order
    label_column: str = "label"  # custom task: label column
    # custom task; generation: JSONL lines {"prompt", "answer"}, a decoder-only backbone
    problem: Literal["classification", "regression", "generation"] = "classification"
    metric: Literal["accuracy", "mcc", "acc_f1", "pearson_spearman"] = "accuracy"  # custom task
    split_seed: int = 42  # shuffle seed for the paper's validation/test splits (as data_seed)
    limit: int | None = Field(default=None, ge=1)  # first N examples of each split (smoke runs)

    @field_validator("name", mode="before")
    @classmethod
    def _task_list(cls, v: Any) -> Any:
        """``[rte, mrpc]`` or ``"rte, mrpc"`` -> ``"rte,mrpc"``; each task once, no ``custom``."""
        if isinstance(v, list | tuple):
            names = [str(x).strip() for x in v]
        elif isinstance(v, str) and "," in v:
            names = [x.strip() for x in v.split(",")]
        else:
            return v
        if not names or not all(names):
            raise ValueError("a task list names an empty task; give tasks like rte,mrpc")
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"the task list repeats {', '.join(dup)}; list each task once")
        if len(names) > 1 and "custom" in names:
            raise ValueError("'custom' trains alone; a task list takes GLUE tasks")
        return ",".join(names)

    @property
    def names(self) -> list[str]:
        """The task(s) of ``name``: one, or several for a multi-task run."""
        return self.name.split(",")


def get_task(name: str) -> TaskSpec:
    known = {**TASKS, **VL_TASKS}
    if name not in known:
        raise StageError(
            f"unknown task {name!r}; allowed: {', '.join(known)}, or 'custom' with your own files"
        )
    return known[name]


@dataclass(frozen=True)
class CustomTask:
    """The user's own CSV/JSONL files: ``files`` maps split -> path."""

    files: dict[str, str]
    text_columns: tuple[str, ...]
    label_column: str = "label"
    problem: str = "classification"  # or "regression", "generation"
    metric: str = "accuracy"


def load_task(
    name: str,
    *,
    data_dir: str | Path | None = None,
    custom: CustomTask | None = None,
    split_seed: int = 42,
    limit: int | None = None,
) -> TaskData:
    """Load a task's train/validation/test splits (paper splits), optionally the first ``limit`` of each."""
    images: dict[str, str] = {}
    if name == "easy-vqa":
        spec = get_task(name)
        folder = easy_vqa_folder(data_dir)
        rows, images = read_easy_vqa(folder)
        splits = {
            k: [Example((q,), a, image=i) for q, a, i in v]
            for k, v in vqa_splits(rows, split_seed).items()
        }
        source = f"easy-VQA at {folder.resolve()}"
        original = None
    elif name in VL_TASKS:
        vl = read_vl(name, data_dir)
        spec = replace(get_task(name), labels=vl.labels)
        if spec.captioning:  # no input text; the caption is the target (stages.tokens)
            splits = {
                k: [
                    Example((), 0, r.images[0], answer=r.text, references=r.references)
                    for r in rows
                ]
                for k, rows in vl.splits.items()
            }
        else:
            splits = {
                k: [
                    Example((r.text,), r.label, r.images[0], _second(r.images), r.targets)
                    for r in rows
                ]
                for k, rows in vl.splits.items()
            }
        images, source, original = vl.images, vl.source, None
    elif name == "custom":
        if custom is None:
            raise StageError("task 'custom' needs task.files and task.text_columns")
        spec, original = _load_custom(custom)
        source = "files: " + ", ".join(f"{k}={v}" for k, v in custom.files.items())
    else:
        spec = get_task(name)
        if data_dir is not None:
            original = _load_glue_dir(spec, Path(data_dir))
            source = f"glue_data TSV at {Path(data_dir).resolve()}"
        else:
            original = _load_hub(spec)
            source = "huggingface hub: glue/" + spec.name
    if original is not None:
        splits = paper_splits(spec, original, split_seed)
    for split, examples in splits.items():
        if not examples:
            raise StageError(f"split {split!r} of task {spec.name!r} is empty ({source})")
    if limit is not None:
        if limit < 1:
            raise StageError(f"--limit must be a positive integer, got {limit}")
        splits = {k: v[:limit] for k, v in splits.items()}
    used = {i for v in splits.values() for ex in v for i in (ex.image, ex.image2) if i is not None}
    images = {k: p for k, p in images.items() if k in used}
    return TaskData(spec=spec, splits=splits, source=source, images=images)


def _second(images: tuple[str, ...]) -> str | None:
    return images[1] if len(images) > 1 else None


def check_trainable(spec: TaskSpec, family: str | None = None, vision: bool = False) -> None:
    """Stage two refuses a task it cannot train: one marked extract-only; captioning on a cache
    that is not a T5 backbone's (``family``) with image features (``vision``)."""
    if not spec.trainable:
        raise StageError(f"task {spec.name!r} is extract-only; allowed: another task")
    if not spec.captioning:
        return
    if family != "t5":
        raise StageError(
            f"captioning ({spec.name!r}) needs a T5 backbone (its side decoder generates the "
            f"caption); this cache's backbone is {family or 'unknown'}; allowed: a T5 backbone "
            "with --vision-encoder"
        )
    if not vision:
        raise StageError(
            f"captioning ({spec.name!r}) needs image features; allowed: a cache extracted with "
            "--vision-encoder"
        )


def load_task_of(cfg: TaskConfig, *, limit: int | None = None) -> TaskData:
    """The task ``cfg`` describes (GLUE or the user's files); ``limit`` overrides ``cfg.limit``.

    The one place a task's data is built from the configuration: extraction, evaluation and
    prediction all come through here, custom tasks included.
    """
    custom = None
    if cfg.name == "custom":
        custom = CustomTask(
            files=dict(cfg.files),
            text_columns=tuple(cfg.text_columns),
            label_column=cfg.label_column,
            problem=cfg.problem,
            metric=cfg.metric,
        )
    return load_task(
        cfg.name,
        data_dir=cfg.data_dir,
        custom=custom,
        split_seed=cfg.split_seed,
        limit=cfg.limit if limit is None else limit,
    )


def spec_of(saved: dict[str, Any]) -> TaskSpec:
    """The task of a cache or a trained network, from its saved description (custom included)."""
    if saved["name"] in TASKS or saved["name"] in VL_TASKS:
        spec = get_task(saved["name"])
        if spec.labels == ():  # answer set read from the data (vqa, gqa)
            spec = replace(spec, labels=tuple(saved["labels"]))
        return spec
    labels = tuple(saved["labels"]) if saved["labels"] else None
    return TaskSpec(
        name=saved["name"],
        text_fields=tuple(saved["text_fields"]),
        labels=labels,
        metric=saved["metric"],
    )


def paper_splits(
    spec: TaskSpec, original: dict[str, list[Example]], seed: int
) -> dict[str, list[Example]]:
    """Derive train/validation/test from the original splits as the authors' code does."""
    rng = np.random.RandomState(seed)
    if spec.name == "mnli":
        return {
            "train": original["train"],
            "validation": original["validation_mismatched"],
            "test": original["validation_matched"],
        }
    if "test" in original:  # custom files with their own test split
        return {k: original[k] for k in SPLITS}
    if spec.large:
        train = original["train"]
        order = rng.permutation(len(train))
        return {
            "train": [train[i] for i in order[1000:]],
            "validation": [train[i] for i in order[:1000]],
            "test": original["validation"],
        }
    val = original["validation"]
    order = rng.permutation(len(val))
    half = len(val) // 2
    return {
        "train": original["train"],
        "validation": [val[i] for i in order[:half]],
        "test": [val[i] for i in order[half:]],
    }


def _label_value(spec: TaskSpec, raw: str, where: str) -> int | float:
    if spec.labels is None:
        try:
            return float(raw)
        except ValueError:
            raise StageError(f"{where}: label {raw!r} is not a number") from None
    if raw.isdigit() and int(raw) < len(spec.labels):
        return int(raw)
    if raw in spec.labels:
        return spec.labels.index(raw)
    raise StageError(
        f"{where}: label {raw!r} is not one of {', '.join(spec.labels)} "
        f"(or their ids 0..{len(spec.labels) - 1})"
    )


def read_glue_tsv(spec: TaskSpec, path: Path) -> list[Example]:
    """Read one glue_data TSV file, checking that it has the task's columns."""
    if not path.is_file():
        raise StageError(f"missing data file {path} for task {spec.name!r}")
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise StageError(f"{path} is empty")
    wanted = [*spec.tsv_columns, spec.tsv_label]
    if spec.tsv_header:
        header, rows = rows[0], rows[1:]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise StageError(
                f"{path} has the wrong columns: missing {', '.join(map(str, missing))}; "
                f"task {spec.name!r} needs {', '.join(map(str, wanted))} (found {', '.join(header)})"
            )
        index = [header.index(c) for c in wanted]
    else:
        index = [int(c) for c in wanted]
    width = max(index) + 1
    examples = []
    for n, row in enumerate(rows, start=2 if spec.tsv_header else 1):
        if len(row) < width:
            raise StageError(
                f"{path}:{n} has {len(row)} columns; task {spec.name!r} needs at least {width}"
            )
        if spec.name == "mnli" and row[index[-1]] == "-":  # no gold label (rare in dev sets)
            continue
        texts = tuple(row[i] for i in index[:-1])
        examples.append(Example(texts, _label_value(spec, row[index[-1]], f"{path}:{n}")))
    return examples


def _load_glue_dir(spec: TaskSpec, data_dir: Path) -> dict[str, list[Example]]:
    if not data_dir.is_dir():
        raise StageError(f"data directory {data_dir} does not exist")
    task_dir = data_dir / spec.glue_dir
    if not task_dir.is_dir():
        raise StageError(
            f"data directory {data_dir} has no {spec.glue_dir}/ folder for task {spec.name!r} "
            "(expected the classic glue_data layout)"
        )
    return {split: read_glue_tsv(spec, task_dir / fn) for split, fn in spec.tsv_files.items()}


def _load_hub(spec: TaskSpec) -> dict[str, list[Example]]:
    unreachable = hub_or_offline()  # before datasets reads HF_HUB_OFFLINE at import
    import datasets

    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.name)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
        if unreachable is not None:
            raise StageError(
                f"task {spec.name!r} without --data-dir comes from the Hugging Face hub, which is "
                f"not reachable from here ({unreachable}) and not in the local datasets cache; "
                "pass --data-dir with a glue_data folder"
            ) from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StageError(
            f"could not load glue/{spec.name} from the Hugging Face hub ({first}); "
            "pass --data-dir with a glue_data folder instead"
        ) from None
    out = {}
    for split in ds:
        if split.startswith("test"):
            continue  # GLUE test labels are not public
        out[split] = [
            Example(tuple(row[c] for c in spec.hub_columns), row["label"]) for row in ds[split]
        ]
    return out


def jsonl_rows(lines: Iterable[str], where: str) -> list[dict]:
    """One JSON object per line (blank lines skipped); a bad line is an error naming it."""
    return [row for _, row in jsonl_numbered(lines, where)]


def jsonl_numbered(lines: Iterable[str], where: str) -> list[tuple[int, dict]]:
    """:func:`jsonl_rows` with each row's line number (1-based), for errors that name it."""
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(
                f"{where}:{n} is not valid JSON ({e.msg}); expected one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise StageError(
                f"{where}:{n} is a JSON {type(row).__name__}; expected one JSON object per line"
            )
        rows.append((n, row))
    return rows


def read_table(path: Path) -> list[dict]:
    """The rows of a ``.jsonl``/``.json`` (one object per line), ``.csv`` or ``.tsv`` file."""
    if not path.is_file():
        raise StageError(f"missing data file {path}")
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            return jsonl_rows(f, str(path))
    if path.suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            rows = []
            for row in reader:
                if None in row or None in row.values():  # too many or too few fields
                    raise StageError(
                        f"{path}:{reader.line_num} does not have the header's "
                        f"{len(reader.fieldnames or ())} columns"
                    )
                rows.append(row)
        return rows
    raise StageError(f"{path}: unsupported file type; allowed: .csv, .tsv, .jsonl")


def _load_custom(custom: CustomTask) -> tuple[TaskSpec, dict[str, list[Example]]]:
    for split in custom.files:
        if split not in SPLITS:
            raise StageError(f"task.files has split {split!r}; allowed: {', '.join(SPLITS)}")
    if custom.problem == "generation":
        return _load_generation(custom)
    if not custom.text_columns:
        raise StageError("task 'custom' needs task.text_columns (the text columns, in order)")
    for split in ("train", "validation"):
        if split not in custom.files:
            raise StageError(f"task 'custom' needs a {split} file in task.files")
    if custom.problem not in ("classification", "regression"):
        raise StageError(
            f"task.problem is {custom.problem!r}; allowed: classification, regression, generation"
        )
    if custom.metric not in METRICS:
        raise StageError(f"task.metric is {custom.metric!r}; allowed: {', '.join(METRICS)}")
    tables = {split: read_table(Path(p)) for split, p in custom.files.items()}
    for split, rows in tables.items():
        needed = [*custom.text_columns, custom.label_column]
        if rows and (missing := [c for c in needed if c not in rows[0]]):
            raise StageError(
                f"{custom.files[split]} has the wrong columns: missing {', '.join(missing)} "
                f"(found {', '.join(rows[0])})"
            )
    for split, rows in tables.items():
        for n, r in enumerate(rows, start=1):
            raw = r.get(custom.label_column)
            if raw is None or not str(raw).strip():
                raise StageError(
                    f"{custom.files[split]}: data row {n} has "
                    f"{'no' if raw is None else 'an empty'} label in column "
                    f"{custom.label_column!r}; every example of every split needs a label"
                )
    labels = None
    if custom.problem == "classification":
        found = {str(r[custom.label_column]) for r in tables["train"]}
        numeric = all(v.lstrip("-").isdigit() for v in found)
        labels = tuple(sorted(found, key=lambda v: (int(v), v) if numeric else (0, v)))
    spec = TaskSpec(
        name="custom",
        text_fields=custom.text_columns,
        labels=labels,
        # accuracy on float scores means nothing: regression defaults to Pearson/Spearman
        metric="pearson_spearman"
        if custom.problem == "regression" and custom.metric == "accuracy"
        else custom.metric,
    )
    original = {
        split: [
            Example(
                tuple(str(r[c]) for c in custom.text_columns),
                _label_value(spec, str(r[custom.label_column]), custom.files[split])
                if labels is None or str(r[custom.label_column]) not in labels
                else labels.index(str(r[custom.label_column])),
            )
            for r in rows
        ]
        for split, rows in tables.items()
    }
    return spec, original


def _load_generation(custom: CustomTask) -> tuple[TaskSpec, dict[str, list[Example]]]:
    """A generation task: per split a JSONL file whose lines hold string ``prompt`` and ``answer``
    fields (others are ignored); a line without them is an error naming the file and line."""
    for split in ("train", "validation"):
        if split not in custom.files:
            raise StageError(f"task 'custom' needs a {split} file in task.files")
    allowed = "JSON objects with string fields 'prompt' and 'answer'"
    original = {}
    for split, name in custom.files.items():
        path = Path(name)
        if path.suffix not in (".jsonl", ".json"):
            raise StageError(
                f"{path}: a generation task reads JSONL files; allowed: .jsonl ({allowed})"
            )
        if not path.is_file():
            raise StageError(f"missing data file {path}")
        with path.open(encoding="utf-8") as f:
            rows = jsonl_numbered(f, str(path))
        examples = []
        for n, row in rows:
            for key in GENERATION_FIELDS:
                if not isinstance(row.get(key), str):
                    what = (
                        "no"
                        if row.get(key) is None
                        else f"a non-string ({type(row[key]).__name__})"
                    )
                    raise StageError(
                        f"{path}:{n} has {what} {key!r}; allowed: {allowed} (found: "
                        f"{', '.join(map(str, row)) or 'none'})"
                    )
            if not row["answer"]:
                raise StageError(f"{path}:{n} has an empty 'answer'; allowed: {allowed}, non-empty")
            examples.append(Example((row["prompt"],), 0, answer=row["answer"]))
        original[split] = examples
    spec = TaskSpec(name="custom", text_fields=("prompt",), labels=None, metric=GENERATION_METRIC)
    return spec, original


# --- metrics (the paper's, x100) -------------------------------------------------------------


def compute_metrics(
    spec: TaskSpec,
    preds: np.ndarray,
    labels: np.ndarray,
    targets: Sequence[Sequence[tuple[int, float]]] | None = None,
) -> dict[str, float]:
    """The task's metric(s) x100 and their mean under ``score`` (the figure the paper reports).

    ``targets``: the examples' soft targets (VQA: (class id, score) pairs, ``Example.targets``);
    given, ``vqa_score`` (VL-T5's: the score of the predicted answer) is added and is the
    ``score``; without them (the cache holds one class per question) the figure is the accuracy
    of the top answer."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if spec.captioning:
        raise StageError(
            "CIDEr scores generated captions: `pipeline evaluate` (stages.evaluate) computes it; "
            "train-side reports the teacher-forced caption loss"
        )
    if spec.generation:  # preds: 1 where the whole answer was right; labels: ones
        em = float(np.mean(preds == labels)) * 100 if len(labels) else 0.0
        return {"exact_match": em, "score": em}
    if targets is not None:
        from stages.vl_metrics import vqa_score_ids

        soft = vqa_score_ids(preds, targets)
        acc = float(np.mean(preds == labels)) * 100 if len(labels) else 0.0
        return {"vqa_score": soft, "accuracy": acc, "score": soft}
    if spec.metric == "pearson_spearman":
        from scipy.stats import pearsonr, spearmanr

        p = float(pearsonr(preds, labels)[0]) * 100 if np.std(preds) > 0 else 0.0
        s = float(spearmanr(preds, labels)[0]) * 100 if np.std(preds) > 0 else 0.0
        out = {"pearson": p, "spearman": s}
    elif spec.metric == "mcc":
        out = {"mcc": _mcc(preds, labels) * 100}
    elif spec.metric == "acc_f1":
        out = {"accuracy": float(np.mean(preds == labels)) * 100, "f1": _f1(preds, labels) * 100}
    else:
        out = {"accuracy": float(np.mean(preds == labels)) * 100}
    out["score"] = float(np.mean(list(out.values())))
    return out


def targets_width(data: TaskData) -> int | None:
    """Tasks scored by the VQA score (``metric == "vqa_score"``): the most scored answers any
    example has (at least 1), the width of the cache's target arrays; None for other tasks."""
    if data.spec.metric != "vqa_score":
        return None
    return max([1, *(len(ex.targets) for v in data.splits.values() for ex in v)])


def targets_table(examples: Sequence[Example], width: int) -> tuple[np.ndarray, np.ndarray]:
    """The examples' ``targets`` as the cache stores them: class ids int32 [n, width] (-1 pads)
    and scores float64 [n, width] (:func:`targets_of_table` reads them back, exactly)."""
    classes = np.full((len(examples), width), -1, dtype=np.int32)
    scores = np.zeros((len(examples), width), dtype=np.float64)
    for n, ex in enumerate(examples):
        for k, (c, sc) in enumerate(ex.targets):
            classes[n, k], scores[n, k] = c, sc
    return classes, scores


def targets_of_table(
    classes: np.ndarray, scores: np.ndarray
) -> list[tuple[tuple[int, float], ...]]:
    """Per example, its (class id, score) pairs from :func:`targets_table`'s arrays."""
    return [
        tuple((int(c), float(sc)) for c, sc in zip(cs, ss, strict=True) if c >= 0)
        for cs, ss in zip(classes, scores, strict=True)
    ]


def _mcc(preds: np.ndarray, labels: np.ndarray) -> float:
    tp = float(np.sum((preds == 1) & (labels == 1)))
    tn = float(np.sum((preds == 0) & (labels == 0)))
    fp = float(np.sum((preds == 1) & (labels == 0)))
    fn = float(np.sum((preds == 0) & (labels == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def _f1(preds: np.ndarray, labels: np.ndarray) -> float:
    tp = float(np.sum((preds == 1) & (labels == 1)))
    fp = float(np.sum((preds == 1) & (labels == 0)))
    fn = float(np.sum((preds == 0) & (labels == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


# --- input templates ---------------------------------------------------------------------------


def t5_source(spec: TaskSpec, ex: Example) -> str:
    """The authors' seq2seq input: ``"<task> key1: text1 key2: text2"`` (MNLI: no colon after hypothesis);
    captioning: :data:`CAPTION_PROMPT` alone (the image reaches the side network only)."""
    if spec.captioning:
        return CAPTION_PROMPT
    parts = [spec.name]
    for key, text in zip(spec.text_fields, ex.texts, strict=True):
        sep = "" if (spec.name == "mnli" and key == "hypothesis") else ":"
        parts.append(f"{key}{sep} {text}")
    return " ".join(parts)


def t5_target(spec: TaskSpec, label: int | float) -> str:
    """The verbalised target: the label id as a string; STS-B rounded to the nearest 0.2.

    The authors' code rounds STS-B to one decimal (51 strings); the 0.2 grid keeps the candidate
    set that evaluation scores from the cache at 26 strings, at most 0.1 from the true score.
    """
    if spec.is_regression:
        return f"{math.floor(float(label) * 5 + 0.5) / 5:.1f}"  # half up: 2.5 -> "2.6"
    return str(int(label))


def t5_candidates(spec: TaskSpec) -> list[str]:
    """Every label string a T5 side network can be scored on (evaluation by ranking candidates)."""
    if spec.is_regression:
        return [f"{i / 5:.1f}" for i in range(26)]
    return [str(i) for i in range(spec.num_labels)]


def verbalised_labels(spec: TaskSpec) -> list[str]:
    """The answer word of each label for an LM-scored classification (``train_side.head: lm``):
    the label names, underscores read as spaces (``not_entailment`` -> ``not entailment``)."""
    if spec.labels is None or spec.generation:
        raise StageError(
            f"task {spec.name!r} has no label names to verbalise; allowed: a classification task"
        )
    return [name.replace("_", " ") for name in spec.labels]
