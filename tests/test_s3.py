"""Caches on an object store: a real S3 server (moto's, on loopback, with authentication on).

Extract to ``s3://``, list/inspect/verify/remove there, pull and push with verification and the
commit written last, two processes racing on one key, leases of remote attempts, and bad remote
input (unreachable endpoint, missing bucket, wrong credentials) as one line with exit 2.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import s3fs
import zarr

from cache_store import store as st
from cache_store.errors import CacheError
from cache_store.manifest import provenance
from cache_store.registry import open_cache, verify_cache
from cache_store.writer import CacheWriter, Lease
from pipeline.cli import run_cli
from tests.conftest import make_config, tiny_bert
from tests.test_resume_and_errors import all_arrays

pytest_plugins = ("tests.s3_server",)  # the s3_server and s3_env fixtures

NO_SIDE_INIT = ["--side-init", "", "--side-init-factors", ""]


def commits(server, prefix: str) -> list[str]:
    return [k for k in server.keys(prefix + "/") if k.endswith("/commit.json")]


def cli_json(capsys, *args: str) -> object:
    capsys.readouterr()
    code = run_cli([*args, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_conditional_create_is_atomic_on_the_server(s3_env):
    root = s3_env.root
    store = st.open_root(root, write=True)
    assert st.conditional_create_supported(store)
    assert st.create_if_absent(store, "x/one", b"first")
    assert not st.create_if_absent(store, "x/one", b"second")
    assert st.get_bytes(store, "x/one") == b"first"

    # eight writers, each with its own store, race on one key: exactly one creates it
    stores = [st.open_root(root, write=True) for _ in range(8)]
    barrier = threading.Barrier(8)
    won: list[int] = []

    def race(i: int) -> None:
        barrier.wait()
        if st.create_if_absent(stores[i], "x/race", f"writer {i}".encode()):
            won.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert st.get_bytes(store, "x/race") == f"writer {won[0]}".encode()


def test_cli_extract_to_s3_then_ls_info_verify_pull_push_rm(s3_env, glue_dir, tmp_path, capsys):
    root, other = s3_env.sub("team"), s3_env.sub("mirror")
    args = ["run", "extract", "--task", "rte", "--data-dir", str(glue_dir), "--limit", "3"]
    args += ["--layers", "0,3,6", *NO_SIDE_INIT]
    out = cli_json(capsys, *args, "--cache-root", root)
    key = out["key"]
    assert not out["reused"] and out["root"] == root
    assert len(commits(s3_env.server, f"{s3_env.prefix}/team")) == 1

    rows = cli_json(capsys, "cache", "ls", "--cache-root", root)
    assert [r["key"] for r in rows] == [key]
    row = rows[0]
    assert row["status"] == "complete" and row["created_by"] == provenance()["created_by"]
    assert row["task"] == "rte" and row["backbone"] == "minilm-l6" and row["dtype"] == "float16"
    assert row["bytes"] > 0 and row["created_at"]
    info = cli_json(capsys, "cache", "info", key, "--cache-root", root)
    assert info["splits"]["train"]["n_examples"] == 3 and info["layers_stored"]["enc"] == [0, 3, 6]
    report = cli_json(capsys, "cache", "verify", key, "--cache-root", root)
    assert report["ok"] and report["objects"] > 0

    # pull: a local copy that is verified and committed, equal to a local extract of the same key
    local = tmp_path / "local"
    pulled = cli_json(capsys, "cache", "pull", key, "--cache-root", root, "--to", str(local))
    assert pulled["copied"] and pulled["bytes"] == row["bytes"]
    assert (local / key / "commit.json").is_file()
    ref = cli_json(capsys, *args, "--cache-root", str(tmp_path / "ref"))
    assert ref["key"] == key and not ref["reused"]
    got = all_arrays(open_cache(str(local), key).group)
    want = all_arrays(open_cache(str(tmp_path / "ref"), key).group)
    assert sorted(got) == sorted(want) and len(got) > 10
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    again = cli_json(capsys, "cache", "pull", key, "--cache-root", root, "--to", str(local))
    assert again["already_committed"] and not again["copied"]

    # push the local copy to another prefix: committed there and verified
    pushed = cli_json(capsys, "cache", "push", key, "--cache-root", str(local), "--to", other)
    assert pushed["copied"]
    assert verify_cache(other, key)["ok"]
    assert not [k for k in s3_env.server.keys(f"{s3_env.prefix}/mirror/") if ".lease-" in k]

    # rm on the object store: the commit goes first, then everything under the key
    assert run_cli(["cache", "rm", key, "--cache-root", root]) == 0
    assert s3_env.server.keys(f"{s3_env.prefix}/team/{key}/") == []
    capsys.readouterr()
    assert run_cli(["cache", "info", key, "--cache-root", root]) == 2
    assert "no cache" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_s3_cache(s3_server, glue_dir, tmp_path_factory, minilm_tokenizer):
    """One small committed cache on the server, shared by the tests that only read it."""
    from stages.extract import extract

    root = f"s3://{s3_server.bucket}/shared-{uuid.uuid4().hex[:8]}/src"
    tmp = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        for var, value in s3_server.env().items():
            mp.setenv(var, value)
        cfg = make_config(tmp, glue_dir, **{"cache.root": root, "task.limit": 6})
        result = extract(cfg, backbone=tiny_bert(minilm_tokenizer), progress=False)
    return cfg.cache_root, result.key


def _run_with_file_size_limit(args: list[str], limit: int, send) -> None:
    """``run_cli(args)`` in a forked process that may not write a file larger than ``limit``."""
    import contextlib
    import io
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_cli(args)
    send.send((code, err.getvalue()))


def test_an_interrupted_pull_commits_nothing_and_the_next_one_resumes(
    tiny_s3_cache, s3_env, tmp_path, capsys
):
    root, key = tiny_s3_cache
    local = tmp_path / "local"
    args = ["cache", "pull", key, "--cache-root", root, "--to", str(local)]
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run_with_file_size_limit, args=(args, 3000, send))
    proc.start()
    code, stderr = receive.recv()
    proc.join()
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left copying cache {key}")
    assert not (local / key / "commit.json").exists()
    partial = [p for p in (local / key).rglob("*") if p.is_file() and "/c/" in str(p)]
    assert partial, "the failed pull copied nothing: the resume below would prove nothing"
    capsys.readouterr()
    assert run_cli(["cache", "ls", "--cache-root", str(local), "--json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["incomplete"]
    with pytest.raises(CacheError, match="not committed yet"):
        open_cache(str(local), key)

    resumed = cli_json(capsys, "cache", "pull", key, "--cache-root", root, "--to", str(local))
    assert resumed["copied"] and resumed["objects"] < resumed["verified_objects"]
    assert verify_cache(str(local), key)["ok"]
    remote = open_cache(root, key)
    assert open_cache(str(local), key).manifest["attempt"] == remote.manifest["attempt"]


def test_a_corrupt_source_object_fails_the_pull_and_verify_names_it(
    tiny_s3_cache, s3_env, tmp_path, capsys
):
    root, key = tiny_s3_cache
    cache = open_cache(root, key)
    obj = f"{root.split('/', 3)[3]}/{key}/{cache.manifest['attempt']}/train/enc/layer_01/c/0/0"
    client, bucket = s3_env.server.client(), s3_env.server.bucket
    original = client.get_object(Bucket=bucket, Key=obj)["Body"].read()
    body = bytearray(original)
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=obj, Body=bytes(body))
    try:
        _pull_of_a_corrupt_cache_fails(root, key, tmp_path, capsys)
    finally:  # the shared cache is whole again for the other tests
        client.put_object(Bucket=bucket, Key=obj, Body=original)
    assert verify_cache(root, key)["ok"]


def test_a_missing_chunk_on_s3_is_refused_at_open_with_one_listing(tiny_s3_cache, s3_env):
    """Issue 11 #1: zarr reads a missing chunk as zeros; the commit's inventory refuses it."""
    root, key = tiny_s3_cache
    cache = open_cache(root, key)
    obj = f"{root.split('/', 3)[3]}/{key}/{cache.manifest['attempt']}/train/enc/layer_01/c/0/0"
    client, bucket = s3_env.server.client(), s3_env.server.bucket
    original = client.get_object(Bucket=bucket, Key=obj)["Body"].read()
    client.delete_object(Bucket=bucket, Key=obj)
    try:
        with pytest.raises(CacheError, match="missing chunk train/enc/layer_01/c/0/0") as e:
            open_cache(root, key)
        assert "\n" not in str(e.value) and "pipeline cache verify" in str(e.value)
    finally:  # the shared cache is whole again for the other tests
        client.put_object(Bucket=bucket, Key=obj, Body=original)
    assert open_cache(root, key).manifest["inventory"]


