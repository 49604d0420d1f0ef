"""Task registry, loaders, the paper's splits, metrics and T5 templates (stages/tasks.py).

Real GLUE files live in ``shared/data/glue`` beside the repository (never copied in); the counts
asserted here come from that folder's README, not from the loader. Malformed inputs are written
to ``tmp_path`` in a fake ``glue_data`` layout. The Hugging Face hub path is not exercised (no
network in tests).
"""

import functools
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from stages.errors import StageError
from stages.tasks import (
    TASKS,
    CustomTask,
    Example,
    TaskData,
    compute_metrics,
    fingerprint_examples,
    get_task,
    load_task,
    read_glue_tsv,
    t5_candidates,
    t5_source,
    t5_target,
)

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

# From shared/data/glue/README.md: (train rows, dev rows, train label counts, dev label counts),
# label counts keyed by class name.
README = {
    "cola": (
        8551,
        1043,
        {"acceptable": 6023, "unacceptable": 2528},
        {"acceptable": 721, "unacceptable": 322},
    ),
    "sst2": (
        67349,
        872,
        {"positive": 37569, "negative": 29780},
        {"positive": 444, "negative": 428},
    ),
    "mrpc": (
        3668,
        408,
        {"equivalent": 2474, "not_equivalent": 1194},
        {"equivalent": 279, "not_equivalent": 129},
    ),
    "stsb": (5749, 1500, None, None),
    "rte": (
        2490,
        277,
        {"entailment": 1249, "not_entailment": 1241},
        {"entailment": 146, "not_entailment": 131},
    ),
}
SMALL = ["cola", "mrpc", "stsb", "rte"]


@functools.cache
def _load(name: str, seed: int = 42) -> TaskData:
    return load_task(name, data_dir=GLUE, split_seed=seed)


@functools.cache
def _original(name: str, split: str) -> tuple[Example, ...]:
    spec = TASKS[name]
    return tuple(read_glue_tsv(spec, GLUE / spec.glue_dir / spec.tsv_files[split]))


def _bag(examples) -> Counter:
    """The multiset of (texts, label) pairs."""
    return Counter((ex.texts, ex.label) for ex in examples)


def _named_counts(name: str, examples: list[Example]) -> dict[str, int]:
    labels = TASKS[name].labels
    return dict(Counter(labels[ex.label] for ex in examples))


# --------------------------------------------------------------------------- registry


def test_registry_has_the_eight_glue_tasks_with_the_papers_metrics():
    assert list(TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]
    metrics = {name: spec.metric for name, spec in TASKS.items()}
    assert metrics == {
        "cola": "mcc",
        "sst2": "accuracy",
        "mrpc": "acc_f1",
        "qqp": "acc_f1",
        "stsb": "pearson_spearman",
        "mnli": "accuracy",
        "qnli": "accuracy",
        "rte": "accuracy",
    }
    assert {n for n, s in TASKS.items() if s.large} == {"sst2", "qqp", "mnli", "qnli"}
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert TASKS["mnli"].num_labels == 3 and not TASKS["mnli"].is_regression


def test_unknown_task_lists_the_allowed_names(tmp_path):
    allowed = "cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte"
    with pytest.raises(StageError, match=f"unknown task 'glue'; allowed: {allowed}"):
        get_task("glue")
    with pytest.raises(StageError, match="unknown task 'RTE'.*'custom'"):
        load_task("RTE", data_dir=tmp_path)


# --------------------------------------------------------------------------- real GLUE files


