"""ladder.families is the one family table: side networks, pruning and backbones agree with it."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from ladder import backbones
from ladder.families import FAMILY, dims_of
from ladder.pruning import prune_backbone
from ladder.side import SideConfig, build_side_network

R = 4
# Sizes chosen so that a wrong field shows: d_ff is not 4d, BART's decoder is deeper than its
# encoder, and T5's heads * d_kv != d_model (as t5-3b) with a decoder of another depth.
BERT = dict(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=48)
CONFIGS = {
    "bert": (tf.BertConfig(num_hidden_layers=3, **BERT), tf.BertModel),
    "roberta": (tf.RobertaConfig(num_hidden_layers=2, **BERT), tf.RobertaModel),
    "bart": (
        tf.BartConfig(
            vocab_size=50,
            d_model=32,
            encoder_layers=2,
            decoder_layers=3,
            encoder_attention_heads=4,
            decoder_attention_heads=2,
            encoder_ffn_dim=40,
            decoder_ffn_dim=24,
        ),
        tf.BartModel,
    ),  # fmt: skip
    "t5": (
        tf.T5Config(
            vocab_size=50,
            d_model=32,
            d_kv=16,
            num_heads=4,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=3,
        ),
        tf.T5ForConditionalGeneration,
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_side_network_pruning_and_backbones_use_the_family_table(name):
    torch.manual_seed(0)
    cfg, model_cls = CONFIGS[name]
    dims = dims_of(cfg)
    expected = {"bert": (32, 16, 48, 3, 0), "roberta": (32, 16, 48, 2, 0)}
    expected |= {"bart": (32, 8, 40, 2, 0), "t5": (32, 16, 48, 2, 3)}
    assert (dims.d, dims.head_dim, dims.d_ff, dims.n_layers, dims.n_dec_layers) == expected[name]

    # backbones: family, block counts and width are the table's
    assert backbones.family_of(cfg) == dims.family == FAMILY[cfg.model_type]
    assert backbones.num_blocks(cfg) == (dims.n_layers, dims.n_dec_layers)
    assert backbones.d_model(cfg) == dims.d

    # side network: widths d/r, per-head dim head_dim/r, FFN d_ff/r, one block per backbone block
    lm_head = torch.randn(cfg.vocab_size, dims.d) if dims.t5 else None
    net = build_side_network(cfg, SideConfig(reduction_factor=R), lm_head)
    d, hs, ff = dims.d // R, dims.head_dim // R, dims.d_ff // R
    if dims.t5:
        stacks = {"enc": (net.enc, dims.n_layers), "dec": (net.dec, dims.n_dec_layers)}
        for stack, n in stacks.values():
            assert (stack.n_layers, stack.kept, stack.d_side) == (n, list(range(n)), d)
            assert stack.first_down.weight.shape == (d, dims.d)
            blk = stack.block(0)
            assert (blk.n_head, blk.head_dim) == (dims.n_head, hs)
            assert blk.sa.q.weight.shape == (dims.n_head * hs, d)
            assert blk.ff.wi.weight.shape == (ff, d)
    else:
        assert (net.n_layers, net.kept, net.d_side) == (
            dims.n_layers,
            list(range(dims.n_layers)),
            d,
        )
        assert net.first_down.weight.shape == (d, dims.d)
        blk = net.layers["0"]
        assert (blk.n_head, blk.head_dim) == (dims.n_head, hs)
        assert blk.q.weight.shape == (d, d) and blk.ffn_in.weight.shape == (ff, d)

    # pruning: every side-block key, with the side network's shape, from every backbone block
    weights, idx = prune_backbone(dims.family, model_cls(cfg).state_dict(), None, R, cfg)
    assert idx["idx.embeddings.rows"].shape == (d,)
    own = {k: v.shape for k, v in net.state_dict().items()}
    assert {k: w.shape for k, w in weights.items()} == {k: own[k] for k in weights}
    prefixes = ("enc.", "dec.") if dims.t5 else ("layers.",)
    blocks = {k for k in own if k.startswith(prefixes) and k.split(".")[1].isdigit()}
    assert blocks <= set(weights)
    net.load_side_init(weights)
