"""GPT-2 as a decoder-only causal backbone: states, side network, pruning, bad input."""

from __future__ import annotations

import pytest
import torch

from cache_store.registry import open_cache
from ladder.errors import LadderError
from ladder.pruning import prune_backbone
from ladder.side import SideConfig, build_side_network
from pipeline.config import apply_overrides
from stages.extract import extract
from stages.tasks import load_task
from stages.tokens import tokenize_split
from stages.train_side import train_side
from tests.conftest import make_config, tiny_gpt2
from tests.test_extract import direct_states, stored_rows


@pytest.fixture(scope="module")
def gpt2(minilm_tokenizer):
    return tiny_gpt2(minilm_tokenizer)


def test_every_row_equals_a_direct_unpadded_forward(tmp_path, glue_dir, gpt2):
    """Padded, length-grouped batches give each example the states of its own unpadded forward."""
    cfg = make_config(tmp_path, glue_dir, **{"cache.dtype": "float32", "task.limit": 8})
    result = extract(cfg, backbone=gpt2, progress=False)
    cache = open_cache(cfg.cache_root, result.key)
    m = cache.manifest
    assert m["backbone"]["family"] == "gpt2" and m["key_inputs"]["template"] == "fields-v1"
    data = load_task("rte", data_dir=cfg.task.data_dir, limit=cfg.task.limit)
    enc = tokenize_split(gpt2, data, "validation", cfg.backbone.max_length)["enc"]
    assert len({len(x) for x in enc.ids}) > 1  # the batches were padded
    for i in range(len(enc.ids)):
        want = direct_states(gpt2, enc.ids[i], None)["enc"]
        for n in range(gpt2.n_layers + 1):
            got = stored_rows(cache, "validation", "enc", n, i)
            torch.testing.assert_close(got, want[n][0], rtol=0, atol=1e-5)


def test_state_convention_embeddings_plus_positions_then_each_block_before_ln_f(gpt2):
    ids = torch.tensor([[101, 2054, 2003, 102]])
    states = gpt2.states(ids, torch.ones_like(ids))["enc"]
    m = gpt2.model
    hs = []
    hook = m.drop.register_forward_pre_hook(lambda _m, inp: hs.append(inp[0]))  # block 0 reads
    try:
        out = m(input_ids=ids)
    finally:
        hook.remove()
    torch.testing.assert_close(states[0], hs[0], rtol=0, atol=0)
    torch.testing.assert_close(states[0], m.wte(ids) + m.wpe(torch.arange(4))[None])
    torch.testing.assert_close(states[1], m.h[0](states[0]))
    torch.testing.assert_close(m.ln_f(states[-1]), out.last_hidden_state)