@pytest.mark.parametrize("name", SMALL)
def test_small_task_halves_the_dev_set_into_validation_and_test(name):
    n_train, n_dev, _, _ = README[name]
    data = _load(name)
    train, val, test = (data.splits[s] for s in ("train", "validation", "test"))
    dev = _original(name, "validation")
    assert len(dev) == n_dev
    # train is the original train file, untouched and in file order
    assert len(train) == n_train and tuple(train) == _original(name, "train")
    assert (len(val), len(test)) == (n_dev // 2, n_dev - n_dev // 2)
    # disjoint (as a multiset: a duplicated row may sit on both sides once each) and together
    # exactly the dev set
    assert Counter(val) + Counter(test) == Counter(dev)
    assert val != list(dev[: n_dev // 2])  # shuffled, not a plain cut
    # first/second half of the seeded permutation
    order = np.random.RandomState(42).permutation(n_dev)
    assert val == [dev[i] for i in order[: n_dev // 2]]
    assert test == [dev[i] for i in order[n_dev // 2 :]]


def test_sst2_holds_out_1000_training_examples_and_tests_on_dev():
    n_train, n_dev, train_counts, dev_counts = README["sst2"]
    data = _load("sst2")
    train, val, test = (data.splits[s] for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (n_train - 1000, 1000, n_dev)
    assert _bag(train + val) == _bag(_original("sst2", "train"))
    assert tuple(test) == _original("sst2", "validation")  # dev untouched, in file order
    assert _named_counts("sst2", train + val) == train_counts
    assert _named_counts("sst2", test) == dev_counts
    # a known row: first dev line, trailing space kept
    assert test[0] == Example(("it 's a charming and often affecting journey . ",), 1)


@pytest.mark.parametrize("name", ["cola", "mrpc", "rte"])
def test_label_counts_match_the_readme(name):
    _, _, train_counts, dev_counts = README[name]
    data = _load(name)
    assert _named_counts(name, data.splits["train"]) == train_counts
    assert _named_counts(name, data.splits["validation"] + data.splits["test"]) == dev_counts


def test_stsb_scores_are_floats_between_0_and_5():
    data = _load("stsb")
    scores = [ex.label for split in data.splits.values() for ex in split]
    assert len(scores) == 5749 + 1500
    assert all(isinstance(s, float) for s in scores)
    assert min(scores) == 0.0 and max(scores) == 5.0
    assert data.splits["train"][1] == Example(
        ("A man is playing a large flute.", "A man is playing a flute."), 3.8
    )


def test_known_rows_keep_their_text_exactly():
    rte = _load("rte")
    assert rte.splits["train"][0] == Example(
        (
            "No Weapons of Mass Destruction Found in Iraq Yet.",
            "Weapons of Mass Destruction Found in Iraq.",
        ),
        1,  # not_entailment
    )
    # MRPC: the BOM in the header is stripped, and quotes are literal text (QUOTE_NONE)
    mrpc = _load("mrpc")
    assert mrpc.splits["train"][0].texts[0] == (
        'Amrozi accused his brother, whom he called "the witness", '
        "of deliberately distorting his evidence."
    )
    unbalanced = Example(
        (
            "He said the foodservice pie business doesn't fit the company's long-term growth strategy.",
            '"The foodservice pie business does not fit our long-term growth strategy.',
        ),
        1,
    )
    assert unbalanced in mrpc.splits["validation"] + mrpc.splits["test"]
    # CoLA: no header; sentence is column 3, label column 1; dev has no final newline
    cola = _load("cola")
    assert cola.splits["train"][0] == Example(
        ("Our friends won't buy this analysis, let alone the next one we propose.",), 1
    )
    dev = cola.splits["validation"] + cola.splits["test"]
    assert len(dev) == 1043
    assert Example(("John talked to Bill about himself.",), 1) in dev  # the unterminated last line
    assert Example(("John bought a dog for himself to play with.",), 0) in dev


def test_rte_dev_first_row_lands_in_validation_or_test_with_its_label():
    data = _load("rte")
    first = Example(
        (
            "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
            "according to the Christopher Reeve Foundation.",
            "Christopher Reeve had an accident.",
        ),
        1,
    )
    assert (first in data.splits["validation"]) != (first in data.splits["test"])


def test_splits_are_deterministic_for_a_seed_and_differ_for_another():
    a, b, c = _load("rte", 42), load_task("rte", data_dir=GLUE, split_seed=42), _load("rte", 7)
    for split in ("train", "validation", "test"):
        assert a.splits[split] == b.splits[split]
        assert a.fingerprint(split) == b.fingerprint(split)
    assert a.splits["train"] == c.splits["train"]  # small task: train is not shuffled
    assert a.splits["validation"] != c.splits["validation"]
    assert a.fingerprint("validation") != c.fingerprint("validation")
    assert Counter(c.splits["validation"] + c.splits["test"]) == Counter(
        _original("rte", "validation")
    )


def test_large_task_holdout_is_seeded(tmp_path):
    # a small fake SST-2 keeps this fast: 1200 train rows -> 200 train + 1000 validation
    (tmp_path / "SST-2").mkdir()
    train = [Example((f"s{i} ",), i % 2) for i in range(1200)]
    body = "".join(f"{ex.texts[0]}\t{ex.label}\n" for ex in train)
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + body)
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ndev one\t1\ndev two\t0\n")
    a, b, c = (load_task("sst2", data_dir=tmp_path, split_seed=s) for s in (42, 42, 7))
    assert (len(a.splits["train"]), len(a.splits["validation"])) == (200, 1000)
    assert a.splits["test"] == [Example(("dev one",), 1), Example(("dev two",), 0)]
    assert set(a.splits["train"]).isdisjoint(a.splits["validation"])
    assert set(a.splits["train"]) | set(a.splits["validation"]) == set(train)
    assert a.splits == b.splits
    assert a.splits["validation"] != c.splits["validation"]
    assert a.fingerprint("train") != c.fingerprint("train")
    assert a.splits["test"] == c.splits["test"]


def test_limit_takes_the_first_n_of_each_split_and_rejects_0():
    full = _load("rte")
    small = load_task("rte", data_dir=GLUE, limit=5)
    for split in ("train", "validation", "test"):
        assert small.splits[split] == full.splits[split][:5]
    big = load_task("rte", data_dir=GLUE, limit=10**6)
    assert {k: len(v) for k, v in big.splits.items()} == {
        "train": 2490,
        "validation": 138,
        "test": 139,
    }
    for bad in (0, -3):
        with pytest.raises(StageError, match=f"--limit must be a positive integer, got {bad}"):
            load_task("rte", data_dir=GLUE, limit=bad)


def test_source_names_the_data_dir():
    assert _load("rte").source == f"glue_data TSV at {GLUE.resolve()}"


def test_qnli_without_train_tsv_names_the_missing_file():
    path = GLUE / "QNLI" / "train.tsv"
    with pytest.raises(StageError, match=re.escape(f"missing data file {path} for task 'qnli'")):
        load_task("qnli", data_dir=GLUE)


# --------------------------------------------------------------------------- malformed glue_data

RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
RTE_ROWS = "".join(
    f"{i}\tpremise {i}\thypothesis {i}\t{lab}\n"
    for i, lab in enumerate(["entailment", "not_entailment"] * 5)
)


def _fake_rte(
    root: Path, train: str = RTE_HEADER + RTE_ROWS, dev: str = RTE_HEADER + RTE_ROWS
) -> Path:
    (root / "RTE").mkdir(parents=True)
    (root / "RTE" / "train.tsv").write_text(train, encoding="utf-8")
    (root / "RTE" / "dev.tsv").write_text(dev, encoding="utf-8")
    return root


def test_fake_layout_loads(tmp_path):
    data = load_task("rte", data_dir=_fake_rte(tmp_path))
    assert data.splits["train"][1] == Example(("premise 1", "hypothesis 1"), 1)
    assert (len(data.splits["validation"]), len(data.splits["test"])) == (5, 5)


def test_label_ids_are_accepted_as_well_as_names(tmp_path):
    rows = "0\ta\tb\t0\n1\tc\td\t1\n2\te\tf\tnot_entailment\n"
    data = load_task("rte", data_dir=_fake_rte(tmp_path, train=RTE_HEADER + rows))
    assert [ex.label for ex in data.splits["train"]] == [0, 1, 1]


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(StageError, match=re.escape(f"data directory {missing} does not exist")):
        load_task("rte", data_dir=missing)


def test_data_dir_without_the_task_folder(tmp_path):
    with pytest.raises(StageError, match="has no RTE/ folder for task 'rte'.*glue_data layout"):
        load_task("rte", data_dir=tmp_path)


def test_tsv_with_wrong_columns(tmp_path):
    bad = "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n"
    _fake_rte(tmp_path, train=bad)
    with pytest.raises(
        StageError,
        match=r"train\.tsv has the wrong columns: missing sentence1, sentence2; task 'rte' needs "
        r"sentence1, sentence2, label \(found index, premise, hypothesis, label\)",
    ):
        load_task("rte", data_dir=tmp_path)


def test_header_only_split_is_empty(tmp_path):
    _fake_rte(tmp_path, dev=RTE_HEADER)
    with pytest.raises(StageError, match="split 'validation' of task 'rte' is empty"):
        load_task("rte", data_dir=tmp_path)


def test_header_only_train_is_empty(tmp_path):
    _fake_rte(tmp_path, train=RTE_HEADER)
    with pytest.raises(StageError, match="split 'train' of task 'rte' is empty"):
        load_task("rte", data_dir=tmp_path)


def test_zero_byte_file(tmp_path):
    _fake_rte(tmp_path, train="")
    with pytest.raises(StageError, match=r"train\.tsv is empty"):
        load_task("rte", data_dir=tmp_path)


def test_row_with_too_few_columns(tmp_path):
    _fake_rte(
        tmp_path, train=RTE_HEADER + "0\ta\tb\tentailment\n1\tonly one sentence\tentailment\n"
    )
    with pytest.raises(
        StageError, match=r"train\.tsv:3 has 3 columns; task 'rte' needs at least 4"
    ):
        load_task("rte", data_dir=tmp_path)


def test_headerless_cola_row_with_too_few_columns(tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("gj04\t1\t\tA sentence.\ngj04\t0\t*\n")
    (tmp_path / "CoLA" / "dev.tsv").write_text("gj04\t1\t\tA sentence.\n")
    with pytest.raises(
        StageError, match=r"train\.tsv:2 has 3 columns; task 'cola' needs at least 4"
    ):
        load_task("cola", data_dir=tmp_path)


def test_unknown_label_string(tmp_path):
    _fake_rte(tmp_path, dev=RTE_HEADER + "0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    with pytest.raises(
        StageError,
        match=r"dev\.tsv:3: label 'maybe' is not one of entailment, not_entailment \(or their ids 0\.\.1\)",
    ):
        load_task("rte", data_dir=tmp_path)


def test_label_id_out_of_range(tmp_path):
    _fake_rte(tmp_path, train=RTE_HEADER + "0\ta\tb\t2\n")
    with pytest.raises(StageError, match=r"label '2' is not one of"):
        load_task("rte", data_dir=tmp_path)


def test_non_numeric_stsb_score(tmp_path):
    header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    )
    (tmp_path / "STS-B").mkdir()
    (tmp_path / "STS-B" / "train.tsv").write_text(header + "0\tg\tf\ty\t0\tn\tn\ta\tb\thigh\n")
    (tmp_path / "STS-B" / "dev.tsv").write_text(header + "0\tg\tf\ty\t0\tn\tn\ta\tb\t1.0\n")
    with pytest.raises(StageError, match=r"train\.tsv:2: label 'high' is not a number"):
        load_task("stsb", data_dir=tmp_path)


# --------------------------------------------------------------------------- custom files


def _write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> str:
    path.write_text(header + "\n" + "".join(f"{t},{lab}\n" for t, lab in rows), encoding="utf-8")
    return str(path)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    return str(path)


def test_custom_csv_classification_with_own_test_split(tmp_path):
    files = {
        "train": _write_csv(
            tmp_path / "train.csv", [("good film", "pos"), ("bad film", "neg"), ("fine", "pos")]
        ),
        "validation": _write_csv(tmp_path / "val.csv", [("great", "pos"), ("awful", "neg")]),
        "test": _write_csv(tmp_path / "test.csv", [("meh", "neg")]),
    }
    data = load_task("custom", custom=CustomTask(files=files, text_columns=("text",)))
    assert data.spec.labels == ("neg", "pos")  # sorted class names -> ids
    assert data.spec.metric == "accuracy" and data.spec.text_fields == ("text",)
    assert data.splits == {
        "train": [Example(("good film",), 1), Example(("bad film",), 0), Example(("fine",), 1)],
        "validation": [Example(("great",), 1), Example(("awful",), 0)],
        "test": [Example(("meh",), 0)],
    }
    assert data.source.startswith("files: train=")


def test_custom_without_test_halves_validation(tmp_path):
    val_rows = [(f"v{i}", "a" if i % 2 else "b") for i in range(7)]
    files = {
        "train": _write_csv(tmp_path / "train.csv", [("x", "a"), ("y", "b")]),
        "validation": _write_csv(tmp_path / "val.csv", val_rows),
    }
    data = load_task("custom", custom=CustomTask(files=files, text_columns=("text",)))
    assert (len(data.splits["validation"]), len(data.splits["test"])) == (3, 4)
    val = [Example((t,), 0 if lab == "a" else 1) for t, lab in val_rows]
    assert Counter(data.splits["validation"] + data.splits["test"]) == Counter(val)


def test_custom_jsonl_regression(tmp_path):
    rows = [{"s1": f"a{i}", "s2": f"b{i}", "score": i * 0.5} for i in range(4)]
    files = {
        "train": _write_jsonl(tmp_path / "train.jsonl", rows),
        "validation": _write_jsonl(tmp_path / "val.jsonl", rows),
        "test": _write_jsonl(tmp_path / "test.jsonl", rows[:2]),
    }
    custom = CustomTask(
        files=files,
        text_columns=("s1", "s2"),
        label_column="score",
        problem="regression",
        metric="pearson_spearman",
    )
    data = load_task("custom", custom=custom)
    assert data.spec.is_regression and data.spec.metric == "pearson_spearman"
    assert data.splits["train"] == [Example((f"a{i}", f"b{i}"), i * 0.5) for i in range(4)]
    assert all(isinstance(ex.label, float) for ex in data.splits["train"])
    assert len(data.splits["test"]) == 2


def test_custom_jsonl_classification_with_integer_labels(tmp_path):
    rows = [{"q": "x", "y": 1}, {"q": "z", "y": 0}, {"q": "w", "y": 2}]
    files = {
        "train": _write_jsonl(tmp_path / "train.jsonl", rows),
        "validation": _write_jsonl(tmp_path / "val.jsonl", rows),
    }
    data = load_task(
        "custom", custom=CustomTask(files=files, text_columns=("q",), label_column="y")
    )
    assert data.spec.labels == ("0", "1", "2") and data.spec.num_labels == 3
    assert [ex.label for ex in data.splits["train"]] == [1, 0, 2]


def test_custom_file_with_wrong_columns(tmp_path):
    files = {
        "train": _write_csv(tmp_path / "train.csv", [("a", "x")]),
        "validation": _write_csv(tmp_path / "val.csv", [("a", "x")], header="sentence,label"),
    }
    with pytest.raises(
        StageError,
        match=r"val\.csv has the wrong columns: missing text \(found sentence, label\)",
    ):
        load_task("custom", custom=CustomTask(files=files, text_columns=("text",)))


def test_custom_unknown_split_name(tmp_path):
    path = _write_csv(tmp_path / "train.csv", [("a", "x")])
    files = {"train": path, "dev": path}
    with pytest.raises(
        StageError, match="task.files has split 'dev'; allowed: train, validation, test"
    ):
        load_task("custom", custom=CustomTask(files=files, text_columns=("text",)))


def test_custom_needs_train_and_validation_and_a_spec(tmp_path):
    path = _write_csv(tmp_path / "train.csv", [("a", "x")])
    with pytest.raises(StageError, match="needs a validation file in task.files"):
        load_task("custom", custom=CustomTask(files={"train": path}, text_columns=("text",)))
    with pytest.raises(StageError, match="task 'custom' needs task.files and task.text_columns"):
        load_task("custom")


def test_custom_bad_problem_metric_and_file_type(tmp_path):
    path = _write_csv(tmp_path / "train.csv", [("a", "x")])
    files = {"train": path, "validation": path}
    with pytest.raises(
        StageError, match="task.problem is 'ranking'; allowed: classification, regression"
    ):
        load_task(
            "custom", custom=CustomTask(files=files, text_columns=("text",), problem="ranking")
        )
    with pytest.raises(
        StageError,
        match="task.metric is 'bleu'; allowed: accuracy, mcc, acc_f1, pearson_spearman",
    ):
        load_task("custom", custom=CustomTask(files=files, text_columns=("text",), metric="bleu"))
    txt = tmp_path / "train.txt"
    txt.write_text("a\n")
    with pytest.raises(StageError, match="unsupported file type"):
        load_task(
            "custom",
            custom=CustomTask(
                files={"train": str(txt), "validation": path}, text_columns=("text",)
            ),
        )
    with pytest.raises(StageError, match="missing data file"):
        load_task(
            "custom",
            custom=CustomTask(
                files={"train": path, "validation": str(tmp_path / "no.csv")},
                text_columns=("text",),
            ),
        )


def test_custom_validation_label_not_seen_in_train(tmp_path):
    files = {
        "train": _write_csv(tmp_path / "train.csv", [("a", "neg"), ("b", "pos")]),
        "validation": _write_csv(tmp_path / "val.csv", [("c", "meh")]),
    }
    with pytest.raises(StageError, match="label 'meh' is not one of neg, pos"):
        load_task("custom", custom=CustomTask(files=files, text_columns=("text",)))


def test_custom_csv_row_with_missing_or_extra_fields(tmp_path):
    # a short row used to become text/label "None" silently (csv.DictReader's restval)
    val = _write_csv(tmp_path / "val.csv", [("a", "x")])
    short = tmp_path / "short.csv"
    short.write_text("text,label\na,x\nb\n")
    with pytest.raises(StageError, match=r"short\.csv:3 does not have the header's 2 columns"):
        load_task(
            "custom",
            custom=CustomTask(
                files={"train": str(short), "validation": val}, text_columns=("text",)
            ),
        )
    extra = tmp_path / "extra.csv"
    extra.write_text("text,label\na,x,oops\n")
    with pytest.raises(StageError, match=r"extra\.csv:2 does not have the header's 2 columns"):
        load_task(
            "custom",
            custom=CustomTask(
                files={"train": str(extra), "validation": val}, text_columns=("text",)
            ),
        )


def test_custom_bad_jsonl_is_one_line_error(tmp_path):
    val = _write_csv(tmp_path / "val.csv", [("a", "x")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(
        StageError, match=r"bad\.jsonl:2 is not valid JSON .*one JSON object per line"
    ):
        load_task(
            "custom",
            custom=CustomTask(files={"train": str(bad), "validation": val}, text_columns=("text",)),
        )
    array = tmp_path / "array.json"
    array.write_text('[{"text": "a", "label": "x"}]\n')
    with pytest.raises(
        StageError, match=r"array\.json:1 is a JSON list; expected one JSON object per line"
    ):
        load_task(
            "custom",
            custom=CustomTask(
                files={"train": str(array), "validation": val}, text_columns=("text",)
            ),
        )


def test_custom_needs_text_columns(tmp_path):
    path = _write_csv(tmp_path / "train.csv", [("a", "x")])
    with pytest.raises(StageError, match="task 'custom' needs task.text_columns"):
        load_task(
            "custom", custom=CustomTask(files={"train": path, "validation": path}, text_columns=())
        )


# --------------------------------------------------------------------------- metrics


def _confusion(tp: int, tn: int, fp: int, fn: int) -> tuple[np.ndarray, np.ndarray]:
    preds = [1] * tp + [0] * tn + [1] * fp + [0] * fn
    labels = [1] * tp + [0] * tn + [0] * fp + [1] * fn
    return np.array(preds), np.array(labels)


def test_accuracy():
    out = compute_metrics(TASKS["rte"], np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 1]))
    assert out == pytest.approx({"accuracy": 80.0, "score": 80.0})


def test_mcc_by_the_formula():
    tp, tn, fp, fn = 3, 4, 1, 2
    preds, labels = _confusion(tp, tn, fp, fn)
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert expected == pytest.approx(10 / math.sqrt(600))
    out = compute_metrics(TASKS["cola"], preds, labels)
    assert set(out) == {"mcc", "score"}
    assert out["mcc"] == pytest.approx(100 * expected) and out["score"] == out["mcc"]
    # a negative correlation, and the degenerate all-one-class prediction
    assert compute_metrics(TASKS["cola"], 1 - labels, labels)["mcc"] == pytest.approx(-100.0)
    assert compute_metrics(TASKS["cola"], np.ones(6, int), np.array([0, 1] * 3))["mcc"] == 0.0


def test_accuracy_and_f1():
    tp, tn, fp, fn = 3, 4, 1, 2
    preds, labels = _confusion(tp, tn, fp, fn)
    out = compute_metrics(TASKS["mrpc"], preds, labels)
    f1 = 2 * tp / (2 * tp + fp + fn)  # = 2PR/(P+R) with P=3/4, R=3/5
    assert f1 == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert set(out) == {"accuracy", "f1", "score"}
    assert out["accuracy"] == pytest.approx(70.0)
    assert out["f1"] == pytest.approx(100 * f1)
    assert out["score"] == pytest.approx((70.0 + 100 * f1) / 2)
    # no true positives -> F1 0
    assert compute_metrics(TASKS["qqp"], np.zeros(4, int), np.array([1, 0, 1, 0]))["f1"] == 0.0


def test_pearson_spearman_against_scipy():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, 50)
    preds = labels**2 + rng.normal(0, 3, 50)
    out = compute_metrics(TASKS["stsb"], preds, labels)
    p = stats.pearsonr(preds, labels)[0] * 100
    s = stats.spearmanr(preds, labels)[0] * 100
    assert set(out) == {"pearson", "spearman", "score"}
    assert out["pearson"] == pytest.approx(p) and out["spearman"] == pytest.approx(s)
    assert abs(p - s) > 1e-3  # the two really are different numbers here
    assert out["score"] == pytest.approx((p + s) / 2)
    constant = compute_metrics(TASKS["stsb"], np.full(5, 2.0), np.arange(5.0))
    assert constant == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}


# --------------------------------------------------------------------------- T5 templates


def test_t5_source_format():
    assert t5_source(TASKS["rte"], Example(("A.", "B."), 0)) == "rte sentence1: A. sentence2: B."
    assert t5_source(TASKS["cola"], Example(("It is.",), 1)) == "cola sentence: It is."
    assert t5_source(TASKS["qnli"], Example(("Q?", "S."), 0)) == "qnli question: Q? sentence: S."
    # MNLI: the authors' template has no colon after "hypothesis"
    assert t5_source(TASKS["mnli"], Example(("P.", "H."), 2)) == "mnli premise: P. hypothesis H."
    with pytest.raises(ValueError):
        t5_source(TASKS["rte"], Example(("only one",), 0))


def test_t5_target():
    assert t5_target(TASKS["rte"], 1) == "1"
    assert t5_target(TASKS["mnli"], 2) == "2"
    stsb = TASKS["stsb"]
    cases = {
        0.0: "0.0",
        5.0: "5.0",
        3.8: "3.8",
        4.12: "4.2",
        3.29: "3.2",
        4.75: "4.8",
        1.05: "1.0",
        2.95: "3.0",
    }
    for score, want in cases.items():
        assert t5_target(stsb, score) == want, score
    cands = set(t5_candidates(stsb))
    for score in np.linspace(0, 5, 501):
        out = t5_target(stsb, float(score))
        assert out in cands
        assert abs(float(out) - score) <= 0.1 + 1e-9  # nearest multiple of 0.2


def test_t5_candidates():
    stsb = t5_candidates(TASKS["stsb"])
    assert len(stsb) == 26 and stsb[0] == "0.0" and stsb[1] == "0.2" and stsb[-1] == "5.0"
    assert stsb == [f"{i / 5:.1f}" for i in range(26)]
    assert t5_candidates(TASKS["rte"]) == ["0", "1"]
    assert t5_candidates(TASKS["mnli"]) == ["0", "1", "2"]


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_content_and_order():
    base = [Example(("a", "b"), 0), Example(("c", "d"), 1), Example(("e", "f"), 1)]
    fp = fingerprint_examples(base)
    assert fp == fingerprint_examples(
        [Example(("a", "b"), 0), Example(("c", "d"), 1), Example(("e", "f"), 1)]
    )
    assert len(fp) == 16
    relabelled = [base[0], Example(("c", "d"), 0), base[2]]
    edited = [base[0], Example(("c", "d!"), 1), base[2]]
    reordered = [base[1], base[0], base[2]]
    shorter = base[:2]
    moved_text = [Example(("a", ""), 0), Example(("bc", "d"), 1), base[2]]
    fps = {fingerprint_examples(x) for x in (relabelled, edited, reordered, shorter, moved_text)}
    assert fp not in fps and len(fps) == 5
    assert fingerprint_examples([Example(("x",), 2.4)]) != fingerprint_examples(
        [Example(("x",), 2.6)]
    )


def test_task_fingerprint_is_of_the_split():
    data = _load("rte")
    assert data.fingerprint("test") == fingerprint_examples(data.splits["test"])
    assert len({data.fingerprint(s) for s in ("train", "validation", "test")}) == 3
