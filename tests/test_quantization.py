"""backbone.quantization (4bit / 8bit through bitsandbytes, CUDA only): the key and the errors.

No GPU here: loading a quantised backbone is not exercised. A ready-made backbone marked as
quantised stands in for one, to show what the key and the checks do with it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import get_args

import pytest
import torch

from cache_store.manifest import cache_key
from ladder.backbones import QUANTIZATIONS, check_quantization
from ladder.errors import LadderError
from pipeline.config import apply_overrides
from stages.config import Quantization
from stages.errors import StageError
from stages.extract import extract, key_inputs
from stages.tasks import load_task
from tests.conftest import make_config, tiny_bert, tiny_llama


def test_the_config_and_the_loader_allow_the_same_values():
    assert get_args(Quantization) == QUANTIZATIONS


@pytest.mark.parametrize("tiny", [tiny_bert, tiny_llama])
def test_configs_differing_only_in_quantization_get_different_keys(
    tmp_path, glue_dir, minilm_tokenizer, tiny
):
    plain = tiny(minilm_tokenizer)
    cfg = make_config(tmp_path, glue_dir, **{"task.limit": 4})
    data = load_task("rte", data_dir=cfg.task.data_dir, limit=4)
    keys = {}
    for q in ("none", "4bit", "8bit"):
        bb = replace(plain, quantization=None if q == "none" else q)
        c = apply_overrides(cfg, {"backbone.quantization": q})
        keys[q] = cache_key(key_inputs(c, bb, data, torch.float32))
    assert len(set(keys.values())) == 3
    # and through stage one itself: two committed caches side by side
    four = apply_overrides(cfg, {"backbone.quantization": "4bit"})
    a = extract(cfg, backbone=plain, data=data, progress=False)
    b = extract(four, backbone=replace(plain, quantization="4bit"), data=data, progress=False)
    assert (a.key, b.key) == (keys["none"], keys["4bit"])
    assert b.manifest["backbone"]["quantization"] == "4bit"


def test_cpu_extraction_with_4bit_is_one_line_exit_2_and_nothing_written(
    tmp_path, glue_dir, capsys
):
    from pipeline.cli import run_cli

    root = tmp_path / "cache"
    args = ["run", "extract", "--task", "rte", "--data-dir", str(glue_dir), "--limit", "4"]
    args += ["--cache-root", str(root), "--device", "cpu", "--quantization", "4bit"]
    code = run_cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        "error: backbone.quantization=4bit needs a CUDA GPU (bitsandbytes), but the backbone "
        "would run on cpu; allowed: quantization none on this machine"
    ]
    assert not root.exists()


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed"
)
def test_without_bitsandbytes_the_error_names_the_package():
    with pytest.raises(LadderError, match=r"needs the bitsandbytes package.*cuda4bit") as e:
        check_quantization("8bit", torch.device("cuda"))  # no CUDA needed to build a device
    assert "\n" not in str(e.value)


def test_a_quantised_extraction_computes_no_side_init(tmp_path, glue_dir, minilm_tokenizer):
    bb = replace(tiny_llama(minilm_tokenizer), quantization="4bit")
    cfg = make_config(
        tmp_path,
        glue_dir,
        **{"backbone.quantization": "4bit", "extract.side_init": ["magnitude"]},
    )
    with pytest.raises(
        StageError, match=r"needs the backbone's full-precision weights.*--side-init"
    ):
        extract(cfg, backbone=bb, progress=False)
    with pytest.raises(
        StageError, match="loaded with quantization 4bit, but backbone.quantization"
    ):
        extract(apply_overrides(cfg, {"backbone.quantization": "none"}), backbone=bb)
    assert not (tmp_path / "cache").exists()