def test_side_block_equals_the_gpt2_block(gpt2):
    """At r = 1 a side block with the backbone's weights is GPT2Block (Conv1D [in, out] weights)."""
    from ladder.causal import CausalSideBlock
    from ladder.families import dims_of

    cfg, d = gpt2.config, gpt2.config.n_embd
    layer = gpt2.model.h[1]
    block = CausalSideBlock(dims_of(cfg), 1)
    wq, wk, wv = layer.attn.c_attn.weight.split(d, dim=1)
    bq, bk, bv = layer.attn.c_attn.bias.split(d)
    w = {
        "ln_attn.weight": layer.ln_1.weight, "ln_attn.bias": layer.ln_1.bias,
        "ln_ffn.weight": layer.ln_2.weight, "ln_ffn.bias": layer.ln_2.bias,
        "attn.q.weight": wq.t(), "attn.q.bias": bq, "attn.k.weight": wk.t(), "attn.k.bias": bk,
        "attn.v.weight": wv.t(), "attn.v.bias": bv,
        "attn.o.weight": layer.attn.c_proj.weight.t(), "attn.o.bias": layer.attn.c_proj.bias,
        "up.weight": layer.mlp.c_fc.weight.t(), "up.bias": layer.mlp.c_fc.bias,
        "down.weight": layer.mlp.c_proj.weight.t(), "down.bias": layer.mlp.c_proj.bias,
    }  # fmt: skip
    block.load_state_dict(w)  # strict: these are all of the block's parameters
    assert isinstance(block.ln_attn, torch.nn.LayerNorm) and not hasattr(block, "gate")
    torch.manual_seed(1)
    x = torch.randn(2, 7, d)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    bias = torch.zeros(7, 7).masked_fill(~causal, torch.finfo(x.dtype).min)[None, None]
    with torch.no_grad():
        want = layer(x, attention_mask=bias)
        want = want[0] if isinstance(want, tuple) else want
        got = block(x, bias)  # no cos, sin: no rotary
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_side_network_has_layernorms_no_rotary_and_a_last_token_head(gpt2):
    from ladder.families import dims_of

    dims = dims_of(gpt2.config)
    assert (dims.family, dims.norm, dims.rotary, dims.gated) == ("gpt2", "layer", False, False)
    assert (dims.n_head, dims.n_kv_head, dims.head_dim, dims.d_ff) == (4, 4, 8, 128)
    assert dims.act == "gelu_new" and dims.qkv_bias and dims.o_bias and dims.mlp_bias
    torch.manual_seed(0)
    net = build_side_network(gpt2.config, SideConfig(reduction_factor=2, num_labels=3)).eval()
    assert net.inv_freq is None and isinstance(net.final_ln, torch.nn.LayerNorm)
    ids = torch.tensor([[101, 2054, 2003, 1037, 102], [101, 2129, 102, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    states = gpt2.states(ids, mask, for_training=True)["enc"]
    alone = gpt2.states(ids[1:, :3], mask[1:, :3], for_training=True)["enc"]
    with torch.no_grad():
        both = net({k: states[k] for k in net.needed_layers()}, mask)
        one = net({k: alone[k] for k in net.needed_layers()}, mask[1:, :3])
    assert both.shape == (2, 3)
    torch.testing.assert_close(both[1], one[0], rtol=1e-5, atol=1e-6)


def test_cache_and_online_lst_follow_the_same_trajectory(tmp_path, glue_dir, gpt2):
    """float32 cache vs the live backbone (dropout off): same losses and weights, 2 nets x 2 epochs."""
    cfg = make_config(tmp_path, glue_dir, **{"cache.dtype": "float32", "task.limit": 12})
    cfg = apply_overrides(
        cfg,
        {
            "train_side.epochs": 2,
            "train_side.batch_size": 4,
            "train_side.warmup_steps": 2,
            "train_side.reduction_factors": [2, 4],
            "train_side.init": "magnitude",
            "extract.side_init": ["magnitude"],
            "extract.reduction_factors": [2, 4],
            "backbone.name": gpt2.name,
            "train_side.run_dir": str(tmp_path / "runs"),
        },
    )
    extract(cfg, backbone=gpt2, progress=False)
    cached = train_side(cfg, run_name="cached", progress=False)
    online = train_side(cfg, run_name="online", online=gpt2, online_dropout=False, progress=False)
    assert set(cached.metrics["networks"]) == {"r2-s0-lr0.003", "r4-s0-lr0.003"}
    for name, c in cached.metrics["networks"].items():
        o = online.metrics["networks"][name]
        c_loss = [h["train_loss"] for h in c["epochs"]]
        o_loss = [h["train_loss"] for h in o["epochs"]]
        assert len(c_loss) == 2
        torch.testing.assert_close(torch.tensor(c_loss), torch.tensor(o_loss), rtol=1e-5, atol=0)
        assert c["test"] == o["test"]
        pc = torch.load(cached.folder / "checkpoints" / f"{name}.last.pt", weights_only=False)
        po = torch.load(online.folder / "checkpoints" / f"{name}.last.pt", weights_only=False)
        for k in pc["net"]:
            torch.testing.assert_close(pc["net"][k], po["net"][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("importance", ["magnitude", "fisher-like"])
def test_pruned_weights_follow_the_conv1d_layout_keep_heads_and_load(gpt2, r, importance):
    cfg, sd = gpt2.config, gpt2.model.state_dict()
    imp = None
    if importance == "fisher-like":
        g = torch.Generator().manual_seed(3)
        imp = {k: torch.rand(v.shape, generator=g) for k, v in sd.items() if v.is_floating_point()}
    weights, idx = prune_backbone("gpt2", sd, imp, r, cfg)
    idx = {k.removeprefix("idx."): v for k, v in idx.items()}
    d, h, hd = 32, 4, 8
    hs = hd // r
    for i in range(cfg.n_layer):
        c, hf = f"layers.{i}.", f"h.{i}."
        q_rows = idx[c + "attn.q.rows"]
        assert torch.equal(q_rows, idx[c + "attn.k.rows"])  # one key-value head per query head
        assert torch.equal(q_rows, idx[c + "attn.v.rows"])
        assert torch.equal(q_rows // hd, torch.arange(h).repeat_interleave(hs))  # head by head
        cols = idx[c + "attn.q.cols"]
        # c_attn is [d, 3d] (Conv1D: in, out): q is its first d output columns, transposed
        c_attn, b_attn = sd[hf + "attn.c_attn.weight"], sd[hf + "attn.c_attn.bias"]
        for j, name in enumerate("qkv"):
            want = c_attn[:, j * d : (j + 1) * d].t()[q_rows][:, cols]
            torch.testing.assert_close(weights[f"{c}attn.{name}.weight"], want)
            torch.testing.assert_close(weights[f"{c}attn.{name}.bias"], b_attn[j * d + q_rows])
        assert torch.equal(idx[c + "attn.o.cols"], q_rows)
        for name, hf_name in (
            ("attn.o", "attn.c_proj"),
            ("up", "mlp.c_fc"),
            ("down", "mlp.c_proj"),
        ):
            rows, cols = idx[f"{c}{name}.rows"], idx[f"{c}{name}.cols"]
            want = sd[f"{hf}{hf_name}.weight"].t()[rows][:, cols]
            torch.testing.assert_close(weights[f"{c}{name}.weight"], want)
            torch.testing.assert_close(weights[f"{c}{name}.bias"], sd[f"{hf}{hf_name}.bias"][rows])
        rows = idx[c + "ln_attn.rows"]
        torch.testing.assert_close(weights[c + "ln_attn.bias"], sd[hf + "ln_1.bias"][rows])
        assert weights[c + "attn.q.weight"].shape == (d // r, d // r)
        assert weights[c + "up.weight"].shape == (4 * d // r, d // r)
        assert weights[c + "down.weight"].shape == (d // r, 4 * d // r)
    assert "final_ln.bias" in weights and not any(".gate." in k for k in weights)
    net = build_side_network(cfg, SideConfig(reduction_factor=r))
    net.load_side_init(weights)
    own = net.state_dict()
    for k, w in weights.items():
        torch.testing.assert_close(own[k], w, msg=k)
    assert set(weights) == {k for k in own if k.startswith(("layers.", "final_ln."))}


def test_pruning_at_r1_keeps_the_backbone_weights_in_place(gpt2):
    sd = gpt2.model.state_dict()
    weights, _ = prune_backbone("gpt2", sd, None, 1, gpt2.config)
    torch.testing.assert_close(
        weights["layers.1.attn.k.weight"], sd["h.1.attn.c_attn.weight"][:, 32:64].t()
    )
    torch.testing.assert_close(weights["layers.0.down.weight"], sd["h.0.mlp.c_proj.weight"].t())
    torch.testing.assert_close(weights["final_ln.bias"], sd["ln_f.bias"])


@pytest.mark.parametrize(
    ("r", "match"),
    [
        (16, r"does not divide the per-head dim=8 \(the side keeps the 4 heads, each head_dim/r"),
        (3, r"does not divide d_model=32; allowed: one of 1, 2, 4, 8$"),
    ],
)
def test_r_that_breaks_the_head_dim_is_one_line(gpt2, r, match):
    with pytest.raises(LadderError, match=match) as e:
        SideConfig(reduction_factor=r).validate(gpt2.config)
    assert "\n" not in str(e.value)
    with pytest.raises(LadderError, match="does not divide") as e:
        prune_backbone("gpt2", gpt2.model.state_dict(), None, r, gpt2.config)
    assert "\n" not in str(e.value)


def test_a_gpt2_folder_loads_by_path_and_extracts_with_side_init_from_the_cli(
    tmp_path, glue_dir, gpt2
):
    """A GPT2LMHeadModel checkpoint loads as the GPT2Model backbone; pruning reads its weights."""
    from transformers import GPT2LMHeadModel

    from pipeline.cli import run_cli

    folder = tmp_path / "tiny-gpt2"
    lm = GPT2LMHeadModel(gpt2.config)
    lm.transformer.load_state_dict(gpt2.model.state_dict())
    lm.save_pretrained(folder)
    gpt2.tokenizer.save_pretrained(folder)
    root = tmp_path / "cache"
    args = ["run", "extract", "--task", "sst2", "--data-dir", str(glue_dir), "--limit", "4"]
    args += ["--cache-root", str(root), "--backbone", str(folder), "--dtype", "float32"]
    args += ["--side-init", "magnitude", "--side-init-factors", "2"]
    assert run_cli(args) == 0
    key = next(p.name for p in root.iterdir() if p.is_dir())
    cache = open_cache(str(root), key)
    assert cache.manifest["backbone"]["model_type"] == "gpt2"
    from stages.train_side import load_side_init

    w = load_side_init(cache, 2, "magnitude")
    build_side_network(gpt2.config, SideConfig(reduction_factor=2)).load_side_init(w)
    want, _ = prune_backbone("gpt2", gpt2.model.state_dict(), None, 2, gpt2.config)
    assert w.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(w[k], want[k], rtol=0, atol=0, msg=k)


@torch.no_grad()
def test_gpt2_incremental_decoding_equals_full_recompute(minilm_tokenizer):
    """GPT-2 with its LM head: the backbone's and the side network's KV caches, a few tokens at a
    time, give the logits of a full pass (state 0 takes wpe at the positions after the past)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ladder.attention import SideKVCache
    from ladder.backbones import from_model
    from ladder.side import SideConfig, build_side_network

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=minilm_tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4)
    bb = from_model("tiny-gpt2-lm", "", GPT2LMHeadModel(cfg), minilm_tokenizer)
    assert bb.lm_head is not None and bb.family == "gpt2"
    side = SideConfig(reduction_factor=2, head="lm", dropout=0.0, kept_layers=(0, 1))
    net = build_side_network(bb.config, side, bb.frozen_tensors(lm_head=True)["lm_head"]).eval()
    for p in net.parameters():  # not the near-zero init: make every block matter
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else None
    ids = torch.randint(1000, 2000, (1, 9))
    layers = net.needed_layers()
    full_states = bb.states(ids, torch.ones_like(ids), layers=layers)["enc"]
    full = net({n: full_states[n] for n in layers}, torch.ones_like(ids))  # (1, 9, V)
    past, cache, steps = None, SideKVCache(), []
    for chunk in (ids[:, :4], ids[:, 4:5], ids[:, 5:9]):
        states, past = bb.decode_states(chunk, past, layers)
        steps.append(net.decode(states, cache))
    scale = full.abs().max()
    torch.testing.assert_close(torch.cat(steps, 1) / scale, full / scale, rtol=0, atol=1e-5)
