"""The layout names every array of a real cache; a cache that lost a chunk, its metadata or its
commit is refused with one line (issue 11, items 1, 2 and 5); readers need no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cache_store import layout
from cache_store.errors import CacheError
from cache_store.loader import CacheLoader
from cache_store.reader import open_cache, walk_arrays
from cache_store.registry import cache_info, list_caches, verify_cache
from stages.extract import extract
from tests.conftest import make_config, tiny_bert, tiny_t5


@pytest.fixture(scope="module")
def bert_int8(tmp_path_factory, glue_dir, minilm_tokenizer):
    tmp = tmp_path_factory.mktemp("bert_int8")
    cfg = make_config(
        tmp,
        glue_dir,
        **{
            "cache.dtype": "int8",
            "task.limit": 8,
            "extract.side_init": ["magnitude"],
            "extract.reduction_factors": [2],
        },
    )
    result = extract(cfg, backbone=tiny_bert(minilm_tokenizer), progress=False)
    return Path(cfg.cache_root), result.key, cfg


@pytest.fixture(scope="module")
def t5_cache(tmp_path_factory, glue_dir, minilm_tokenizer):
    tmp = tmp_path_factory.mktemp("t5")
    cfg = make_config(
        tmp,
        glue_dir,
        **{
            "cache.dtype": "bfloat16",
            "task.limit": 5,
            "extract.side_init": ["magnitude"],
            "extract.reduction_factors": [2],
        },
    )
    result = extract(cfg, backbone=tiny_t5(minilm_tokenizer), progress=False)
    return Path(cfg.cache_root), result.key


def copy_of(src: tuple, tmp_path: Path) -> tuple[str, str, Path]:
    """A private copy of a module cache (the tests damage it): root, key, attempt folder."""
    root, key = src[0], src[1]
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    attempt = json.loads((dst / key / "commit.json").read_text())["attempt"]
    return str(dst), key, dst / key / attempt


@pytest.mark.parametrize("which", ["bert_int8", "t5_cache"])
def test_the_layout_names_every_array_of_a_real_cache(which, request):
    root, key = request.getfixturevalue(which)[:2]
    cache = open_cache(str(root), key)
    m = cache.manifest
    found = {path for path, _ in walk_arrays(cache.group)}
    side_init = {p for p in found if p.startswith("side_init/")}
    assert side_init and all(
        any(p.startswith(pre + "/") for pre in layout.side_init_prefixes(m)) for p in side_init
    )
    assert found - side_init == layout.expected_arrays(m) | (layout.optional_arrays(m) & found)
    assert all(layout.is_layout_array(m, p) for p in found)
    assert set(m["inventory"]) == found  # the commit records every array
    if which == "bert_int8":
        assert layout.scale_path("train", "enc", 1) in found
        assert layout.token_type_ids_path("train") in found
    else:
        assert layout.frozen_path("lm_head") in found
        assert layout.state_path("validation", layout.cand_stream(1), 2) in found
        assert layout.target_ids_path("validation", "dec") in found


def test_a_missing_chunk_is_refused_at_open_not_read_as_zeros(bert_int8, tmp_path):
    root, key, base = copy_of(bert_int8, tmp_path)
    (base / "train/enc/layer_01/c/1/0").unlink()
    with pytest.raises(CacheError) as e:
        open_cache(root, key)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "train/enc/layer_01/c/1/0" in msg
    assert "pipeline cache verify" in msg and "cache rm" in msg
    problems = verify_cache(root, key)["problems"]
    assert problems == ["missing chunk train/enc/layer_01/c/1/0"]


def test_a_corrupt_chunk_read_by_the_loader_is_one_line_naming_it(bert_int8, tmp_path):
    root, key, base = copy_of(bert_int8, tmp_path)
    obj = base / "train/enc/layer_02/c/0/0"
    body = bytearray(obj.read_bytes())
    body[len(body) // 2] ^= 0xFF
    obj.write_bytes(bytes(body))
    loader = CacheLoader(open_cache(root, key), "train", {"enc": [2]}, batch_size=4, shuffle=False)
    with pytest.raises(CacheError) as e:
        list(loader.epoch(0))
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "chunk train/enc/layer_02/c/0/0" in msg
    assert "pipeline cache verify" in msg


def test_a_damaged_commit_is_damaged_never_absent_and_its_data_is_kept(
    bert_int8, tmp_path, minilm_tokenizer
):
    root, key, base = copy_of(bert_int8, tmp_path)
    commit = Path(root) / key / "commit.json"
    commit.write_bytes(commit.read_bytes()[:200])  # truncated
    size = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    [row] = list_caches(root)
    assert row["status"] == "damaged" and f"pipeline cache rm {key}" in row["fix"]
    for call in (open_cache, cache_info, verify_cache):
        with pytest.raises(CacheError, match="is damaged") as e:
            call(root, key)
        assert "\n" not in str(e.value) and f"pipeline cache rm {key}" in str(e.value)
    cfg = bert_int8[2]
    from pipeline.config import apply_overrides

    again = apply_overrides(cfg, {"cache.root": root})
    with pytest.raises(CacheError, match="is damaged"):
        extract(again, backbone=tiny_bert(minilm_tokenizer), progress=False)
    assert base.is_dir() and sum(p.stat().st_size for p in base.rglob("*") if p.is_file()) == size
    assert [p.name for p in (Path(root) / key / "attempts").iterdir() if p.is_dir()] == [base.name]


def test_the_writer_never_takes_over_the_attempt_a_commit_names(bert_int8, tmp_path):
    from cache_store import store as st
    from cache_store.writer import CacheWriter

    root, key, base = copy_of(bert_int8, tmp_path)
    store = st.open_root(root, write=True)
    writer = CacheWriter.begin(store, root, key)
    try:
        assert writer.attempt != base.name
    finally:
        writer.release()


@pytest.mark.parametrize("damage", ["deleted", "garbled"])
def test_verify_names_missing_or_garbled_array_metadata(bert_int8, tmp_path, damage):
    root, key, base = copy_of(bert_int8, tmp_path)
    meta = base / "validation/enc/layer_03/zarr.json"
    if damage == "deleted":
        meta.unlink()
    else:
        meta.write_text('{"zarr_format": 3, "node_type": "arr')
    report = verify_cache(root, key)
    assert not report["ok"]
    want = "missing" if damage == "deleted" else "unreadable"
    assert report["problems"][0].startswith(
        f"{want} array metadata validation/enc/layer_03/zarr.json"
    )
    assert all("\n" not in p for p in report["problems"])
    if damage == "deleted":
        with pytest.raises(CacheError, match="validation/enc/layer_03/zarr.json is missing"):
            open_cache(root, key)


def test_a_cache_committed_without_an_inventory_still_opens(bert_int8, tmp_path):
    root, key, base = copy_of(bert_int8, tmp_path)
    commit = Path(root) / key / "commit.json"
    meta = json.loads(commit.read_text())
    del meta["inventory"]
    commit.write_text(json.dumps(meta))
    cache = open_cache(root, key)
    assert cache.array("train/offsets")[-1] > 0
    assert verify_cache(root, key)["ok"]


def test_readers_need_no_torch(bert_int8):
    root, key = bert_int8[:2]
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        import cache_store.reader, cache_store.loader, cache_store.registry
        cache = cache_store.reader.open_cache({str(root)!r}, {key!r})
        rows = cache.array("train/enc/layer_01")[0:5]
        assert rows.shape == (5, cache.manifest["backbone"]["d_model"])
        loader = cache_store.loader.CacheLoader(
            cache, "train", {{"enc": [1]}}, batch_size=4, shuffle=True
        )
        batch = next(iter(loader))
        assert batch.states["enc"][1].dtype.name == "float32"
        assert "torch" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m]}}
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_an_array_reopened_on_resume_gets_its_data_written(tmp_path):
    """A run killed between creating a small array and writing it (image_index, frozen arrays)
    must not commit the fill value: reopening with ``data`` writes it."""
    import numpy as np

    from cache_store import store as st
    from cache_store.writer import CacheWriter

    root = str(tmp_path / "cache")
    writer = CacheWriter.begin(st.open_root(root, write=True), root, "k-0")
    try:
        writer.create_array("train/image_index", (5,), "int32", chunk_rows=8)  # killed here
        idx = np.array([3, 1, 4, 1, 5], dtype=np.int32)
        again = writer.create_array("train/image_index", (5,), "int32", chunk_rows=8, data=idx)
        np.testing.assert_array_equal(again[...], idx)
    finally:
        writer.release()
