"""Stage one writes exactly the backbone's per-layer states, ragged, in a committed Zarr cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cache_store.layout import decode_numpy, layer_name, meta_prefix
from cache_store.registry import open_cache, verify_cache
from stages.extract import extract
from stages.tokens import plan_batches, plan_segments, tokenize_split
from tests.conftest import make_config, tiny_bart, tiny_bert, tiny_t5


def stored_rows(cache, split: str, stream: str, n: int, i: int) -> torch.Tensor:
    """Rows of example ``i`` of a stream and state, decoded to float32."""
    off = cache.array(f"{meta_prefix(split, stream)}/offsets")[i : i + 2]
    arr = cache.array(f"{split}/{stream}/{layer_name(n)}")
    scale = None
    if cache.manifest["dtype"] == "int8":
        scale = cache.array(f"{split}/{stream}/{layer_name(n)}_scale")[off[0] : off[1]]
    codes = arr[off[0] : off[1]]
    return torch.from_numpy(
        np.ascontiguousarray(decode_numpy(codes, scale, cache.manifest["dtype"]))
    )


def direct_states(backbone, ids: list[int], types: list[int] | None, dec: dict | None = None):
    """One example, unpadded, straight through the backbone."""
    x = torch.tensor([ids])
    kw = {}
    if types is not None:
        kw["token_type_ids"] = torch.tensor([types])
    if dec is not None:
        kw["decoder_inputs"] = {k: torch.tensor([v]) for k, v in dec.items()}
    return backbone.states(x, torch.ones_like(x), **kw)


@pytest.fixture(scope="module")
def bert_cache(tmp_path_factory, glue_dir, minilm_tokenizer):
    tmp = tmp_path_factory.mktemp("bert")
    backbone = tiny_bert(minilm_tokenizer)
    cfg = make_config(tmp, glue_dir, **{"cache.dtype": "float32"})
    result = extract(cfg, backbone=backbone, progress=False)
    return cfg, backbone, result


def test_every_row_equals_a_direct_unpadded_forward_float32(bert_cache):
    cfg, backbone, result = bert_cache
    cache = open_cache(cfg.cache_root, result.key)
    from stages.tasks import load_task

    data = load_task("rte", data_dir=cfg.task.data_dir, limit=cfg.task.limit)
    checked = 0
    for split in ("train", "validation", "test"):
        streams = tokenize_split(backbone, data, split, cfg.backbone.max_length)
        enc = streams["enc"]
        offsets = cache.array(f"{split}/offsets")[:]
        np.testing.assert_array_equal(offsets, enc.offsets)
        ids = cache.array(f"{split}/input_ids")[:]
        for i in range(len(enc.ids)):
            assert ids[offsets[i] : offsets[i + 1]].tolist() == enc.ids[i]
            want = direct_states(backbone, enc.ids[i], enc.token_types[i])["enc"]
            for n in range(backbone.n_layers + 1):
                got = stored_rows(cache, split, "enc", n, i)
                torch.testing.assert_close(got, want[n][0], rtol=1e-5, atol=1e-5)
                checked += 1
    assert checked == 3 * 12 * (backbone.n_layers + 1)


def test_offsets_labels_and_manifest_are_consistent(bert_cache):
    cfg, backbone, result = bert_cache
    cache = open_cache(cfg.cache_root, result.key)
    m = cache.manifest
    assert m["status"] == "complete" and m["layers_stored"] == {"enc": [0, 1, 2, 3]}
    for split, info in m["splits"].items():
        off = cache.array(f"{split}/offsets")[:]
        assert off[0] == 0 and np.all(np.diff(off) > 0)
        assert (
            off[-1]
            == info["streams"]["enc"]["n_tokens"]
            == cache.array(f"{split}/enc/layer_00").shape[0]
        )
        assert cache.array(f"{split}/labels").shape == (info["n_examples"],)
    assert verify_cache(cfg.cache_root, result.key)["ok"]


def test_same_inputs_reuse_the_cache_and_any_change_makes_a_new_key(bert_cache, tmp_path):
    cfg, backbone, result = bert_cache
    again = extract(cfg, backbone=backbone, progress=False)
    assert again.reused and again.key == result.key
    from pipeline.config import apply_overrides

    other = extract(
        apply_overrides(cfg, {"backbone.max_length": 16}), backbone=backbone, progress=False
    )
    assert not other.reused and other.key != result.key


@pytest.mark.parametrize(
    ("dtype", "rtol"), [("float16", 2**-10), ("bfloat16", 2**-7), ("int8", None)]
)
def test_reduced_dtypes_are_within_their_rounding(
    tmp_path, glue_dir, minilm_tokenizer, dtype, rtol
):
    backbone = tiny_bert(minilm_tokenizer)
    cfg = make_config(tmp_path, glue_dir, **{"cache.dtype": dtype, "task.limit": 4})
    result = extract(cfg, backbone=backbone, progress=False)
    cache = open_cache(cfg.cache_root, result.key)
    from stages.tasks import load_task

    data = load_task("rte", data_dir=cfg.task.data_dir, limit=4)
    enc = tokenize_split(backbone, data, "train", cfg.backbone.max_length)["enc"]
    for i in range(4):
        want = direct_states(backbone, enc.ids[i], enc.token_types[i])["enc"]
        for n in range(backbone.n_layers + 1):
            got, ref = stored_rows(cache, "train", "enc", n, i), want[n][0]
            if dtype == "int8":  # per-token absmax: error at most half a step of the row's scale
                step = ref.abs().amax(dim=-1, keepdim=True) / 127
                assert torch.all((got - ref).abs() <= step / 2 + 1e-6)
            else:
                torch.testing.assert_close(got, ref, rtol=rtol, atol=1e-6)


def test_t5_encoder_decoder_and_candidate_streams(tmp_path, glue_dir, minilm_tokenizer):
    backbone = tiny_t5(minilm_tokenizer)
    cfg = make_config(tmp_path, glue_dir, **{"cache.dtype": "float32", "task.limit": 5})
    result = extract(cfg, backbone=backbone, progress=False)
    cache = open_cache(cfg.cache_root, result.key)
    assert cache.manifest["layers_stored"] == {"enc": [0, 1, 2], "dec": [0, 1, 2]}
    assert cache.manifest["task"]["candidates"] == ["0", "1"]
    assert "lm_head" in cache.manifest["frozen"]
    torch.testing.assert_close(
        torch.from_numpy(cache.array("frozen/lm_head")[:]), backbone.model.lm_head.weight
    )
    from stages.tasks import load_task

    data = load_task("rte", data_dir=cfg.task.data_dir, limit=5)
    for split, streams_expected in (
        ("train", {"enc", "dec"}),
        ("test", {"enc", "dec", "cand_0", "cand_1"}),
    ):
        streams = tokenize_split(backbone, data, split, cfg.backbone.max_length)
        assert set(streams) == streams_expected
        for i in range(5):
            dec = {k: s.ids[i] for k, s in streams.items() if k != "enc"}
            want = direct_states(backbone, streams["enc"].ids[i], None, dec)
            for name in streams:
                for n in range(3):
                    got = stored_rows(cache, split, name, n, i)
                    torch.testing.assert_close(got, want[name][n][0], rtol=1e-5, atol=1e-5)
            # the decoder stream is teacher-forced on the target: inputs are targets shifted right
            tgt = cache.array(f"{split}/dec/target_ids")[:]
            off = cache.array(f"{split}/dec/offsets")[i : i + 2]
            assert tgt[off[0] : off[1]].tolist() == streams["dec"].targets[i]
            assert streams["dec"].ids[i] == [0, *streams["dec"].targets[i][:-1]]


def test_bart_encoder_states(tmp_path, glue_dir, minilm_tokenizer):
    backbone = tiny_bart(minilm_tokenizer)
    cfg = make_config(tmp_path, glue_dir, **{"cache.dtype": "float32", "task.limit": 4})
    cache = open_cache(cfg.cache_root, extract(cfg, backbone=backbone, progress=False).key)
    from stages.tasks import load_task

    data = load_task("rte", data_dir=cfg.task.data_dir, limit=4)
    enc = tokenize_split(backbone, data, "validation", cfg.backbone.max_length)["enc"]
    ref = backbone.model.encoder(input_ids=torch.tensor([enc.ids[2]]), output_hidden_states=True)
    for n in range(3):
        torch.testing.assert_close(
            stored_rows(cache, "validation", "enc", n, 2),
            ref.hidden_states[n][0],
            rtol=1e-5,
            atol=1e-5,
        )


def test_only_requested_layers_are_stored(tmp_path, glue_dir, minilm_tokenizer):
    backbone = tiny_bert(minilm_tokenizer)
    cfg = make_config(tmp_path, glue_dir, **{"extract.layers": [0, 2], "task.limit": 3})
    cache = open_cache(cfg.cache_root, extract(cfg, backbone=backbone, progress=False).key)
    assert sorted(cache.group["train/enc"].array_keys()) == ["layer_00", "layer_02"]


def test_plain_zarr_reads_the_cache_without_this_package(bert_cache, tmp_path):
    cfg, _, result = bert_cache
    cache = open_cache(cfg.cache_root, result.key)
    expected = cache.array("validation/enc/layer_02")[:]
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np, zarr
        root, key = {cfg.cache_root!r}, {result.key!r}
        commit = json.load(open(f"{{root}}/{{key}}/commit.json"))
        g = zarr.open_group(f"{{root}}/{{key}}/{{commit['attempt']}}", mode="r")
        off = g["validation/offsets"][:]
        x = g["validation/enc/layer_02"][:]
        assert x.shape == (off[-1], commit["backbone"]["d_model"])
        assert np.array_equal(x, np.load({str(tmp_path / "expected.npy")!r}))
        mods = [m for m in sys.modules if m.split(".")[0] in ("cache_store", "stages", "ladder", "pipeline")]
        assert not mods, mods
        print("ok", len(off) - 1)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "12"]


def test_plans_cover_every_example_once():
    offsets = np.concatenate([[0], np.cumsum([5, 9, 1, 30, 2, 2, 7, 64, 3])])
    seg = plan_segments(offsets, 16)
    assert seg[0] == 0 and seg[-1] == 9 and all(a < b for a, b in zip(seg, seg[1:], strict=False))
    lengths = [5, 9, 1, 30, 2, 2, 7, 64, 3]
    batches = plan_batches(lengths, batch_tokens=64, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(9))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= max(
            64, max(lengths[i] for i in b)
        )


def test_verify_names_a_corrupt_and_a_missing_chunk(tmp_path, glue_dir, minilm_tokenizer):
    backbone = tiny_bert(minilm_tokenizer)
    cfg = make_config(tmp_path, glue_dir, **{"task.limit": 8})
    key = extract(cfg, backbone=backbone, progress=False).key
    cache = open_cache(cfg.cache_root, key)
    base = tmp_path / "cache" / key / cache.manifest["attempt"]
    shard = base / "train/enc/layer_01/c/1/0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    (base / "test/enc/layer_03/c/0/0").unlink()
    report = verify_cache(cfg.cache_root, key)
    assert not report["ok"]
    assert any(p.startswith("corrupt chunk train/enc/layer_01/c/1/0") for p in report["problems"])
    assert "missing chunk test/enc/layer_03/c/0/0" in report["problems"]
    assert len(report["problems"]) == 2
    from pipeline.cli import run_cli

    assert run_cli(["cache", "verify", key, "--cache-root", cfg.cache_root, "--json"]) == 1


def test_cache_cli_ls_info_rm(bert_cache, tmp_path, capsys):
    cfg, _, result = bert_cache
    from pipeline.cli import run_cli

    assert run_cli(["cache", "ls", "--cache-root", cfg.cache_root, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["key"] == result.key)
    assert row["task"] == "rte" and row["dtype"] == "float32" and row["bytes"] > 0
    assert run_cli(["cache", "info", result.key, "--cache-root", cfg.cache_root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"]["train"]["n_examples"] == 12 and info["backbone"]["d_model"] == 32
    # rm on a copy, so the module's cache stays for the other tests
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cfg.cache_root, copy)
    assert run_cli(["cache", "rm", result.key, "--cache-root", str(copy)]) == 0
    assert not (copy / result.key).exists()
    assert run_cli(["cache", "info", result.key, "--cache-root", str(copy)]) == 2
    assert "no cache" in capsys.readouterr().err
