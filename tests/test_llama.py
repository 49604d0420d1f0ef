"""Decoder-only causal backbones (the Llama family): states, side network, pruning, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_store.registry import open_cache
from ladder.errors import LadderError
from ladder.pruning import prune_backbone
from ladder.side import SideConfig, build_side_network
from stages.extract import extract
from stages.tasks import load_task
from stages.tokens import tokenize_split
from tests.conftest import make_config, tiny_llama
from tests.test_extract import direct_states, stored_rows


@pytest.fixture(scope="module")
def llama(minilm_tokenizer):
    return tiny_llama(minilm_tokenizer)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_every_row_equals_a_direct_unpadded_forward(tmp_path, glue_dir, llama, dtype):
    """Padded, length-grouped batches give each example the states of its own unpadded forward."""
    cfg = make_config(tmp_path, glue_dir, **{"cache.dtype": dtype, "task.limit": 8})
    result = extract(cfg, backbone=llama, progress=False)
    cache = open_cache(cfg.cache_root, result.key)
    m = cache.manifest
    assert m["backbone"]["family"] == "llama" and m["backbone"]["quantization"] is None
    assert m["key_inputs"]["template"] == "fields-v1"
    assert m["key_inputs"]["backbone"]["family"] == "llama"
    data = load_task("rte", data_dir=cfg.task.data_dir, limit=cfg.task.limit)
    enc = tokenize_split(llama, data, "validation", cfg.backbone.max_length)["enc"]
    text = llama.tokenizer.decode(enc.ids[0], skip_special_tokens=True)
    assert text.startswith("sentence1 : ") and " sentence2 : " in text  # wordpiece spacing
    lengths = {len(x) for x in enc.ids}
    assert len(lengths) > 1  # the batches were padded
    tol = {"float32": 1e-5, "int8": 0.02}[dtype]
    for i in range(len(enc.ids)):
        want = direct_states(llama, enc.ids[i], None)["enc"]
        for n in range(llama.n_layers + 1):
            got = stored_rows(cache, "validation", "enc", n, i)
            scale = want[n][0].abs().amax(-1, keepdim=True) if dtype == "int8" else 1.0
            torch.testing.assert_close(got / scale, want[n][0] / scale, rtol=0, atol=tol)


def test_state_convention_embeddings_then_each_block_before_the_final_norm(llama):
    ids = torch.tensor([[101, 2054, 2003, 102]])
    states = llama.states(ids, torch.ones_like(ids))["enc"]
    out = llama.model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(states[0], llama.model.embed_tokens(ids))
    torch.testing.assert_close(states[1], out.hidden_states[1])
    torch.testing.assert_close(llama.model.norm(states[-1]), out.last_hidden_state)


def test_side_block_equals_the_llama_decoder_layer(llama):
    """At r = 1 a side block with the backbone's weights is the backbone's block (rotary, GQA)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ladder.causal import CausalSideBlock, rotary_tables
    from ladder.families import dims_of

    cfg = llama.config
    layer = llama.model.layers[1]
    block = CausalSideBlock(dims_of(cfg), 1)
    w = {
        "ln_attn.weight": layer.input_layernorm.weight,
        "ln_ffn.weight": layer.post_attention_layernorm.weight,
        **{f"attn.{s}.weight": getattr(layer.self_attn, f"{s}_proj").weight for s in "qkvo"},
        **{f"{s}.weight": getattr(layer.mlp, f"{s}_proj").weight for s in ("gate", "up", "down")},
    }
    block.load_state_dict(w)
    torch.manual_seed(1)
    x = torch.randn(2, 7, cfg.hidden_size)
    pos = torch.arange(7)[None]
    want = layer(x, position_embeddings=LlamaRotaryEmbedding(cfg)(x, pos), attention_mask=None)
    net = build_side_network(cfg, SideConfig(reduction_factor=1))
    cos, sin = rotary_tables(net.inv_freq, 7, x.dtype)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    bias = torch.zeros(7, 7).masked_fill(~causal, torch.finfo(x.dtype).min)
    with torch.no_grad():
        got = block(x, bias[None, None], cos, sin)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_head_reads_the_last_real_token_and_padding_does_not_matter(llama):
    torch.manual_seed(0)
    net = build_side_network(llama.config, SideConfig(reduction_factor=2, num_labels=3)).eval()
    ids = torch.tensor([[101, 2054, 2003, 1037, 102], [101, 2129, 102, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    states = llama.states(ids, mask, for_training=True)["enc"]
    alone = llama.states(ids[1:, :3], mask[1:, :3], for_training=True)["enc"]
    with torch.no_grad():
        both = net({k: states[k] for k in net.needed_layers()}, mask)
        one = net({k: alone[k] for k in net.needed_layers()}, mask[1:, :3])
        # the side state at the last real token (index 2) feeds the head
        at2 = net(
            {k: states[k] for k in net.needed_layers()}, mask, pool_index=torch.tensor([4, 2])
        )
    assert both.shape == (2, 3)
    torch.testing.assert_close(both[1], one[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both, at2)


@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("importance", ["magnitude", "fisher-like"])
def test_pruned_weights_keep_the_grouped_head_structure_and_load(llama, r, importance):
    cfg, sd = llama.config, llama.model.state_dict()
    imp = None
    if importance == "fisher-like":
        g = torch.Generator().manual_seed(3)
        imp = {k: torch.rand(v.shape, generator=g) for k, v in sd.items()}
    weights, idx = prune_backbone("llama", sd, imp, r, cfg)
    h, kv, hd = 4, 2, 8
    hs = hd // r
    for i in range(cfg.num_hidden_layers):
        c = f"layers.{i}."
        idx = {k.removeprefix("idx."): v for k, v in idx.items()}
        q_rows, k_rows = idx[c + "attn.q.rows"], idx[c + "attn.k.rows"]
        assert torch.equal(k_rows, idx[c + "attn.v.rows"])
        assert q_rows.shape == (h * hs,) and k_rows.shape == (kv * hs,)
        q_dims = (q_rows % hd).view(h, hs)
        k_dims = (k_rows % hd).view(kv, hs)
        assert torch.equal(q_rows // hd, torch.arange(h).repeat_interleave(hs))  # head by head
        assert torch.equal(k_rows // hd, torch.arange(kv).repeat_interleave(hs))
        for head in range(h):  # query head h uses key-value head h // (n_head / n_kv_head)
            assert torch.equal(q_dims[head], k_dims[head // (h // kv)])
        for g in range(kv):  # rotary: dims j and j + hd/2 kept together, half a side head apart
            assert torch.equal(k_dims[g][hs // 2 :], k_dims[g][: hs // 2] + hd // 2)
        assert torch.equal(idx[c + "attn.o.cols"], q_rows)
        for name, hf in (("attn.q", "self_attn.q_proj"), ("attn.o", "self_attn.o_proj")):
            want = sd[f"layers.{i}.{hf}.weight"][idx[f"{c}{name}.rows"]][:, idx[f"{c}{name}.cols"]]
            torch.testing.assert_close(weights[f"{c}{name}.weight"], want)
        assert weights[c + "attn.k.weight"].shape == (kv * hs, 32 // r)
        assert weights[c + "gate.weight"].shape == (64 // r, 32 // r)
        assert weights[c + "down.weight"].shape == (32 // r, 64 // r)
    net = build_side_network(cfg, SideConfig(reduction_factor=r))
    net.load_side_init(weights)
    own = net.state_dict()
    for k, w in weights.items():
        torch.testing.assert_close(own[k], w, msg=k)
    assert set(weights) == {k for k in own if k.startswith(("layers.", "final_ln."))}


def test_pruning_at_r1_keeps_the_backbone_weights_in_place(llama):
    sd = llama.model.state_dict()
    weights, _ = prune_backbone("llama", sd, None, 1, llama.config)
    torch.testing.assert_close(
        weights["layers.1.attn.k.weight"], sd["layers.1.self_attn.k_proj.weight"]
    )
    torch.testing.assert_close(weights["layers.0.down.weight"], sd["layers.0.mlp.down_proj.weight"])
    torch.testing.assert_close(weights["final_ln.weight"], sd["norm.weight"])


@pytest.mark.parametrize(
    ("r", "match"),
    [
        (
            16,
            r"does not divide the per-head dim=8 \(the side keeps the 4 query heads grouped over 2",
        ),
        (8, r"does not divide rotary pairs per head=4 .*allowed: one of 1, 2, 4$"),
        (3, r"does not divide d_model=32; allowed: one of 1, 2, 4$"),
    ],
)
def test_r_that_breaks_the_head_structure_is_one_line(llama, r, match):
    with pytest.raises(LadderError, match=match) as e:
        SideConfig(reduction_factor=r).validate(llama.config)
    assert "\n" not in str(e.value)
    with pytest.raises(LadderError):
        prune_backbone("llama", llama.model.state_dict(), None, r, llama.config)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, llama):
    folder = tmp_path_factory.mktemp("tiny-llama")
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--side-init-factors", "8", "--side-init", "magnitude"],
            "extract.reduction_factors has 8: side.reduction_factor=8 does not divide rotary "
            "pairs per head=4",
        ),
        (
            ["--layers", "0,3", "--side-init", ""],
            "layer index 3 is out of range for {folder} (decoder-only): allowed 0 (embeddings) .. 2",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_committed(
    tmp_path, glue_dir, llama_folder, capsys, args, message
):
    from pipeline.cli import run_cli

    root = tmp_path / "cache"
    base = ["run", "extract", "--task", "rte", "--data-dir", str(glue_dir), "--limit", "4"]
    base += ["--cache-root", str(root), "--backbone", str(llama_folder)]
    code = run_cli([*base, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert message.format(folder=llama_folder) in err[0]
    assert not root.exists() or not any(p.name == "commit.json" for p in root.rglob("*"))


def test_a_llama_folder_loads_by_path_and_extracts_from_the_cli(tmp_path, glue_dir, llama_folder):
    from pipeline.cli import run_cli

    root = tmp_path / "cache"
    args = ["run", "extract", "--task", "sst2", "--data-dir", str(glue_dir), "--limit", "4"]
    args += ["--cache-root", str(root), "--backbone", str(llama_folder), "--dtype", "int8"]
    args += ["--side-init", "", "--layers", "0,2"]
    assert run_cli(args) == 0
    key = next(p.name for p in root.iterdir() if p.is_dir())
    cache = open_cache(str(root), key)
    assert cache.manifest["layers_stored"] == {"enc": [0, 2]}
    assert cache.manifest["dtype"] == "int8"
    codes = np.asarray(cache.array("train/enc/layer_02")[:])
    assert codes.dtype == np.int8 and codes.shape[1] == 32
