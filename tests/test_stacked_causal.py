"""Causal side networks with the classification head (Llama family with grouped KV heads, GPT-2)
trained as one stacked model follow the trajectories they follow alone: each network's own
dropout masks, the same losses and weights to float rounding. Head "lm" and fusion "xladder"
are not stacked and still train."""

from __future__ import annotations

import pytest
import torch

from ladder.side import SideConfig, build_side_network
from ladder.stacked import StackedCausalSide, stack_networks, stackable
from pipeline.config import apply_overrides
from stages.extract import extract
from stages.train_side import train_side
from tests.conftest import SHORT_RUN, make_config, strip_timing


def tiny_causal(family: str, tokenizer, dropout: float = 0.0):
    """A tiny random Llama (4 query heads over 2 key-value heads) or GPT-2, with ``dropout`` on
    its attention (and GPT-2's residual) dropout: what the side network copies."""
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    from ladder.backbones import from_model

    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            attention_dropout=dropout,
        )
        return from_model("tiny-llama", "", LlamaModel(cfg), tokenizer)
    cfg = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        resid_pdrop=dropout,
        embd_pdrop=0.0,
        attn_pdrop=dropout,
    )
    return from_model("tiny-gpt2", "", GPT2Model(cfg), tokenizer)


def _nets(config, fusion: str, K: int = 3, ladder_dropout: float = 0.2):
    side = SideConfig(
        reduction_factor=2, num_labels=3, fusion=fusion, ladder_dropout=ladder_dropout
    )
    nets = []
    for seed in range(K):
        torch.manual_seed(seed)
        nets.append(build_side_network(config, side))
    return nets


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("fusion", ["ladder", "late", "none"])
def test_stacked_forward_and_gradients_match_each_network_alone(minilm_tokenizer, family, fusion):
    """Logits and weight gradients of 3 networks, dropout on (each network's masks from its own
    generator, as it draws them alone on the global stream), and in evaluation."""
    config = tiny_causal(family, minilm_tokenizer, dropout=0.1).model.config
    nets = _nets(config, fusion)
    B, T, d = 3, 7, config.hidden_size
    g = torch.Generator().manual_seed(5)
    hiddens = {i: torch.randn(B, T, d, generator=g).half() for i in range(3)}
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False  # right padding
    mask[2, :2] = False  # left padding
    labels = torch.tensor([0, 2, 1])
    stack = stack_networks(nets)
    assert isinstance(stack, StackedCausalSide)
    gens = [torch.Generator().manual_seed(100 + k) for k in range(3)]
    states = [gen.get_state() for gen in gens]
    logits = stack.forward(hiddens, mask, gens)
    stack.losses(logits, labels).sum().backward()
    for k, net in enumerate(nets):
        net.train()
        torch.set_rng_state(states[k])
        own = net(hiddens, mask)
        net.loss(own, labels).backward()
        torch.testing.assert_close(logits[k], own, rtol=1e-5, atol=1e-6)
        assert torch.equal(torch.get_rng_state(), gens[k].get_state())  # the same draws
        for name, p in net.named_parameters():
            torch.testing.assert_close(
                stack.params[name].grad[k], p.grad, rtol=1e-4, atol=1e-7, msg=name
            )
        net.eval()
        with torch.no_grad():
            torch.testing.assert_close(stack.forward(hiddens, mask)[k], net(hiddens, mask))


def test_lm_head_and_xladder_are_not_stacked(minilm_tokenizer):
    config = tiny_causal("llama", minilm_tokenizer).model.config
    assert stackable(_nets(config, "ladder", K=1)[0])
    assert not stackable(_nets(config, "xladder", K=1)[0])
    lm = build_side_network(
        config,
        SideConfig(reduction_factor=2, head="lm"),
        lm_head=torch.zeros(7, config.hidden_size),
    )
    assert not stackable(lm)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def cache(request, tmp_path_factory, glue_dir, minilm_tokenizer):
    """A float32 cache of RTE (12 examples a split) from a tiny random Llama / GPT-2 whose side
    networks have attention (and GPT-2: residual) dropout 0.1."""
    tmp = tmp_path_factory.mktemp(f"stacked-{request.param}")
    backbone = tiny_causal(request.param, minilm_tokenizer, dropout=0.1)
    cfg = make_config(tmp, glue_dir, **{"cache.dtype": "float32", "task.limit": 12})
    cfg = apply_overrides(
        cfg,
        {
            "backbone.name": backbone.name,
            **SHORT_RUN,
            "train_side.reduction_factors": [2],
            "train_side.seeds": [0, 1, 2],
            "train_side.learning_rates": [3e-3, 1e-2],
        },
    )
    extract(cfg, backbone=backbone, progress=False)
    return cfg


