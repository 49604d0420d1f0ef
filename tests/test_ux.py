"""The first hour: predictions with probabilities and from files, experiment tracking, progress
lines and the training-curves figure (README, "The first hour")."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO

NETS = ("r8-s0-lr0.003", "r8-s1-lr0.003")
EPOCHS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory, glue_dir):
    """A MiniLM cache of RTE (24 examples a split, float32) extracted with its progress bars on,
    and a two-network run trained from it with --report-to tensorboard,mlflow and --json."""
    from pipeline.cli import run_cli

    tmp = tmp_path_factory.mktemp("ux")
    common = ["--task", "rte", "--data-dir", str(glue_dir), "--limit", "24"]
    common += ["--cache-root", str(tmp / "cache")]
    extract = ["run", "extract", *common, "--dtype", "float32", "--side-init-factors", "8"]
    extract += ["--side-init", "magnitude,fisher", "--fisher-samples", "6"]
    err = io.StringIO()
    old = sys.stderr
    sys.stderr = err  # tqdm writes to sys.stderr as it is when a bar is made
    try:
        assert run_cli(extract) == 0, err.getvalue()[-2000:]
    finally:
        sys.stderr = old
    train = ["run", "train-side", *common, "--epochs", str(EPOCHS), "--batch-size", "8"]
    train += ["--warmup-steps", "2", "--init", "magnitude", "--seeds", "0,1"]
    train += ["--run-dir", str(tmp / "runs"), "--report-to", "tensorboard,mlflow", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    code = "from pipeline.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, *train], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    folder = tmp / "runs" / os.path.basename(out["run"])
    return {
        "tmp": tmp,
        "common": common,
        "folder": folder,
        "metrics": json.loads((folder / "metrics.json").read_text()),
        "extract_err": err.getvalue(),
        "train_err": proc.stderr,
    }


# --- 7. predictions people can use ----------------------------------------------------------------


def test_predict_prints_the_label_and_its_probability(run, capsys):
    from pipeline.cli import run_cli
    from stages.evaluate import Predictor
    from stages.tasks import Example

    texts = ["A cat sat on the mat.", "A cat sat."]
    assert run_cli(["predict", "--run", str(run["folder"]), *texts]) == 0
    label, prob = capsys.readouterr().out.split()
    assert run_cli(["predict", "--run", str(run["folder"]), "--json", *texts]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["task"] == "rte" and row["prediction"] == label
    assert set(row["probabilities"]) == {"entailment", "not_entailment"}
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert row["probability"] == max(row["probabilities"].values())
    assert float(prob) == pytest.approx(row["probability"], abs=1e-3)
    # the probabilities are the softmax of the side network's logits, and agree with evaluate
    p = Predictor(run["folder"])
    logits = p.outputs([Example(tuple(texts), 0)])[0]
    want = torch.softmax(logits, -1).tolist()
    assert [row["probabilities"][n] for n in p.spec.labels] == pytest.approx(want, abs=1e-6)
    assert p.spec.labels[int(p.predict([Example(tuple(texts), 0)])[0])] == label
    # beams decode captions only: one line naming the task, exit 2
    assert run_cli(["predict", "--run", str(run["folder"]), "--num-beams", "3", *texts]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "beam search decodes captions; task 'rte'" in err


@pytest.fixture
def pairs():
    a = [
        "A man plays a guitar.",
        "It rains.",
        "The committee approved the budget after a long debate.",
    ]
    b = ["A man plays music.", "The sun shines brightly over the hills today.", "A budget."]
    return list(zip(a, b, strict=True))


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"sentence1": x, "sentence2": y, "id": i}) + "\n"
                                for i, (x, y) in enumerate(rows)))  # fmt: skip
    else:
        sep = "\t" if fmt == "tsv" else ","
        lines = [f"id{sep}sentence1{sep}sentence2"]
        lines += [f'{i}{sep}"{x}"{sep}"{y}"' if sep == "," else f"{i}\t{x}\t{y}"
                  for i, (x, y) in enumerate(rows)]  # fmt: skip
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "stdin"])
def test_predict_many_inputs_loads_the_backbone_once(
    run, pairs, tmp_path, capsys, monkeypatch, fmt
):
    import stages.evaluate
    from pipeline.cli import run_cli

    folder = str(run["folder"])
    single = []
    for x, y in pairs:
        assert run_cli(["predict", "--run", folder, "--json", x, y]) == 0
        single.append(json.loads(capsys.readouterr().out))
    loads = []
    real = stages.evaluate.load_backbone
    monkeypatch.setattr(
        stages.evaluate, "load_backbone", lambda *a, **k: loads.append(a) or real(*a, **k)
    )
    if fmt == "stdin":
        path = tmp_path / "in.jsonl"
        _write(path, pairs, "jsonl")
        monkeypatch.setattr(sys, "stdin", io.StringIO(path.read_text()))
        source = "-"
    else:
        path = tmp_path / f"in.{fmt}"
        _write(path, pairs, fmt)
        source = str(path)
    assert run_cli(["predict", "--run", folder, "--input", source, "--json"]) == 0
    cap = capsys.readouterr()
    rows = [json.loads(line) for line in cap.out.splitlines()]
    assert len(loads) == 1
    assert [r["prediction"] for r in rows] == [s["prediction"] for s in single]
    for r, s in zip(rows, single, strict=True):  # batching (sorted by length) keeps the order
        assert r["probability"] == pytest.approx(s["probability"], abs=1e-5)
    assert re.search(r"predicted 3 examples in [\d.]+s \([\d.]+ examples/s", cap.err)


def test_predict_table_and_input_errors(run, pairs, tmp_path, capsys):
    from pipeline.cli import run_cli

    folder = str(run["folder"])
    path = tmp_path / "in.jsonl"
    _write(path, pairs, "jsonl")
    assert run_cli(["predict", "--run", folder, "--input", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["#", "prediction", "probability", "text"] and len(out) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"premise": "x", "hypothesis": "y"}) + "\n")
    assert run_cli(["predict", "--run", folder, "--input", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no 'sentence1', 'sentence2'" in err[0] and "premise" in err[0]
    assert run_cli(["predict", "--run", folder]) == 2
    assert "--input" in capsys.readouterr().err
    assert run_cli(["predict", "--run", folder, "--input", str(path), "a", "b"]) == 2
    assert run_cli(["predict", "--run", folder, "only one text"]) == 2
    assert "takes 2 text(s)" in capsys.readouterr().err


def _stub_predictor(spec, candidates, outputs):
    from stages.evaluate import Predictor

    p = Predictor.__new__(Predictor)
    p.spec, p.candidates = spec, candidates
    p.outputs = lambda examples, batch_size=64, progress=None: outputs
    return p


def test_t5_probabilities_are_the_softmax_over_candidate_scores_and_regression_gives_a_score():
    from stages.tasks import Example, get_task, t5_candidates

    rte = get_task("rte")
    scores = torch.tensor([[-0.5, -2.0], [-3.0, -0.1]])  # summed log-probabilities of "0", "1"
    rows = _stub_predictor(rte, t5_candidates(rte), scores).explain([Example(("a", "b"), 0)] * 2)
    want = torch.softmax(scores, -1)
    assert rows[0]["prediction"] == rte.labels[0] and rows[1]["prediction"] == rte.labels[1]
    assert rows[0]["probabilities"][rte.labels[0]] == pytest.approx(float(want[0, 0]))
    assert rows[1]["probability"] == pytest.approx(float(want[1, 1]))
    stsb = get_task("stsb")
    cands = t5_candidates(stsb)
    s = torch.full((1, len(cands)), -9.0)
    s[0, cands.index("3.4")] = -0.2
    (row,) = _stub_predictor(stsb, cands, s).explain([Example(("a", "b"), 0.0)])
    assert row == {"prediction": "3.400", "score": pytest.approx(3.4)}
    (row,) = _stub_predictor(stsb, None, torch.tensor([[2.25]])).explain([Example(("a", "b"), 0)])
    assert row["score"] == pytest.approx(2.25) and "probability" not in row


# --- 8. experiment tracking ------------------------------------------------------------------------


def test_tensorboard_logs_every_network_as_metrics_json_has_it(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, metrics = run["folder"], run["metrics"]
    assert sorted(p.name for p in (folder / "tensorboard").iterdir()) == sorted(NETS)
    for name in NETS:
        acc = EventAccumulator(str(folder / "tensorboard" / name))
        acc.Reload()
        net = metrics["networks"][name]
        scores = [e.value for e in acc.Scalars("eval/score")]
        assert scores == pytest.approx([h["validation"]["score"] for h in net["epochs"]], abs=1e-4)
        acc_vals = [e.value for e in acc.Scalars("eval/accuracy")]
        assert acc_vals == pytest.approx(
            [h["validation"]["accuracy"] for h in net["epochs"]], abs=1e-4
        )
        epoch_loss = [e.value for e in acc.Scalars("train/epoch_loss")]
        assert epoch_loss == pytest.approx([h["train_loss"] for h in net["epochs"]], rel=1e-5)
        steps = acc.Scalars("train/loss")
        per_epoch = len(steps) // EPOCHS
        assert per_epoch == 3  # 24 examples, batch 8
        for k, h in enumerate(net["epochs"]):
            mean = np.mean([e.value for e in steps[k * per_epoch : (k + 1) * per_epoch]])
            assert mean == pytest.approx(h["train_loss"], rel=1e-5)
        lrs = [e.value for e in acc.Scalars("train/learning_rate")]
        assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3, rel=1e-6)  # warm-up of 2 steps
        assert [e.step for e in steps] == list(range(1, 2 * per_epoch + 1))


def test_mlflow_logs_a_nested_run_per_network(run):
    from mlflow.tracking import MlflowClient

    folder, metrics = run["folder"], run["metrics"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(f"file:{folder / 'mlruns'}")
    exp = client.get_experiment_by_name("lst-pipeline")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["mlflow.runName"]: r for r in runs if r not in parents}
    assert len(parents) == 1 and set(children) == set(NETS)
    parent = parents[0].info.run_id
    for name, r in children.items():
        assert r.data.tags["mlflow.parentRunId"] == parent
        assert r.data.params["task.name"] == "rte"
        assert r.data.params["train_side.seeds"] == "[0, 1]"
        net = metrics["networks"][name]
        hist = client.get_metric_history(r.info.run_id, "eval/score")
        assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(
            [h["validation"]["score"] for h in net["epochs"]]
        )
        loss = client.get_metric_history(r.info.run_id, "train/loss")
        assert len(loss) == 3 * EPOCHS
        assert r.info.status == "FINISHED"


def test_secrets_are_not_sent_to_trackers():
    from stages.runfiles import redact_config
    from stages.tracking import flatten

    cfg = {"cache": {"storage_options": {"secret": "s3cr3t", "endpoint_url": "http://x"}}}
    flat = flatten(redact_config(cfg))
    assert "s3cr3t" not in json.dumps(flat)


def test_a_missing_tracker_package_is_one_error_line_naming_the_extra(run, capsys, monkeypatch):
    from pipeline.cli import run_cli

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    args = ["run", "train-side", *run["common"], "--epochs", "1", "--init", "magnitude"]
    args += ["--run-dir", str(run["tmp"] / "missing"), "--report-to", "mlflow", "--json"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "lst-pipeline[tracking]" in err[0]
    assert not (run["tmp"] / "missing").exists()


def test_a_run_without_tracking_imports_neither_library(run):
    args = ["run", "train-side", *run["common"], "--epochs", "1", "--init", "magnitude"]
    args += ["--run-dir", str(run["tmp"] / "plain"), "--json"]
    code = (
        "import sys; from pipeline.cli import run_cli; rc = run_cli(sys.argv[1:]); "
        "print(rc, 'mlflow' in sys.modules, 'tensorboard' in sys.modules, "
        "'torch.utils.tensorboard' in sys.modules, file=sys.stderr)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.stderr.strip().splitlines()[-1] == "0 False False False", proc.stderr
    assert not (next((run["tmp"] / "plain").iterdir()) / "tensorboard").exists()


def test_report_to_is_validated_and_not_part_of_the_run_signature(tmp_path, glue_dir):
    from pipeline.config import apply_overrides
    from pipeline.errors import PipelineError
    from stages.train_side import run_signature
    from tests.conftest import make_config

    cfg = make_config(tmp_path, glue_dir)
    with pytest.raises(PipelineError, match="report_to.*'tensorboard', 'mlflow' or 'none'"):
        apply_overrides(cfg, {"train_side.report_to": ["wandb"]})
    tracked = apply_overrides(cfg, {"train_side.report_to": ["tensorboard", "mlflow"]})
    assert run_signature(cfg, "k", None) == run_signature(tracked, "k", None)


# --- 9. progress and plots -------------------------------------------------------------------------


def test_progress_bars_say_what_they_are_and_show_a_rate(run):
    err = run["extract_err"]
    assert "extract: backbone states of rte (train)" in err
    assert "extract: backbone states of rte (test)" in err and "tok/s" in err
    assert "side_init: Fisher pass over 6 examples" in err and "ex/s" in err
    assert "side_init: pruning for r=8 (fisher)" in err


def test_train_side_bar_names_the_epoch(run, capsys):
    from pipeline.cli import run_cli

    args = ["run", "train-side", *run["common"], "--epochs", "2", "--init", "magnitude"]
    args += ["--batch-size", "8", "--run-dir", str(run["tmp"] / "bars")]
    old, err = sys.stderr, io.StringIO()
    sys.stderr = err
    try:
        assert run_cli(args) == 0
    finally:
        sys.stderr = old
    bars = err.getvalue()
    assert "train-side: epoch 1/2" in bars and "train-side: epoch 2/2" in bars
    assert "batch/s" in bars
    out = capsys.readouterr().out  # without --json the epoch lines go to stdout
    assert len([ln for ln in out.splitlines() if ln.startswith("epoch ")]) == 2


LINE = re.compile(
    r"^epoch (\d+)/(\d+)  (r8-s\d-lr0\.003)  loss (\d+\.\d{3})  val accuracy (\d+\.\d)  "
    r"\(best (\d+\.\d) @(\d+)\)  (\d+\.\d)s$"
)


def test_one_line_per_network_per_epoch(run):
    lines = [ln for ln in run["train_err"].splitlines() if ln.startswith("epoch ")]
    assert len(lines) == len(NETS) * EPOCHS
    best: dict[str, tuple[float, int]] = {}
    for k, ln in enumerate(lines):
        m = LINE.match(ln)
        assert m, ln
        epoch, total, name = int(m[1]), int(m[2]), m[3]
        assert (epoch, total, name) == (k // len(NETS) + 1, EPOCHS, NETS[k % len(NETS)])
        h = run["metrics"]["networks"][name]["epochs"][epoch - 1]
        assert float(m[4]) == pytest.approx(h["train_loss"], abs=5e-4)
        assert float(m[5]) == pytest.approx(h["validation"]["score"], abs=0.05)
        if name not in best or h["validation"]["score"] > best[name][0]:
            best[name] = (h["validation"]["score"], epoch)
        assert (float(m[6]), int(m[7])) == (pytest.approx(best[name][0], abs=0.05), best[name][1])
    for name, (_, epoch) in best.items():
        assert run["metrics"]["networks"][name]["best_epoch"] == epoch


def test_the_majority_line_is_the_validation_split_s_most_frequent_label(run, glue_dir):
    from cache_store.reader import open_cache
    from stages.tasks import TaskConfig, load_task_of
    from stages.train_side import majority_class, task_spec_of

    root = run["tmp"] / "cache"
    cache = open_cache(str(root), next(p.name for p in root.iterdir() if p.is_dir()))
    data = load_task_of(TaskConfig(name="rte", data_dir=str(glue_dir), limit=24))
    labels = [ex.label for ex in data.splits["validation"]]
    share = 100 * max(labels.count(v) for v in set(labels)) / len(labels)
    assert majority_class(cache, task_spec_of(cache))["score"] == pytest.approx(share)
    assert run["metrics"]["majority_class"]["score"] == pytest.approx(share)  # what the PNG draws
    assert (run["folder"] / "training-curves.png").stat().st_size > 10_000


def _networks(n, epochs=3, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        hist = [
            {"epoch": e + 1, "train_loss": 0.69 - 0.001 * e + 1e-4 * rng.random(),
             "validation": {"score": 60 + 0.1 * e + i, "accuracy": 60 + 0.1 * e + i}}
            for e in range(epochs)
        ]  # fmt: skip
        out[f"r8-s{i}-lr0.003"] = {
            "epochs": hist, "best_epoch": epochs, "best_validation": hist[-1]["validation"]["score"],
            "test": {"score": 58.0 + i, "accuracy": 58.0 + i},
        }  # fmt: skip
    return out


@pytest.mark.parametrize(("n", "axes"), [(1, 2), (4, 2), (5, 10), (6, 12)])
def test_curves_figure_panels(n, axes):
    import matplotlib.pyplot as plt

    from stages.train_side import curves_figure

    nets = _networks(n)
    fig = curves_figure(nets, "sst2", "accuracy", majority=55.8)
    try:
        assert len(fig.axes) == axes
        val_axes = [ax for ax in fig.axes if ax.get_ylabel().startswith("val") or
                    any(ln.get_linestyle() == "--" and ln.get_label().startswith("majority")
                        for ln in ax.get_lines())]  # fmt: skip
        majority = [ln for ax in fig.axes for ln in ax.get_lines()
                    if ln.get_label().startswith("majority")]  # fmt: skip
        assert majority and all(ln.get_linestyle() == "--" for ln in majority)
        assert all(ln.get_ydata()[0] == pytest.approx(55.8) for ln in majority)
        legends = [t.get_text() for ax in fig.axes if ax.get_legend()
                   for t in ax.get_legend().get_texts()]  # fmt: skip
        assert "majority class (55.8)" in legends and "its test score" in legends
        if n <= 4:  # one legend entry per network
            assert all(name in legends for name in nets)
        else:  # small multiples: a panel per network, named
            titles = {ax.get_title() for ax in fig.axes}
            assert set(nets) <= titles
        # the test score of each kept checkpoint is marked
        diamonds = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_marker() == "D"]
        assert sorted(float(ln.get_ydata()[0]) for ln in diamonds) == [58.0 + i for i in range(n)]
        # axes do not turn noise into drama
        for ax in val_axes:
            lo, hi = ax.get_ylim()
            assert hi - lo >= 10
        loss_axes = [ax for ax in fig.axes if ax not in val_axes]
        assert loss_axes
        for ax in loss_axes:
            lo, hi = ax.get_ylim()
            assert hi - lo >= 0.05 * 0.69
    finally:
        plt.close(fig)


def test_regression_has_no_majority_line():
    import matplotlib.pyplot as plt

    from stages.train_side import curves_figure

    fig = curves_figure(_networks(2), "stsb", "pearson_spearman", majority=None)
    assert not [ln for ax in fig.axes for ln in ax.get_lines() if "majority" in ln.get_label()]
    assert math.isfinite(fig.axes[1].get_ylim()[0])
    plt.close(fig)