def _pull_of_a_corrupt_cache_fails(root: str, key: str, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert run_cli(["cache", "verify", key, "--cache-root", root, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [p.split(" (")[0] for p in report["problems"]] == [
        "corrupt chunk train/enc/layer_01/c/0/0"
    ]
    local = tmp_path / "local"
    assert run_cli(["cache", "pull", key, "--cache-root", root, "--to", str(local)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar, then one error
    errors = [line for line in err if line.startswith("error")]
    assert len(errors) == 1 and err[-1] == errors[0]
    assert "failed verification (corrupt chunk train/enc/layer_01/c/0/0" in errors[0]
    assert not (local / key / "commit.json").exists()


def _racer(cfg, backbone, barrier, out: str) -> None:
    """One writer of the race, in a forked process (imports and backbone come with the fork)."""
    import torch

    from stages.extract import extract

    torch.set_num_threads(1)
    barrier.wait(timeout=120)
    result = extract(cfg, backbone=backbone, progress=False)
    Path(out).write_text(json.dumps({"key": result.key, "reused": result.reused}))


@pytest.mark.slow
def test_two_processes_racing_on_one_key_one_commit_readers_never_see_partial_data(
    s3_env, glue_dir, tmp_path, minilm_tokenizer
):
    root = s3_env.sub("race")
    over = {"cache.root": root, "task.limit": 8, "extract.layers": [0, 3]}
    cfg = make_config(tmp_path, glue_dir, **over)
    backbone = tiny_bert(minilm_tokenizer)
    ctx = multiprocessing.get_context("fork")  # two OS processes, each with its own S3 client
    barrier = ctx.Barrier(3)
    outs = [tmp_path / f"result{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_racer, args=(cfg, backbone, barrier, str(o))) for o in outs]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)  # both start extracting now
    deadline = time.time() + 300

    # a reader polls while both write: "not committed yet" (or nothing yet), or a whole cache
    store = st.open_root(root, write=False)
    attempts_seen: set[str] = set()
    outcomes: dict[str, int] = {"nothing": 0, "not committed": 0, "committed": 0}
    verified = False
    while any(p.is_alive() for p in procs):
        assert time.time() < deadline, "racers did not finish"
        keys = [k for k in st.list_dir(store, "") if "." not in k]
        for key in keys:
            attempts_seen |= {a for a in st.list_dir(store, f"{key}/attempts/") if "." not in a}
        if not keys:
            outcomes["nothing"] += 1
            time.sleep(0.3)
            continue
        try:
            cache = open_cache(root, keys[0])
        except CacheError as e:
            assert "not committed yet" in str(e) and "\n" not in str(e)
            outcomes["not committed"] += 1
            time.sleep(0.3)
            continue
        outcomes["committed"] += 1
        if not verified:  # the committed cache is whole even while the other writer goes on
            assert verify_cache(root, cache.key)["ok"]
            verified = True
        time.sleep(0.3)

    for p in procs:
        p.join()
        assert p.exitcode == 0
    results = [json.loads(o.read_text()) for o in outs]
    key = results[0]["key"]
    assert results[1]["key"] == key
    assert sorted(r["reused"] for r in results) == [False, True], "exactly one commit wins"
    assert len(attempts_seen) == 2, f"both processes should have written ({attempts_seen})"
    assert outcomes["not committed"] > 0, outcomes
    assert len(commits(s3_env.server, f"{s3_env.prefix}/race")) == 1
    cache = open_cache(root, key)
    assert verify_cache(root, key)["ok"]
    left = s3_env.server.keys(f"{s3_env.prefix}/race/{key}/attempts/")
    winner = cache.manifest["attempt"].removeprefix("attempts/")
    assert {k.split("/attempts/")[1].split("/")[0] for k in left} <= {winner, "zarr.json"}, left


@pytest.mark.slow
def test_a_live_lease_is_respected_and_a_dead_one_taken_over(s3_env, monkeypatch):
    monkeypatch.setenv("LST_LEASE_TTL_S", "1")
    root = s3_env.root
    store = st.open_root(root, write=True)
    a = CacheWriter.begin(store, root, "k")
    b = CacheWriter.begin(store, root, "k")
    assert b.attempt != a.attempt  # a is alive (renewed every 0.25 s): not taken over
    time.sleep(1.3)
    c = CacheWriter.begin(store, root, "k")
    assert c.attempt not in (a.attempt, b.attempt), "a live attempt was taken over"
    b.release()  # b gives its attempt up (as a failed run does): free for the next writer
    d = CacheWriter.begin(store, root, "k")
    assert d.attempt == b.attempt

    # a dies: its lease is no longer renewed (as when its process is killed)
    lease_a = a._lock
    assert isinstance(lease_a, Lease)
    lease_a._stop.set()
    lease_a._thread.join()
    time.sleep(1.3)
    e = CacheWriter.begin(store, root, "k")
    assert e.attempt == a.attempt
    names = st.list_dir(store, "k/attempts/")
    assert Lease.generations(names, a.attempt) == [1]
    lease_a.renew()  # the stalled owner wakes up: it has lost the attempt and stops
    with pytest.raises(CacheError, match="another writer took over attempt"):
        a.save_progress("train", {"created": True})

    assert e.commit({"splits": {}})
    assert not d.commit({"splits": {}}) and not c.commit({"splits": {}})
    assert st.get_json(store, "k/commit.json")["attempt"] == f"attempts/{a.attempt}"
    assert [n for n in st.list_dir(store, "k/attempts/") if "." not in n] == [a.attempt]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unreachable", "cannot reach the object store of cache root"),
        ("no bucket", "bucket 'lst-no-such-bucket' of cache root"),
        ("wrong secret", "access denied to cache root"),
        ("unknown key", "access denied to cache root"),
    ],
)
def test_bad_remote_input_is_one_line_exit_2_and_nothing_committed(
    s3_env, glue_dir, capsys, monkeypatch, case, message
):
    root = s3_env.sub("bad")
    if case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    elif case == "no bucket":
        root = "s3://lst-no-such-bucket/x"
    elif case == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    extract = ["run", "extract", "--task", "rte", "--data-dir", str(glue_dir), "--limit", "2"]
    for args in (
        [*extract, *NO_SIDE_INIT, "--cache-root", root],
        ["cache", "ls", "--cache-root", root],
        ["cache", "pull", "somekey", "--cache-root", root, "--to", "/tmp/lst-never"],
    ):
        capsys.readouterr()
        t0 = time.perf_counter()
        code = run_cli(args)
        elapsed = time.perf_counter() - t0
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert elapsed < 30, f"{case}: {args[:2]} took {elapsed:.0f}s to fail"
    assert commits(s3_env.server, f"{s3_env.prefix}/bad") == []
    assert not Path("/tmp/lst-never").exists()


def test_endpoint_and_credentials_from_storage_options_alone(s3_env, tmp_path, capsys, monkeypatch):
    server = s3_env.server
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    config = tmp_path / "pipeline.yaml"
    options = {
        "key": server.key,
        "secret": server.secret,
        "client_kwargs": {"endpoint_url": server.endpoint},
    }
    config.write_text(json.dumps({"cache": {"storage_options": options}}))
    assert (
        cli_json(capsys, "cache", "ls", "--config", str(config), "--cache-root", s3_env.root) == []
    )
    store = st.open_root(s3_env.root, options, write=True)
    st.set_json(store, "probe.json", {"ok": 1})
    assert server.keys(f"{s3_env.prefix}/") == [f"{s3_env.prefix}/probe.json"]


def test_plain_zarr_and_s3fs_read_a_cache_on_s3(tiny_s3_cache, s3_env):
    root, key = tiny_s3_cache
    expected = open_cache(root, key).array("validation/enc/layer_02")[:]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and credentials: the environment
    commit = json.loads(fs.cat_file(f"{root.removeprefix('s3://')}/{key}/commit.json"))
    group = zarr.open_group(f"{root}/{key}/{commit['attempt']}", mode="r")
    off = group["validation/offsets"][:]
    x = group["validation/enc/layer_02"][:]
    assert x.shape == (off[-1], commit["backbone"]["d_model"])
    np.testing.assert_array_equal(x, expected)
