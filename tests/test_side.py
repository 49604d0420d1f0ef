"""The side network (ladder/side.py) on tiny random configs: shapes, wiring, exactness, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import BartConfig, BertConfig, MBartConfig, T5Config
from transformers.models.bart.modeling_bart import BartEncoderLayer
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.mbart.modeling_mbart import MBartEncoderLayer
from transformers.models.t5.modeling_t5 import T5Attention, T5Block

from ladder.errors import LadderError
from ladder.side import (
    EncoderSideNetwork,
    SideConfig,
    T5SideNetwork,
    build_side_network,
    trainable_parameters,
)

D, HEADS, FF, L, V = 64, 4, 128, 4, 100


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bert_cfg(**kw):
    base = dict(hidden_size=D, num_attention_heads=HEADS, intermediate_size=FF, num_hidden_layers=L)
    return BertConfig(vocab_size=50, **{**base, **kw})


def t5_cfg(**kw):
    base = dict(d_model=D, d_kv=16, num_heads=HEADS, d_ff=FF, num_layers=2, num_decoder_layers=2)
    return T5Config(vocab_size=V, **{**base, **kw})


def lm_head():
    return torch.randn(V, D)


def states(n_layers, B, T):
    """States 0..n_layers of one stream, all of them (tests drop some on purpose)."""
    return {k: torch.randn(B, T, D) for k in range(n_layers + 1)}


def mask_of(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) bool


def randomize(net):
    """Move every weight well away from the N(0, 0.01) init so that wiring errors show."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.endswith("gates"):
                p.add_(torch.randn_like(p) * 0.3)
    return net.eval()


def t5_batch(net, B=2, Te=5, Td=3):
    enc = states(net.enc.n_layers, B, Te)
    dec = states(net.dec.n_layers, B, Td)
    return enc, torch.ones(B, Te, dtype=torch.bool), dec, torch.ones(B, Td, dtype=torch.bool)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("r", [2, 4, 8])
