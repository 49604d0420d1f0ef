"""Crash safety (SIGKILL part way, then resume) and bad input: one line, exit 2, nothing committed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_store.errors import CacheError
from cache_store.registry import list_caches, open_cache
from tests.conftest import REPO

SMALL = ["--side-init", "", "--side-init-factors", ""]


def cli(*args: str, env: dict | None = None, preexec: str = "") -> subprocess.CompletedProcess:
    code = f"{preexec}\nfrom pipeline.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=600,
    )


def extract_args(root: Path, glue: Path, *extra: str) -> list[str]:
    return [
        "run", "extract", "--task", "sst2", "--data-dir", str(glue), "--limit", "120",
        "--cache-root", str(root), "--config", str(root.parent / "small.yaml"), *SMALL, *extra,
    ]  # fmt: skip


def write_small_config(tmp_path: Path) -> None:
    # small chunks so that a run has dozens of segments to be killed in between
    (tmp_path / "small.yaml").write_text("cache:\n  chunk_mb: 0.05\n  shard_chunks: 2\n")


def committed(root: Path) -> list[Path]:
    return list(root.glob("*/commit.json")) if root.exists() else []


def all_arrays(group: zarr.Group, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for name, node in group.members():
        if isinstance(node, zarr.Array):
            out[prefix + name] = node[...]
        else:
            out.update(all_arrays(node, prefix + name + "/"))
    return out


def flushed_tokens(root: Path) -> int:
    total = 0
    for p in root.glob("*/attempts/*/_progress/*.json"):
        try:
            total += sum(json.loads(p.read_text())["flushed"].values())
        except (json.JSONDecodeError, KeyError, OSError):
            pass
    return total


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, glue_dir):
    """The small extraction run once, uninterrupted: what every resumed run must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    write_small_config(tmp)
    root = tmp / "ref"
    assert cli(*extract_args(root, glue_dir)).returncode == 0
    return open_cache(str(root), committed(root)[0].parent.name)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.2, 0.6])
def test_sigkill_part_way_then_resume_gives_an_identical_cache(
    tmp_path, glue_dir, reference_cache, fraction
):
    """Killed once the attempt's progress records show ``fraction`` of the tokens on disk (fixed
    points, not random ones): some but not all rows are flushed, nothing is committed."""
    write_small_config(tmp_path)
    root = tmp_path / "killed"
    ref = reference_cache
    total = sum(s["streams"]["enc"]["n_tokens"] for s in ref.manifest["splits"].values())
    target = max(1, int(total * fraction))

    code = "from pipeline.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *extract_args(root, glue_dir)],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    seen = 0
    while (seen := flushed_tokens(root)) < target and proc.poll() is None:
        if time.time() > deadline:
            break  # killed below; the assertions say how far it got
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not committed(root), "the kill came after the commit"
    # some rows were on disk when the kill came, and not all of them
    assert target <= seen < total, f"killed with {seen} of {total} tokens flushed"
    assert flushed_tokens(root) < total
    key = ref.key
    assert [r["status"] for r in list_caches(str(root))] == ["incomplete"]
    with pytest.raises(CacheError, match="not committed yet"):
        open_cache(str(root), key)

    attempts = [p.name for p in (root / key / "attempts").iterdir() if p.is_dir()]
    resumed = cli(*extract_args(root, glue_dir))
    assert resumed.returncode == 0, resumed.stderr
    cache = open_cache(str(root), key)
    assert cache.manifest["attempt"] == f"attempts/{attempts[0]}", (
        "did not resume the killed attempt"
    )
    got, want = all_arrays(cache.group), all_arrays(ref.group)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_disk_full_is_one_line_nothing_committed_and_resumable(tmp_path, glue_dir):
    write_small_config(tmp_path)
    root = tmp_path / "cache"
    limit = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))"
    )
    out = cli(*extract_args(root, glue_dir), preexec=limit)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: no space left writing cache"), (
        out.stderr
    )
    assert out.stderr.strip().splitlines()[-1] == errors[0]  # after the progress bar, the error
    assert not committed(root)
    assert cli(*extract_args(root, glue_dir)).returncode == 0
    assert len(committed(root)) == 1


@pytest.fixture
def bad_glue(tmp_path, glue_dir):
    """A glue_data folder with a broken RTE (wrong columns) and an empty CoLA train split."""
    d = tmp_path / "glue"
    (d / "RTE").mkdir(parents=True)
    (d / "RTE" / "train.tsv").write_text("index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    (d / "RTE" / "dev.tsv").write_bytes((glue_dir / "RTE" / "dev.tsv").read_bytes())
    (d / "SST-2").mkdir()
    (d / "SST-2" / "train.tsv").write_text("sentence\tlabel\n")
    (d / "SST-2" / "dev.tsv").write_bytes((glue_dir / "SST-2" / "dev.tsv").read_bytes())
    return d


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "mnli2"], "unknown task 'mnli2'; allowed: cola, sst2"),
        (["--data-dir", "{tmp}/nowhere"], "data directory {tmp}/nowhere does not exist"),
        (["--task", "qnli"], "missing data file {glue}/QNLI/train.tsv"),
        (
            ["--data-dir", "{bad}", "--task", "rte"],
            "has the wrong columns: missing sentence1, sentence2",
        ),
        (["--data-dir", "{bad}", "--task", "sst2"], "split 'train' of task 'sst2' is empty"),
        (
            ["--backbone", "no-such-org/no-such-model"],
            "unknown backbone 'no-such-org/no-such-model'",
        ),
        (
            ["--layers", "0,7"],
            "layer index 7 is out of range for minilm-l6 (encoder): allowed 0 (embeddings) .. 6",
        ),
        (
            ["--dtype", "float64"],
            "'--dtype': 'float64' is not one of 'float32', 'float16', 'bfloat16', 'int8'",
        ),
        (["--cache-root", "{tmp}/afile/sub"], "cache root {tmp}/afile/sub is not writable"),
        (["--codec", "gzip"], "'--codec': 'gzip' is not one of 'raw', 'lz4', 'zstd'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_committed(
    tmp_path, glue_dir, bad_glue, capsys, args, message
):
    from pipeline.cli import run_cli

    (tmp_path / "afile").write_text("not a directory")
    fill = {"tmp": str(tmp_path), "glue": str(glue_dir), "bad": str(bad_glue)}
    args = [a.format(**fill) for a in args]
    root = tmp_path / "cache"
    base = [
        "run",
        "extract",
        "--task",
        "rte",
        "--data-dir",
        str(glue_dir),
        "--limit",
        "4",
        "--cache-root",
        str(root),
        *SMALL,
    ]
    code = run_cli([*base, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert message.format(**fill) in err[0]
    assert not committed(root)


def test_a_cache_from_an_incompatible_version_is_refused(tmp_path, glue_dir, capsys):
    from pipeline.cli import run_cli

    root = tmp_path / "cache"
    base = [
        "run",
        "extract",
        "--task",
        "rte",
        "--data-dir",
        str(glue_dir),
        "--limit",
        "3",
        "--cache-root",
        str(root),
        *SMALL,
    ]
    assert run_cli(base) == 0
    commit = committed(root)[0]
    meta = json.loads(commit.read_text())
    meta["format_version"] = 99
    commit.write_text(json.dumps(meta))
    capsys.readouterr()
    for cmd in (base, ["cache", "info", commit.parent.name, "--cache-root", str(root)]):
        assert run_cli(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert "written with cache format version 99; this lst-pipeline reads version 1" in err
