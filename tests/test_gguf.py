"""A GGUF file as ``--backbone``: one that is not a causal LM we support is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ladder.errors import LadderError


def write_gguf(path: Path, arch: str) -> Path:
    """A tiny GGUF file with the given ``general.architecture`` and one small tensor."""
    from gguf import GGUFWriter

    w = GGUFWriter(path, arch)
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_architecture_is_read_from_the_header(tmp_path):
    from ladder.backbones import gguf_architecture

    assert gguf_architecture(write_gguf(tmp_path / "m.gguf", "bert")) == "bert"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: write_gguf(p, "bert"), "is a GGUF file of architecture 'bert', not a causal LM"),
        (lambda p: p.write_bytes(b"not a gguf file"), "is not a readable GGUF file"),
        (lambda p: None, "no such GGUF file"),
    ],
)
def test_a_gguf_that_is_not_a_causal_lm_is_one_line(tmp_path, make, message):
    from ladder.backbones import GGUF_ARCHITECTURES, load_config_only

    path = tmp_path / "model.gguf"
    make(path)
    with pytest.raises(LadderError, match=message) as e:
        load_config_only(str(path))
    text = str(e.value)
    assert "\n" not in text
    assert "allowed: " in text and all(a in text for a in GGUF_ARCHITECTURES)


def test_the_cli_prints_one_error_line_and_exits_2(tmp_path, glue_dir, capsys, monkeypatch):
    from pipeline.cli import run_cli

    monkeypatch.setenv("LST_MODELS_DIR", str(tmp_path / "models"))
    path = write_gguf(tmp_path / "bert.gguf", "bert")
    args = ["run", "extract", "--task", "sst2", "--data-dir", str(glue_dir), "--limit", "4"]
    args += ["--cache-root", str(tmp_path / "cache"), "--backbone", str(path)]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: backbone ") and "architecture 'bert'" in err[0]
    assert "allowed: GGUF files of llama" in err[0]
    assert not (tmp_path / "models").exists()  # nothing converted
