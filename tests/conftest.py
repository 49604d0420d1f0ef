"""Shared fixtures: real GLUE files, the packaged MiniLM, and tiny random backbones from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import pipeline  # noqa: F401 - sets OMP_WAIT_POLICY before torch starts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    assert GLUE.is_dir(), f"GLUE files expected at {GLUE} (shared/ beside the repo)"
    return GLUE


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from ladder.backbones import packaged_minilm

    return AutoTokenizer.from_pretrained(packaged_minilm())


def tiny_bert(tokenizer, seed: int = 0, layers: int = 3):
    import torch
    from transformers import BertConfig, BertModel

    from ladder.backbones import from_model

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    return from_model("tiny-bert", "", BertModel(cfg, add_pooling_layer=False), tokenizer)


def tiny_t5(tokenizer, seed: int = 0):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from ladder.backbones import from_model

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return from_model("tiny-t5", "", T5ForConditionalGeneration(cfg), tokenizer)


def tiny_bart(tokenizer, seed: int = 0):
    import torch
    from transformers import BartConfig, BartModel

    from ladder.backbones import from_model

    torch.manual_seed(seed)
    cfg = BartConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    return from_model("tiny-bart", "", BartModel(cfg), tokenizer)


# a short run of small batches from random init: what the tests on tiny backbones train
SHORT_RUN = {
    "train_side.init": "random",
    "train_side.epochs": 2,
    "train_side.batch_size": 4,
    "train_side.warmup_steps": 2,
}


def make_config(tmp_path: Path, glue: Path, **overrides):
    """A Config on the real GLUE files with a cache root in tmp_path; small chunks, no side_init."""
    from pipeline.config import Config, apply_overrides

    base = {
        "task.name": "rte",
        "task.data_dir": str(glue),
        "task.limit": 12,
        "cache.root": str(tmp_path / "cache"),
        "cache.chunk_mb": 0.01,
        "cache.shard_chunks": 2,
        "extract.side_init": [],
        "extract.batch_tokens": 512,
    }
    base.update(overrides)
    return apply_overrides(Config(), base)


def tiny_llama(tokenizer, seed: int = 0, layers: int = 2, lm_head: bool = False):
    """A tiny random Llama (grouped KV heads: 4 query heads over 2 key-value heads); with
    ``lm_head`` a ``LlamaForCausalLM`` (its own LM head, for generation tasks)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    from ladder.backbones import from_model

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg) if lm_head else LlamaModel(cfg)
    return from_model("tiny-llama", "", model, tokenizer)


def tiny_gpt2(tokenizer, seed: int = 0, layers: int = 2):
    """A tiny random GPT-2 (4 heads of 8 dims, d_ff = 4 d), dropout off as GPT2Config's 0.1 is."""
    import torch
    from transformers import GPT2Config, GPT2Model

    from ladder.backbones import from_model

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_embd=32,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return from_model("tiny-gpt2", "", GPT2Model(cfg), tokenizer)


TIMING = ("epoch_s", "compute_s")  # what differs between two runs of the same training


def assert_same_trajectories(alone, stacked) -> None:
    """Two train-side runs of the same networks (one by one, and stacked) end the same: losses
    (1e-5), test figures and best epoch; last weights (1e-5), random streams (bit for bit) and
    AdamW state of every network."""
    import torch

    for name, a in alone.metrics["networks"].items():
        s = stacked.metrics["networks"][name]
        la = torch.tensor([h["train_loss"] for h in a["epochs"]])
        ls = torch.tensor([h["train_loss"] for h in s["epochs"]])
        torch.testing.assert_close(ls, la, rtol=1e-5, atol=0)
        assert s["test"] == a["test"] and s["best_epoch"] == a["best_epoch"]
        last = f"checkpoints/{name}.last.pt"
        ca = torch.load(alone.folder / last, weights_only=False)
        cs = torch.load(stacked.folder / last, weights_only=False)
        for k in ca["net"]:
            torch.testing.assert_close(cs["net"][k], ca["net"][k], rtol=0, atol=1e-5, msg=k)
        assert torch.equal(cs["rng"], ca["rng"])  # the same draws, from the network's own stream
        assert ca["opt"]["state"][0]["step"] == cs["opt"]["state"][0]["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            for i, st in ca["opt"]["state"].items():
                torch.testing.assert_close(
                    cs["opt"]["state"][i][key], st[key], rtol=1e-4, atol=1e-7
                )


def strip_timing(obj):
    """``metrics.json`` (or a part of it) without its wall-clock figures, to compare two runs."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def assert_one_task_run_is_the_single(single, multi, task: str) -> None:
    """A task list of one task (``multi``) trained the one-task run (``single``) step for step:
    the same losses (1e-6), validation figures every epoch, best epoch and test figures."""
    import torch

    for name, a in single.metrics["networks"].items():
        b = multi.metrics["networks"][name]
        torch.testing.assert_close(
            torch.tensor([h["train_loss"] for h in b["epochs"]], dtype=torch.float64),
            torch.tensor([h["train_loss"] for h in a["epochs"]], dtype=torch.float64),
            rtol=0,
            atol=1e-6,
        )
        assert [h["tasks"][task]["validation"] for h in b["epochs"]] == [
            h["validation"] for h in a["epochs"]
        ]
        assert b["test"][task] == a["test"] and b["best_epoch"] == a["best_epoch"]