def _run(cfg, tmp_path, name, **over):
    cfg = apply_overrides(cfg, {"train_side.run_dir": str(tmp_path / "runs"), **over})
    return train_side(cfg, run_name=name, progress=False, echo=False)


def _close(a, b, path=""):
    """Two metrics trees equal, their floats to rtol 1e-5 (stacked matmuls round as ~1e-7)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), path
    else:
        assert a == b, path


@pytest.mark.parametrize("ladder_dropout", [0.0, 0.2])
def test_train_side_batched_on_matches_off(cache, tmp_path, monkeypatch, ladder_dropout):
    """6 networks (3 seeds x 2 learning rates) in two stacked groups of 3 (each mixing seeds and
    rates) vs one by one: metrics.json equal up to timing (floats to rtol 1e-5), last weights
    to 1e-5 (atol: a near-zero bias under AdamW moves by ~1e-6), and each network's random
    stream the same."""
    import stages.train_side as ts_mod

    budget = 64 << 20  # memory_mb 64: groups of 3
    monkeypatch.setattr(ts_mod, "activation_bytes", lambda net, b, t: budget // 3)
    over = {"train_side.ladder_dropout": ladder_dropout, "train_side.memory_mb": 64}
    groups: list[int] = []
    monkeypatch.setattr(
        ts_mod, "stack_networks", lambda n: groups.append(len(n)) or stack_networks(n)
    )
    alone = _run(cache, tmp_path, "alone", **{"train_side.batched": "off", **over})
    assert groups == []
    stacked = _run(cache, tmp_path, "stacked", **{"train_side.batched": "on", **over})
    assert len(alone.metrics["networks"]) == 6 and groups == [3, 3] * 2  # 2 epochs
    _close(strip_timing(alone.metrics), strip_timing(stacked.metrics))
    for name in alone.metrics["networks"]:
        ca = torch.load(alone.folder / "checkpoints" / f"{name}.last.pt", weights_only=False)
        cs = torch.load(stacked.folder / "checkpoints" / f"{name}.last.pt", weights_only=False)
        for k in ca["net"]:
            torch.testing.assert_close(
                cs["net"][k], ca["net"][k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
            )
        assert torch.equal(cs["rng"], ca["rng"])


def test_xladder_networks_are_not_stacked_and_still_train(cache, tmp_path):
    """Fusion "xladder": one by one under ``batched: on``, as under ``off``."""
    base = {"train_side.seeds": [0, 1], "train_side.fusion": "xladder"}
    a = _run(cache, tmp_path, "a", **{"train_side.batched": "off", **base})
    b = _run(cache, tmp_path, "b", **{"train_side.batched": "on", **base})
    assert len(a.metrics["networks"]) == 4
    assert strip_timing(a.metrics) == strip_timing(b.metrics)


def test_a_causal_network_gives_the_same_bits_in_any_group(cache, tmp_path, monkeypatch):
    """Groups of 3 or of 1 (``activation_bytes`` over the budget), ladder dropout on: the same
    metrics and best weights, bit for bit."""
    import stages.train_side as ts_mod

    over = {
        "train_side.batched": "on",
        "train_side.ladder_dropout": 0.2,
        "train_side.memory_mb": 64,
    }
    monkeypatch.setattr(ts_mod, "activation_bytes", lambda net, b, t: (64 << 20) // 3)
    three = _run(cache, tmp_path, "three", **over)
    monkeypatch.setattr(ts_mod, "activation_bytes", lambda net, b, t: 10**15)
    one = _run(cache, tmp_path, "one", **over)
    assert strip_timing(three.metrics) == strip_timing(one.metrics)
    for name in three.metrics["networks"]:
        a = (three.folder / f"{name}.best.safetensors").read_bytes()
        assert (one.folder / f"{name}.best.safetensors").read_bytes() == a
