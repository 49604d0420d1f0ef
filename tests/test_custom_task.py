"""A ``custom`` task end to end: the user's CSV files -> cache -> side network -> evaluate, predict.

Regression: ``pipeline evaluate`` rebuilt the task from its name alone and failed on every custom
task ("task 'custom' needs task.files"); the task is now built from the run's saved task section
by the one builder (``stages.tasks.load_task_of``) that extraction uses too.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.cli import run_cli
from tests.conftest import tiny_bert

WORDS = {
    1: ["great", "good", "fine", "lovely", "superb"],
    0: ["bad", "awful", "poor", "dull", "ugly"],
}


def _write_split(path: Path, n: int, offset: int) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = (i + offset) % 2
            words = WORDS[label]
            w.writerow([f"a {words[i % 5]} and {words[(i + 2) % 5]} film", label])


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory, minilm_tokenizer) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("custom")
    model = tmp / "tiny-bert"
    bb = tiny_bert(minilm_tokenizer)
    bb.model.save_pretrained(model)
    minilm_tokenizer.save_pretrained(model)
    files = {}
    for split, n, offset in (("train", 40, 0), ("validation", 12, 1), ("test", 12, 0)):
        files[split] = tmp / f"{split}.csv"
        _write_split(files[split], n, offset)
    yaml = tmp / "custom.yaml"
    yaml.write_text(
        "task:\n  name: custom\n  text_columns: [text]\n  files:\n"
        + "".join(f"    {s}: {p}\n" for s, p in files.items())
        + f"backbone:\n  name: {model}\n"
        + f"cache:\n  root: {tmp / 'cache'}\n  dtype: float32\n"
        + "extract:\n  side_init: []\n"
        + f"train_side:\n  run_dir: {tmp / 'runs'}\n  init: random\n  epochs: 2\n"
        + "  batch_size: 8\n  warmup_steps: 2\n  reduction_factors: [4]\n"
    )
    assert run_cli(["run", "all", "--config", str(yaml), "--json"]) == 0
    (run,) = (tmp / "runs").iterdir()
    return {"run": run, "tmp": tmp}


def test_evaluate_a_custom_task_from_another_folder(custom_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the run folder, not the working directory, says where the data is
    capsys.readouterr()
    code = run_cli(["evaluate", "--run", str(custom_run["run"]), "--split", "test", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["split"] == "test" and 0 <= metrics["accuracy"] <= 100
    saved = json.loads((custom_run["run"] / "metrics.json").read_text())
    (net,) = saved["networks"].values()
    # the live backbone on the user's test file scores what training scored from the cache
    assert metrics["accuracy"] == pytest.approx(net["test"]["accuracy"], abs=1e-6)


def test_predict_a_custom_task(custom_run, capsys):
    capsys.readouterr()
    code = run_cli(["predict", "--run", str(custom_run["run"]), "a superb film", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["prediction"] in {"0", "1"}
