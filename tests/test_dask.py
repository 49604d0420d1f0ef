"""Stage one and sweeps on Dask: real LocalCluster worker processes, tiny backbones from folders.

The workers load the backbone by path, as they would on a real cluster, so the tiny models are
saved to folders first. Workers compute with one intra-op thread (Dask's nanny sets
OMP_NUM_THREADS=1), and the single-process references here run with one thread too: T5's
decoder states differ in the last bits between thread counts, in one process as much as on
Dask, so bit-identity is a claim about equal thread counts.
"""

from __future__ import annotations

import csv
import functools
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_store.registry import open_cache, verify_cache
from pipeline.cli import run_cli
from pipeline.config import apply_overrides
from stages.cluster import Cluster
from stages.extract import extract
from stages.extract_dask import DaskSegments
from stages.train_side import train_side
from tests import faults
from tests.conftest import make_config, tiny_bert, tiny_t5
from tests.test_resume_and_errors import all_arrays, committed


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_tokenizer) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    out = {}
    for name, build in (("bert", tiny_bert), ("t5", tiny_t5)):
        bb = build(minilm_tokenizer)
        bb.model.save_pretrained(base / name)
        minilm_tokenizer.save_pretrained(base / name)
        out[name] = base / name
    return out


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster of 2 worker processes, shared by the tests that do not kill workers."""
    with Cluster(workers=2) as c:
        c.n_workers()
        yield c


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_yaml(tmp_path: Path) -> Path:
    """make_config's small chunks (128-row shards of a d=32 float32 layer): many shared shards."""
    p = tmp_path / "small.yaml"
    p.write_text(
        "cache:\n  chunk_mb: 0.01\n  shard_chunks: 2\n"
        "extract:\n  batch_tokens: 512\n  side_init: []\n"
    )
    return p


def extract_args(tmp_path: Path, glue: Path, model: Path, root: Path, *extra: str) -> list[str]:
    return [
        "run", "extract", "--task", "rte", "--data-dir", str(glue), "--limit", "12",
        "--backbone", str(model), "--config", str(small_yaml(tmp_path)),
        "--cache-root", str(root), "--json", *extra,
    ]  # fmt: skip


def assert_same_cache(root_a: Path, root_b: Path) -> str:
    (ca,), (cb,) = committed(root_a), committed(root_b)
    assert ca.parent.name == cb.parent.name, "different keys"
    key = ca.parent.name
    a = all_arrays(open_cache(str(root_a), key).group)
    b = all_arrays(open_cache(str(root_b), key).group)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    return key


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_extract_on_two_workers_is_bit_identical_to_one_process(
    tmp_path, glue_dir, models, cluster, one_thread, capsys, family
):
    ref, dist = tmp_path / "ref", tmp_path / "dist"
    dtype = ["--dtype", "float32" if family == "t5" else "float16"]
    assert run_cli(extract_args(tmp_path, glue_dir, models[family], ref, *dtype)) == 0
    capsys.readouterr()
    address = cluster.client.scheduler.address
    args = extract_args(tmp_path, glue_dir, models[family], dist, *dtype, "--scheduler", address)
    assert run_cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    d = out["distributed"]
    # the work really was spread: several units on both workers, and shards shared between units
    assert d["workers"] == 2 and d["workers_used"] == 2 and d["units"] >= 4, d
    assert d["stitched_rows"] > 0, d
    key = assert_same_cache(ref, dist)
    assert out["key"] == key
    if family == "t5":  # the decoder streams (shards spanning many units) are there too
        assert "cand_1" in open_cache(str(dist), key).group["test"]
    assert verify_cache(str(dist), key)["ok"]


@pytest.mark.slow
def test_a_worker_killed_mid_extraction_is_retried_and_the_cache_verifies(
    tmp_path, glue_dir, models, one_thread, capsys
):
    ref = tmp_path / "ref"
    int8 = ["--dtype", "int8"]
    assert run_cli(extract_args(tmp_path, glue_dir, models["bert"], ref, *int8)) == 0
    trigger = tmp_path / "kill-a-worker"
    trigger.write_text("")
    cfg = make_config(
        tmp_path,
        glue_dir,
        **{
            "backbone.name": str(models["bert"]),
            "cache.dtype": "int8",
            "cache.root": str(tmp_path / "dist"),
        },
    )
    # the first unit to finish removes the file and kills its own worker process (os._exit)
    unit_task = functools.partial(faults.die_once_after_unit, str(trigger))
    with Cluster(workers=2) as cluster:
        result = extract(cfg, progress=False, runner=DaskSegments(cluster, unit_task=unit_task))
    assert not trigger.exists(), "no worker was killed"
    key = assert_same_cache(ref, tmp_path / "dist")
    assert result.key == key and not result.reused
    report = verify_cache(str(tmp_path / "dist"), key)
    assert report["ok"], report["problems"]
    assert open_cache(str(tmp_path / "dist"), key).manifest["distributed"]["units"] >= 4