def test_encoder_side_widths_and_logits_shape(r):
    net = EncoderSideNetwork(bert_cfg(), SideConfig(reduction_factor=r, num_labels=3))
    blk = net.layers["0"]
    assert net.d_side == D // r
    assert (blk.n_head, blk.head_dim) == (HEADS, D // HEADS // r)
    assert blk.q.weight.shape == (D // r, D // r)
    assert blk.ffn_in.weight.shape == (FF // r, D // r)
    assert net.first_down.weight.shape == (D // r, D)
    assert net.down["3"].weight.shape == (D // r, D)
    assert net.up.weight.shape == (D, D // r)
    assert sorted(net.layers) == ["0", "1", "2", "3"]
    logits = net(states(L, 2, 5), torch.ones(2, 5))
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("r", [2, 4, 8])
def test_t5_side_widths_and_logits_shape(r):
    net = T5SideNetwork(t5_cfg(), SideConfig(reduction_factor=r), lm_head())
    enc_blk, dec_blk = net.enc.block(0), net.dec.block(1)
    assert (enc_blk.n_head, enc_blk.head_dim) == (HEADS, 16 // r)
    assert enc_blk.sa.q.weight.shape == (HEADS * 16 // r, D // r)
    assert enc_blk.ff.wi.weight.shape == (FF // r, D // r)
    assert dec_blk.ca.k.weight.shape == (HEADS * 16 // r, D // r)
    assert not hasattr(enc_blk, "ca")
    assert net.enc.rel_bias.weight.shape == (32, HEADS)
    assert net.up.weight.shape == (D, D // r)
    enc, em, dec, dm = t5_batch(net, B=2, Te=5, Td=3)
    logits, loss = net(enc, em, dec, dm, labels=torch.randint(0, V, (2, 3)))
    assert logits.shape == (2, 3, V)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert net(enc, em, dec, dm)[1] is None


@pytest.mark.parametrize(
    ("fusion", "kept", "expected"),
    [
        ("ladder", None, [0, 1, 2, 3, 4]),
        ("ladder", (3, 1), [0, 2, 4]),
        ("late", None, [0, 4]),
        ("late", (1,), [0, 4]),
        ("none", (0, 2), [0]),
    ],
)
def test_needed_layers_encoder(fusion, kept, expected):
    net = EncoderSideNetwork(bert_cfg(), SideConfig(fusion=fusion, kept_layers=kept))
    assert net.needed_layers() == expected
    assert net.kept == (sorted(kept) if kept else [0, 1, 2, 3])
    # the forward runs on exactly the states it names
    all_states = states(L, 2, 4)
    net({k: all_states[k] for k in expected}, torch.ones(2, 4))


@pytest.mark.parametrize(
    ("fusion", "kept", "enc", "dec"),
    [
        ("ladder", None, [0, 1, 2], [0, 1, 2, 3]),
        ("ladder", (1,), [0, 2], [0, 2]),
        ("late", None, [0, 2], [0, 3]),
        ("none", None, [0], [0]),
    ],
)
def test_needed_layers_t5(fusion, kept, enc, dec):
    cfg = t5_cfg(num_layers=2, num_decoder_layers=3)
    net = T5SideNetwork(cfg, SideConfig(fusion=fusion, kept_layers=kept), lm_head())
    assert net.needed_layers("enc") == enc
    assert net.needed_layers("dec") == dec
    e, em, d, dm = t5_batch(net)
    net({k: e[k] for k in enc}, em, {k: d[k] for k in dec}, dm)


# --------------------------------------------------------------------------- gates and ladders


def check_gated_mixing(stack, block_of, run, hiddens):
    """Each kept block's input must be g_i * side + (1 - g_i) * down_i(state i+1)."""
    with torch.no_grad():
        stack.gates.copy_(torch.linspace(-0.3, 0.4, len(stack.gates)))  # distinct, g != 0.5
    ins, outs, hooks = {}, {}, []
    for i in stack.kept:
        blk = block_of(i)
        hooks.append(blk.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0])))
        hooks.append(blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)))
    run()
    for h in hooks:
        h.remove()
    x = stack.first_down(hiddens[0])
    for i in stack.kept:
        g = torch.sigmoid(stack.gates[i] / stack.side.gate_T)
        want = g * x + (1 - g) * stack.down[str(i)](hiddens[i + 1])
        torch.testing.assert_close(ins[i], want, rtol=1e-5, atol=1e-6)
        x = outs[i]


def test_gates_start_at_half_one_per_layer_and_mix_before_each_block():
    net = randomize(EncoderSideNetwork(bert_cfg(), SideConfig(kept_layers=(0, 2, 3))))
    assert net.gates.shape == (L,)  # one per backbone layer, dropped ones included
    torch.testing.assert_close(net.gate_values(), torch.full((L,), 0.5))
    h, m = states(L, 2, 5), torch.ones(2, 5)
    check_gated_mixing(net, lambda i: net.layers[str(i)], lambda: net(h, m), h)


def test_t5_gates_start_at_half_and_mix_in_both_stacks():
    net = randomize(T5SideNetwork(t5_cfg(num_layers=3), SideConfig(kept_layers=(0, 1)), lm_head()))
    for stack, n in ((net.enc, 3), (net.dec, 2)):
        torch.testing.assert_close(stack.gate_values(), torch.full((n,), 0.5))
    e, em, d, dm = t5_batch(net)
    check_gated_mixing(net.enc, net.enc.block, lambda: net(e, em, d, dm), e)
    check_gated_mixing(net.dec, net.dec.block, lambda: net(e, em, d, dm), d)


def test_dropped_layer_state_does_not_reach_the_output():
    net = randomize(EncoderSideNetwork(bert_cfg(), SideConfig(kept_layers=(1, 3))))
    h, m = states(L, 2, 5), torch.ones(2, 5)
    base = net(h, m)
    for k in (1, 3):  # outputs of dropped blocks 0 and 2
        assert torch.equal(net({**h, k: h[k] + 5 * torch.randn_like(h[k])}, m), base)
    for k in (0, 2, 4):  # embeddings, outputs of kept blocks 1 and 3
        assert not torch.allclose(net({**h, k: h[k] + torch.randn_like(h[k])}, m), base)


def test_t5_dropped_layer_state_does_not_reach_the_output():
    net = randomize(T5SideNetwork(t5_cfg(), SideConfig(kept_layers=(1,)), lm_head()))
    e, em, d, dm = t5_batch(net)
    base = net(e, em, d, dm)[0]
    assert torch.equal(net({**e, 1: e[1] * 7}, em, d, dm)[0], base)
    assert torch.equal(net(e, em, {**d, 1: d[1] * 7}, dm)[0], base)
    assert not torch.allclose(net({**e, 2: e[2] + torch.randn_like(e[2])}, em, d, dm)[0], base)
    assert not torch.allclose(net(e, em, {**d, 2: d[2] + torch.randn_like(d[2])}, dm)[0], base)


def test_late_fusion_reads_the_last_state_once_and_none_reads_only_embeddings():
    h, m = states(L, 2, 5), torch.ones(2, 5)
    late = randomize(EncoderSideNetwork(bert_cfg(), SideConfig(fusion="late")))
    base = late({0: h[0], 4: h[4]}, m)
    assert not torch.allclose(late({0: h[0], 4: h[4] + torch.randn_like(h[4])}, m), base)
    assert list(late.down) == ["3"]
    none = EncoderSideNetwork(bert_cfg(), SideConfig(fusion="none"))
    assert none.gates is None and len(none.down) == 0
    assert none({0: h[0]}, m).shape == (2, 2)
    ladder = EncoderSideNetwork(bert_cfg(), SideConfig())
    assert trainable_parameters(none) < trainable_parameters(late) < trainable_parameters(ladder)


# --------------------------------------------------------------------------- equal to transformers


def _copy_linear(dst, src):
    dst.weight.data.copy_(src.weight.data)
    if dst.bias is not None:
        dst.bias.data.copy_(src.bias.data)


def _copy_ln(dst, src):
    dst.weight.data.copy_(src.weight.data)
    dst.bias.data.copy_(src.bias.data)


def _hf_encoder_layer(family, blk, r):
    """A transformers encoder layer at the side dims, holding the side block's weights."""
    d, ff = D // r, FF // r
    if family == "bert":
        cfg = BertConfig(
            hidden_size=d, num_attention_heads=HEADS, intermediate_size=ff, hidden_act="gelu"
        )
        cfg._attn_implementation = "eager"
        hf = BertLayer(cfg)
        a = hf.attention
        for mine, theirs in (
            (blk.q, a.self.query),
            (blk.k, a.self.key),
            (blk.v, a.self.value),
            (blk.o, a.output.dense),
            (blk.ffn_in, hf.intermediate.dense),
            (blk.ffn_out, hf.output.dense),
        ):
            _copy_linear(theirs, mine)
        _copy_ln(a.output.LayerNorm, blk.ln_attn)
        _copy_ln(hf.output.LayerNorm, blk.ln_ffn)
        return hf
    cls_cfg, cls_layer = (
        (BartConfig, BartEncoderLayer) if family == "bart" else (MBartConfig, MBartEncoderLayer)
    )
    cfg = cls_cfg(
        d_model=d, encoder_attention_heads=HEADS, encoder_ffn_dim=ff, activation_function="relu"
    )
    cfg._attn_implementation = "eager"
    hf = cls_layer(cfg)
    at = hf.self_attn
    for mine, theirs in (
        (blk.q, at.q_proj),
        (blk.k, at.k_proj),
        (blk.v, at.v_proj),
        (blk.o, at.out_proj),
        (blk.ffn_in, hf.fc1),
        (blk.ffn_out, hf.fc2),
    ):
        _copy_linear(theirs, mine)
    _copy_ln(hf.self_attn_layer_norm, blk.ln_attn)
    _copy_ln(hf.final_layer_norm, blk.ln_ffn)
    return hf


def _backbone_cfg(family):
    if family == "bert":
        return bert_cfg(hidden_act="gelu")
    cls = BartConfig if family == "bart" else MBartConfig
    return cls(
        d_model=D,
        encoder_attention_heads=HEADS,
        encoder_ffn_dim=FF,
        encoder_layers=L,
        activation_function="relu",
    )


@pytest.mark.parametrize("family", ["bert", "bart", "mbart"])
def test_encoder_block_equals_transformers_layer(family):
    r = 2
    net = randomize(EncoderSideNetwork(_backbone_cfg(family), SideConfig(reduction_factor=r)))
    blk = net.layers["1"]
    hf = _hf_encoder_layer(family, blk, r).eval()
    x, m = torch.randn(3, 7, D // r), mask_of([7, 4, 2], 7)
    additive = torch.where(m, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    with torch.no_grad():
        want = hf(x, additive)
        want = want[0] if isinstance(want, tuple) else want
        torch.testing.assert_close(blk(x, m[:, None, None, :]), want, rtol=1e-5, atol=1e-5)


def _hf_t5_block(blk, r, decoder, gated):
    cfg = T5Config(
        d_model=D // r, d_kv=16 // r, d_ff=FF // r, num_heads=HEADS, is_decoder=decoder,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    hf = T5Block(cfg, has_relative_attention_bias=False, layer_idx=0)
    sa = hf.layer[0].SelfAttention
    pairs = [(blk.sa.q, sa.q), (blk.sa.k, sa.k), (blk.sa.v, sa.v), (blk.sa.o, sa.o)]
    norms = [(blk.sa_ln, hf.layer[0].layer_norm), (blk.ff_ln, hf.layer[-1].layer_norm)]
    if decoder:
        ca = hf.layer[1].EncDecAttention
        pairs += [(blk.ca.q, ca.q), (blk.ca.k, ca.k), (blk.ca.v, ca.v), (blk.ca.o, ca.o)]
        norms.append((blk.ca_ln, hf.layer[1].layer_norm))
    ff = hf.layer[-1].DenseReluDense
    names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
    pairs += [(getattr(blk.ff, n), getattr(ff, n)) for n in names]
    for mine, theirs in pairs:
        _copy_linear(theirs, mine)
    for mine, theirs in norms:
        theirs.weight.data.copy_(mine.weight.data)
    return hf.eval()


@pytest.mark.parametrize(("decoder", "gated"), [(False, False), (True, False), (True, True)])
def test_t5_block_equals_transformers_t5block(decoder, gated):
    r = 2
    cfg = t5_cfg(feed_forward_proj="gated-gelu" if gated else "relu")
    net = randomize(T5SideNetwork(cfg, SideConfig(reduction_factor=r), lm_head()))
    stack = net.dec if decoder else net.enc
    blk = stack.block(1)  # a later block: it reuses the stack's position bias
    hf = _hf_t5_block(blk, r, decoder, gated)
    B, T, Te = 3, 6, 5
    x, m = torch.randn(B, T, D // r), mask_of([6, 4, 1], T)
    allowed = m[:, None, None, :]
    if decoder:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    neg = torch.finfo(torch.float32).min
    mask_add = torch.where(allowed, 0.0, neg)
    enc, enc_add = None, None
    if decoder:
        enc = torch.randn(B, Te, D // r)
        enc_add = torch.where(mask_of([5, 2, 3], Te), 0.0, neg)[:, None, None, :]
    with torch.no_grad():
        pb = stack.position_bias(T, x.device)
        want = hf(
            x,
            attention_mask=mask_add,
            position_bias=pb,
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_add,
        )[0]
        got = blk(x, pb + mask_add, enc, enc_add)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder", [False, True])
def test_t5_position_bias_equals_transformers(decoder):
    net = randomize(T5SideNetwork(t5_cfg(), SideConfig(reduction_factor=2), lm_head()))
    stack = net.dec if decoder else net.enc
    cfg = T5Config(d_model=D // 2, d_kv=8, num_heads=HEADS, is_decoder=decoder)
    hf = T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0)
    hf.relative_attention_bias.weight.data.copy_(stack.rel_bias.weight.data)
    with torch.no_grad():
        torch.testing.assert_close(
            stack.position_bias(40, torch.device("cpu")), hf.compute_bias(40, 40)
        )


# --------------------------------------------------------------------------- padding invariance


@pytest.mark.parametrize("family", ["bert", "bart", "mbart"])
def test_encoder_output_does_not_depend_on_batch_padding(family):
    net = randomize(EncoderSideNetwork(_backbone_cfg(family), SideConfig(kept_layers=(0, 2, 3))))
    alone = states(L, 1, 4)
    batch = states(L, 2, 9)
    for k in alone:
        batch[k][0, :4] = alone[k][0]  # positions 4.. of example 0 hold garbage, as padding may
    pool = torch.tensor([3, 8])  # last real token, as the BART head pools </s>
    with torch.no_grad():
        one = net(alone, torch.ones(1, 4), pool_index=pool[:1])
        two = net(batch, mask_of([4, 9], 9), pool_index=pool)
        torch.testing.assert_close(two[:1], one, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(batch, mask_of([4, 9], 9))[:1], net(alone, torch.ones(1, 4)))


@pytest.mark.parametrize("family", ["bert", "bart"])
def test_default_pooling_follows_the_family_head(family):
    """BERT's head reads [CLS] (position 0); BART's reads the last </s> (the last real token)."""
    net = randomize(EncoderSideNetwork(_backbone_cfg(family), SideConfig(kept_layers=(0, 2, 3))))
    batch, mask = states(L, 2, 9), mask_of([4, 9], 9)
    last = torch.tensor([3, 8])
    with torch.no_grad():
        default = net(batch, mask)
        expected = net(batch, mask, pool_index=last if family == "bart" else torch.zeros(2).long())
        other = net(batch, mask, pool_index=torch.zeros(2).long() if family == "bart" else last)
    torch.testing.assert_close(default, expected)
    assert not torch.allclose(default, other)


def test_t5_output_does_not_depend_on_batch_padding():
    net = randomize(T5SideNetwork(t5_cfg(), SideConfig(), lm_head()))
    e1, d1 = states(2, 1, 4), states(2, 1, 2)
    e2, d2 = states(2, 2, 9), states(2, 2, 5)
    for k in e1:
        e2[k][0, :4] = e1[k][0]
        d2[k][0, :2] = d1[k][0]
    with torch.no_grad():
        one = net(e1, torch.ones(1, 4), d1, torch.ones(1, 2))[0]
        two = net(e2, mask_of([4, 9], 9), d2, mask_of([2, 5], 5))[0]
    torch.testing.assert_close(two[:1, :2], one, rtol=1e-5, atol=1e-5)


def test_t5_side_decoder_is_causal():
    net = randomize(T5SideNetwork(t5_cfg(), SideConfig(), lm_head()))
    e, em, d, dm = t5_batch(net, B=2, Te=5, Td=4)
    later = {k: v.clone() for k, v in d.items()}
    for v in later.values():
        v[:, 2:] += torch.randn_like(v[:, 2:])  # change positions 2 and 3 of every state
    with torch.no_grad():
        base, moved = net(e, em, d, dm)[0], net(e, em, later, dm)[0]
    torch.testing.assert_close(moved[:, :2], base[:, :2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moved[:, 2:], base[:, 2:])


# --------------------------------------------------------------------------- side init


def test_load_side_init_copies_canonical_keys_of_kept_layers():
    net = EncoderSideNetwork(bert_cfg(), SideConfig(reduction_factor=4, kept_layers=(0, 2)))
    own = {k: v for k, v in net.state_dict().items() if k.startswith("layers.")}
    weights = {k: torch.randn_like(v) for k, v in own.items()}
    weights |= {k.replace("layers.0.", "layers.1."): torch.randn_like(v) for k, v in own.items()}
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("layers.")}
    assert net.load_side_init(weights) is None
    after = net.state_dict()
    assert all(torch.equal(after[k], weights[k]) for k in own)
    assert "layers.1.q.weight" not in after  # the dropped layer stays dropped
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing else touched


def test_load_side_init_rejects_a_wrong_shape_naming_the_key_and_copies_nothing():
    net = EncoderSideNetwork(bert_cfg(), SideConfig(reduction_factor=4))
    good = torch.randn(16, 16)
    bad = {"layers.0.q.weight": good, "layers.3.ffn_in.weight": torch.randn(16, 16)}
    with pytest.raises(LadderError, match=r"'layers\.3\.ffn_in\.weight' has shape \(16, 16\)"):
        net.load_side_init(bad)
    assert not torch.equal(net.layers["0"].q.weight, good)
    with pytest.raises(LadderError, match=r"'layers\.9\.q\.weight' is not a side-network key"):
        net.load_side_init({"layers.9.q.weight": good})
    with pytest.raises(LadderError, match=r"'head_out\.weight' is not a side-network key"):
        net.load_side_init({"head_out.weight": torch.randn(2, 64)})


def test_t5_load_side_init_copies_canonical_keys():
    cfg = t5_cfg(feed_forward_proj="gated-gelu", num_layers=3)
    net = T5SideNetwork(cfg, SideConfig(reduction_factor=4, kept_layers=(1,)), lm_head())
    canon = [
        "enc.1.sa.q.weight", "enc.1.sa.o.weight", "enc.1.sa_ln.weight", "enc.1.ff.wi_0.weight",
        "enc.1.ff.wi_1.weight", "enc.1.ff.wo.weight", "enc.1.ff_ln.weight", "enc.rel_bias.weight",
        "enc.final_ln.weight", "dec.1.ca.k.weight", "dec.1.ca_ln.weight", "dec.rel_bias.weight",
        "dec.final_ln.weight",
    ]  # fmt: skip
    sd = net.state_dict()
    weights = {k: torch.randn_like(sd[k]) for k in canon}
    weights["enc.2.sa.q.weight"] = torch.randn(16, 16)  # dropped layer: ignored
    net.load_side_init(weights)
    sd = net.state_dict()
    assert all(torch.equal(sd[k], weights[k]) for k in canon)
    assert "lm_head" not in sd
    with pytest.raises(LadderError, match=r"'dec\.rel_bias\.weight' has shape \(8, 4\)"):
        net.load_side_init({"dec.rel_bias.weight": torch.randn(8, 4)})
    with pytest.raises(LadderError, match=r"'enc\.1\.ff\.wi\.weight' is not a side-network key"):
        net.load_side_init({"enc.1.ff.wi.weight": torch.randn(32, 16)})


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduction_factor": 0}, r"reduction_factor=0; allowed: an int >= 1"),
        ({"reduction_factor": 2.0}, r"reduction_factor=2\.0"),
        ({"fusion": "early"}, r"fusion='early'; allowed: 'ladder', 'late', 'none'"),
        ({"kept_layers": (1, 1)}, r"kept_layers repeats \[1\]"),
        ({"kept_layers": ()}, r"kept_layers=\[\] keeps no layer"),
        ({"kept_layers": (0, "2")}, r"kept_layers=\(0, '2'\)"),
        ({"gate_T": 0}, r"gate_T=0; allowed: a number > 0"),
        ({"gate_alpha": math.inf}, r"gate_alpha=inf"),
        ({"ladder_dropout": 1.0}, r"ladder_dropout=1\.0; allowed: a probability in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0\.1"),
        ({"num_labels": 0}, r"num_labels=0; allowed: an int >= 1"),
    ],
)
def test_bad_side_config_values_raise(kwargs, match):
    with pytest.raises(LadderError, match=match):
        SideConfig(**kwargs)


@pytest.mark.parametrize(
    ("backbone", "side", "match"),
    [
        (
            bert_cfg(),
            SideConfig(reduction_factor=3),
            r"reduction_factor=3 does not divide d_model=64; allowed: one of 1, 2, 4, 8, 16",
        ),
        (bert_cfg(), SideConfig(reduction_factor=32), r"does not divide the per-head dim=16"),
        (
            bert_cfg(intermediate_size=100),
            SideConfig(reduction_factor=8),
            r"does not divide d_ff=100",
        ),
        (t5_cfg(), SideConfig(reduction_factor=32), r"does not divide the per-head dim=16"),
        (
            bert_cfg(),
            SideConfig(kept_layers=(0, 4)),
            r"kept_layers has \[4\] outside the backbone's 4 blocks; allowed: 0\.\.3",
        ),
        (t5_cfg(num_layers=3), SideConfig(kept_layers=(2,)), r"outside the decoder's 2 blocks"),
    ],
)
def test_bad_side_config_for_a_backbone_raises(backbone, side, match):
    with pytest.raises(LadderError, match=match):
        build_side_network(backbone, side, lm_head=lm_head())


def test_unsupported_backbone_and_missing_lm_head_raise():
    opt = BertConfig()
    opt.model_type = "opt"  # gpt2 was the example until GPT-2 got a side network
    with pytest.raises(LadderError, match=r"model_type='opt' has no side network; allowed: bert"):
        build_side_network(opt, SideConfig())
    with pytest.raises(LadderError, match=r"model_type='t5' needs lm_head"):
        build_side_network(t5_cfg(), SideConfig())
    with pytest.raises(LadderError, match=r"lm_head=\(100, 32\); allowed: .*\[V, 64\]"):
        build_side_network(t5_cfg(), SideConfig(), lm_head=torch.randn(V, 32))


def test_missing_or_misshapen_hidden_state_raises():
    net = EncoderSideNetwork(bert_cfg(), SideConfig(kept_layers=(1,)))
    h = states(L, 1, 3)
    with pytest.raises(LadderError, match=r"encoder hidden state 2 is missing \(given: \[0, 1\]\)"):
        net({0: h[0], 1: h[1]}, torch.ones(1, 3))
    with pytest.raises(LadderError, match=r"hidden state 2 is 32 wide; allowed: d_model=64"):
        net({0: h[0], 2: torch.randn(1, 3, 32)}, torch.ones(1, 3))


def test_side_config_survives_a_json_round_trip():
    side = SideConfig(kept_layers=[3, 1], reduction_factor=4)
    assert side.kept_layers == (1, 3)
    assert SideConfig(**dataclasses.asdict(side)) == side


# --------------------------------------------------------------------------- T5 output path


def test_t5_lm_head_is_a_frozen_buffer_and_output_scaling_follows_the_config():
    head = lm_head()
    torch.manual_seed(1)
    scaled = T5SideNetwork(t5_cfg(), SideConfig(), head).eval()
    torch.manual_seed(1)
    plain = T5SideNetwork(t5_cfg(tie_word_embeddings=False), SideConfig(), head).eval()
    assert "lm_head" not in dict(scaled.named_parameters())
    assert trainable_parameters(scaled) == sum(p.numel() for p in scaled.parameters())
    e, em, d, dm = t5_batch(scaled)
    with torch.no_grad():
        a, b = scaled(e, em, d, dm)[0], plain(e, em, d, dm)[0]
    torch.testing.assert_close(a * math.sqrt(D), b)


def test_score_candidates_equals_teacher_forced_log_probs():
    net = randomize(T5SideNetwork(t5_cfg(), SideConfig(), lm_head()))
    B, C, Te, Td = 2, 3, 5, 4
    enc, em = states(2, B, Te), mask_of([5, 3], Te)
    dec = {k: torch.randn(B, C, Td, D) for k in range(3)}
    labels = torch.randint(0, V, (B, C, Td))
    labels[0, 1, 2:] = -100
    labels[1, 2, 1:] = -100
    dm = labels != -100
    with torch.no_grad():
        got = net.score_candidates(enc, em, dec, dm, labels)
        for c in range(C):
            logits, _ = net(enc, em, {k: v[:, c] for k, v in dec.items()}, dm[:, c])
            logp = logits.log_softmax(-1)
            for b in range(B):
                n = int(dm[b, c].sum())
                want = logp[b, torch.arange(n), labels[b, c, :n]].sum()
                torch.testing.assert_close(got[b, c], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- training


def _train(net, step, n=40, lr=1e-2):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(n):
        loss = step()
        opt.zero_grad()
        loss.backward()
        if not losses:
            grads = {k: p.grad for k, p in net.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, grads


@pytest.mark.parametrize("num_labels", [3, 1])
def test_a_few_steps_reduce_the_loss_and_reach_every_part(num_labels):
    net = EncoderSideNetwork(
        bert_cfg(), SideConfig(kept_layers=(1, 3), num_labels=num_labels, dropout=0.0)
    ).train()
    h, m = states(L, 8, 6), mask_of([6, 5, 4, 3, 6, 2, 6, 1], 6)
    y = torch.randint(0, 3, (8,)) if num_labels == 3 else torch.randn(8)
    losses, grads = _train(net, lambda: net.loss(net({k: h[k] for k in net.needed_layers()}, m), y))
    assert losses[-1] < 0.5 * losses[0]
    for name in (
        "gates",
        "first_down.weight",
        "down.1.weight",
        "layers.3.q.weight",
        "up.weight",
        "head_out.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["gates"][0] == 0 and grads["gates"][1] != 0  # dropped layer 0's gate is unused


def test_t5_a_few_steps_reduce_the_loss_and_leave_the_lm_head_alone():
    head = lm_head()
    net = T5SideNetwork(t5_cfg(), SideConfig(reduction_factor=4, dropout=0.0), head).train()
    e, em, d, dm = t5_batch(net, B=4, Te=5, Td=3)
    labels = torch.randint(0, V, (4, 3))
    losses, grads = _train(net, lambda: net(e, em, d, dm, labels)[1])
    assert losses[-1] < losses[0] - 1.0
    for name in (
        "enc.gates",
        "dec.gates",
        "enc.down.0.weight",
        "dec.1.ca.q.weight",
        "enc.rel_bias.weight",
        "up.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert torch.equal(net.lm_head, head)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_narrow_cached_states_train_as_their_float32_values_and_are_saved_narrow(kind, dtype):
    """States handed over as cached (float16/bfloat16) give the logits and gradients of the same
    values in float32, and backward keeps no float32 copy of any state."""
    if kind == "bert":
        net = randomize(EncoderSideNetwork(bert_cfg(), SideConfig(num_labels=3)))
        narrow = {k: v.to(dtype) for k, v in states(L, 3, 7).items()}
        run = lambda hs: net(hs, torch.ones(3, 7))  # noqa: E731
    else:
        net = randomize(T5SideNetwork(t5_cfg(), SideConfig(), lm_head()))
        narrow = {k: v.to(dtype) for k, v in states(2, 3, 7).items()}
        run = lambda hs: net.enc(hs, torch.ones(3, 7))  # noqa: E731
    wide = {k: v.float() for k, v in narrow.items()}
    grads = []
    for hs in (wide, narrow):
        net.zero_grad()
        saved: list[torch.Tensor] = []
        keep = saved.append
        with torch.autograd.graph.saved_tensors_hooks(lambda t, k=keep: k(t) or t, lambda t: t):
            out = run(hs)
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
        state_sized = {t.dtype for t in saved if t.numel() == 3 * 7 * D}  # states, as saved
        assert state_sized == ({dtype} if hs is narrow else {torch.float32})
        if hs is wide:
            ref = out.detach()
        else:
            torch.testing.assert_close(out.detach(), ref)
    assert grads[0].keys() == grads[1].keys() and "down.0.weight" in "".join(grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