def test_a_scheduler_that_does_not_answer_is_one_line_exit_2_nothing_committed(
    tmp_path, glue_dir, capsys
):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "cache"
    address = f"tcp://127.0.0.1:{port}"
    base = ["run", "extract", "--task", "rte", "--data-dir", str(glue_dir), "--limit", "4",
            "--cache-root", str(root), "--side-init", ""]  # fmt: skip
    assert run_cli([*base, "--scheduler", address, "--scheduler-timeout", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: scheduler {address} did not answer within 1.5s"]
    assert not committed(root)
    assert run_cli([*base, "--scheduler", address, "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give one of them" in err[0]


def test_a_sweep_trains_one_trial_per_task_and_gathers_one_table(
    tmp_path, glue_dir, models, cluster, capsys
):
    cfg = make_config(
        tmp_path,
        glue_dir,
        **{"backbone.name": str(models["bert"]), "cache.dtype": "float32", "task.limit": 12},
    )
    key = extract(cfg, progress=False).key
    runs = tmp_path / "runs"
    args = [
        "run", "train-side", "--task", "rte", "--backbone", str(models["bert"]),
        "--cache-root", cfg.cache_root, "--cache-key", key, "--run-dir", str(runs),
        "--run-name", "grid", "--reduction-factors", "2,4", "--learning-rates", "3e-3",
        "--seeds", "0", "--epochs", "1", "--batch-size", "4", "--warmup-steps", "2",
        "--init", "random", "--sweep", "--scheduler", cluster.client.scheduler.address, "--json",
    ]  # fmt: skip
    assert run_cli(args) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    folder = runs / "grid"
    assert out["sweep"] == str(folder) and out["cache"] == key
    assert [t["trial"] for t in out["trials"]] == ["r2-s0-lr0.003", "r4-s0-lr0.003"]
    saved = json.loads((folder / "sweep.json").read_text())
    with (folder / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == [t["trial"] for t in saved["trials"]]
    for t in out["trials"]:
        assert Path(t["run"]) == folder / t["trial"]
        metrics = json.loads((folder / t["trial"] / "metrics.json").read_text())
        assert list(metrics["networks"]) == [t["trial"]]
        assert t["worker"].startswith("tcp://")
    # a trial on a worker is the same training as in this process
    one = apply_overrides(
        cfg,
        {
            "train_side.reduction_factors": [4],
            "train_side.epochs": 1,
            "train_side.batch_size": 4,
            "train_side.warmup_steps": 2,
            "train_side.init": "random",
            "train_side.run_dir": str(tmp_path / "local"),
        },
    )
    local = train_side(one, cache_key=key, run_name="r4", progress=False)
    net = local.metrics["networks"]["r4-s0-lr0.003"]
    remote = saved["trials"][1]
    assert remote["validation"] == net["best_validation"]
    assert remote["test"] == net["test"]["score"]
    torch.testing.assert_close(
        torch.tensor([h["train_loss"] for h in remote["epochs"]]),
        torch.tensor([h["train_loss"] for h in net["epochs"]]),
        rtol=1e-5,
        atol=0,
    )


def test_units_write_disjoint_whole_shards_and_the_stitcher_fills_the_rest():
    """Random unit cuts, resume points and append sizes over a real sharded zarr array."""
    import random

    import zarr

    from stages.extract_dask import RangeWriter, Stitcher

    rng = random.Random(0)
    for _ in range(60):
        S = rng.choice([4, 8, 16])
        n = rng.randint(1, 200)
        flushed = min(n, S * rng.randint(0, 3)) if rng.random() < 0.3 else 0
        src = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
        arr = zarr.create_array(
            zarr.storage.MemoryStore(), shape=(n, 2), dtype="f4", chunks=(S // 2, 2),
            shards=(S, 2) if n > S // 2 else None, fill_value=-1,
        )  # fmt: skip
        if flushed:
            arr[:flushed] = src[:flushed]
        cuts = sorted({0, n, *(rng.randint(0, n) for _ in range(rng.randint(0, 6)))})
        stitcher = Stitcher({"x": arr}, n, S, flushed)
        owned = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            w = RangeWriter({"x": arr}, n, S, a, b, flushed)
            pos = a
            while pos < b:
                step = rng.randint(1, b - pos)
                w.append({"x": src[pos : pos + step]})
                pos += step
            if w.own is not None:
                lo, hi = w.own
                assert lo % S == 0 and (hi % S == 0 or hi == n) and a <= lo < hi <= b
                owned.append(w.own)
                stitcher.mark(lo, hi)
            for start, rows in w.merged_edges():
                assert start >= max(a, flushed)
                stitcher.add(start, rows)
        owned.sort()
        assert all(x[1] <= y[0] for x, y in zip(owned, owned[1:], strict=False))  # disjoint
        assert stitcher.complete and not stitcher.pending
        np.testing.assert_array_equal(arr[:], src)
