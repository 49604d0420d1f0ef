"""The backbone families the model code supports, and the sizes it reads from their configs.

One table owns both: ``FAMILY`` maps a transformers ``model_type`` to its family, and
:func:`dims_of` reads one :class:`Dims` record from a config. The side network copies those sizes
(at width d/r), pruning shrinks the same ones by r, and the backbone wrapper counts its states
with :func:`num_blocks`.

    dims = dims_of(AutoConfig.from_pretrained("bert-base-uncased"))
    dims.family, dims.d, dims.n_layers     # ("bert", 768, 12)
    dims.r_divides()                       # {"d_model": 768, "per-head dim": 64, "d_ff": 3072}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ladder.errors import LadderError

# model_type -> family. "bert": post-LN encoder, one stream; "bart": the BART/mBART encoder, one
# stream; "t5": encoder-decoder, an encoder stream and a teacher-forced decoder stream; "llama":
# decoder-only causal LMs (Llama, SmolLM2, Mistral, Qwen2: pre-RMSNorm, rotary, grouped KV heads,
# SwiGLU), one causal stream; "gpt2": decoder-only GPT-2 (pre-LayerNorm with biases, learned
# absolute positions added to the token embeddings, multi-head attention, GELU MLP), one causal
# stream.
FAMILY = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "bart": "bart",
    "mbart": "bart",
    "t5": "t5",
    "mt5": "t5",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
}
FAMILIES = ("bert", "bart", "t5", "llama", "gpt2")
CAUSAL_FAMILIES = ("llama", "gpt2")  # decoder-only: one causal stream, last-token head
ENCODER_TYPES = tuple(mt for mt, fam in FAMILY.items() if fam in ("bert", "bart"))  # encoder-only
T5_TYPES = tuple(mt for mt, fam in FAMILY.items() if fam == "t5")  # encoder-decoder
CAUSAL_TYPES = tuple(mt for mt, fam in FAMILY.items() if fam in CAUSAL_FAMILIES)  # decoder-only


def family_of(config: Any) -> str:
    """ "bert" (BERT family), "bart", "t5", "llama" or "gpt2"; an error for the others."""
    mt = config.model_type
    if mt not in FAMILY:
        raise LadderError(
            f"backbone architecture {mt!r} is not supported; allowed: BERT family (bert, roberta, "
            "xlm-roberta, electra), bart, t5, Llama family (llama, mistral, qwen2), gpt2"
        )
    return FAMILY[mt]


def check_family(family: str) -> None:
    """Raise LadderError unless ``family`` is one of ``FAMILIES``."""
    if family not in FAMILIES:
        allowed = ", ".join(repr(f) for f in FAMILIES)
        raise LadderError(f"unknown model family {family!r}; allowed: {allowed}")


def num_blocks(config: Any) -> tuple[int, int]:
    """(encoder blocks, decoder blocks) of a backbone config; decoder 0 for encoder-only."""
    fam = family_of(config)
    if fam in ("bert", "llama", "gpt2"):  # GPT2Config aliases num_hidden_layers to n_layer
        return config.num_hidden_layers, 0
    if fam == "bart":
        return config.encoder_layers, 0
    n_dec = config.num_decoder_layers
    return config.num_layers, n_dec if n_dec is not None else config.num_layers


def d_model(config: Any) -> int:
    """The backbone width (``hidden_size``; BART and T5 configs alias it to ``d_model``)."""
    return getattr(config, "hidden_size", None) or config.d_model


def divisors(sizes: Mapping[str, int]) -> str:
    """The reduction factors that divide every size, as "1, 2, 4, ..." for an error message."""
    common = math.gcd(*sizes.values())
    return ", ".join(str(k) for k in range(1, common + 1) if common % k == 0)


@dataclass(frozen=True)
class Dims:
    """The backbone sizes and settings a side network copies, read from the backbone config."""

    family: str  # "bert" | "bart" | "t5" | "llama" | "gpt2"
    d: int  # backbone width d_model
    n_head: int  # attention heads (the side keeps the same count)
    head_dim: int  # backbone per-head dim (T5: d_kv)
    d_ff: int  # backbone FFN inner width
    n_layers: int  # (encoder) blocks L
    n_dec_layers: int  # T5 decoder blocks; 0 for encoder-only
    act: str  # FFN activation name in transformers' ACT2FN
    gated: bool  # T5 v1.1 / mT5 gated FFN (wi_0, wi_1)
    ln_eps: float
    pre_ln: bool  # mBART is pre-LN with a final encoder LN; BERT family and BART are post-LN
    dropout: float  # residual / embedding dropout
    attn_dropout: float  # dropout on attention probabilities
    act_dropout: float  # dropout inside the FFN after the activation (0 for the BERT family)
    cls_dropout: float  # dropout of the classification head
    # decoder-only families (the defaults suit the others): norm kind, grouped KV heads, rotary,
    # biases; the MLP is SwiGLU where ``gated`` (Llama), else up -> act -> down (GPT-2)
    norm: str = "layer"  # "layer": LayerNorm with bias (GPT-2); "rms": RMSNorm, scale only (Llama)
    rotary: bool = False  # rotary positions in attention (Llama); GPT-2's positions are in state 0
    n_kv_head: int = 0  # key/value heads; n_head / n_kv_head query heads share each (GQA)
    rope_theta: float = 10000.0  # rotary base
    rope_type: str = "default"  # the backbone's rotary scaling; the side uses plain rotary
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # the attention output projection has a bias (Llama's attention_bias)
    mlp_bias: bool = False  # gate/up/down have biases (Llama's mlp_bias)

    @property
    def t5(self) -> bool:
        """Encoder-decoder T5 family (else an encoder-only family)."""
        return self.family == "t5"

    @property
    def causal(self) -> bool:
        """Decoder-only causal LM (the Llama family, GPT-2)."""
        return self.family in CAUSAL_FAMILIES

    def r_divides(self) -> dict[str, int]:
        """The sizes a reduction factor r must divide, so that each keeps exactly n/r.

        Llama family: rotary positions rotate dims j and j + head_dim/2 together, so a side head
        of head_dim/r dims keeps whole pairs: r divides head_dim/2 as well.
        """
        sizes = {"d_model": self.d, "per-head dim": self.head_dim, "d_ff": self.d_ff}
        if self.rotary:
            sizes["rotary pairs per head"] = self.head_dim // 2
        return sizes


def dims_of(cfg: Any) -> Dims:
    """The :class:`Dims` of a backbone config; LadderError for an unsupported ``model_type``."""
    family = family_of(cfg)
    d, (n_layers, n_dec_layers) = d_model(cfg), num_blocks(cfg)
    if family == "bert":
        h = cfg.num_attention_heads
        hid, att = cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob
        cls = getattr(cfg, "classifier_dropout", None)
        return Dims(
            family, d=d, n_head=h, head_dim=d // h, d_ff=cfg.intermediate_size,
            n_layers=n_layers, n_dec_layers=n_dec_layers, act=cfg.hidden_act, gated=False,
            ln_eps=cfg.layer_norm_eps, pre_ln=False, dropout=hid, attn_dropout=att,
            act_dropout=0.0, cls_dropout=hid if cls is None else cls,
        )  # fmt: skip
    if family == "bart":
        h = cfg.encoder_attention_heads
        return Dims(
            family, d=d, n_head=h, head_dim=d // h, d_ff=cfg.encoder_ffn_dim,
            n_layers=n_layers, n_dec_layers=n_dec_layers, act=cfg.activation_function,
            gated=False, ln_eps=1e-5, pre_ln=cfg.model_type == "mbart", dropout=cfg.dropout,
            attn_dropout=cfg.attention_dropout, act_dropout=cfg.activation_dropout,
            cls_dropout=cfg.classifier_dropout or 0.0,
        )  # fmt: skip
    if family == "llama":
        return _llama_dims(cfg, d, n_layers)
    if family == "gpt2":
        return _gpt2_dims(cfg, d, n_layers)
    p = cfg.dropout_rate
    return Dims(
        family, d=d, n_head=cfg.num_heads, head_dim=cfg.d_kv, d_ff=cfg.d_ff,
        n_layers=n_layers, n_dec_layers=n_dec_layers, act=cfg.dense_act_fn,
        gated=bool(cfg.is_gated_act), ln_eps=cfg.layer_norm_epsilon, pre_ln=True,
        dropout=p, attn_dropout=p, act_dropout=p, cls_dropout=p, norm="rms",
    )  # fmt: skip


def _llama_dims(cfg: Any, d: int, n_layers: int) -> Dims:
    """Llama, Mistral, Qwen2: pre-RMSNorm blocks, rotary, grouped KV heads, SwiGLU MLP."""
    h = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    head_dim = getattr(cfg, "head_dim", None) or d // h
    if h % kv:
        raise LadderError(
            f"backbone has {h} query heads and {kv} key-value heads; allowed: a number of "
            "key-value heads that divides the query heads"
        )
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    attn_bias = bool(getattr(cfg, "attention_bias", False))
    qwen2 = cfg.model_type == "qwen2"  # q/k/v biases, none on o
    return Dims(
        "llama", d=d, n_head=h, head_dim=head_dim, d_ff=cfg.intermediate_size,
        n_layers=n_layers, n_dec_layers=0, act=cfg.hidden_act, gated=True,
        ln_eps=cfg.rms_norm_eps, pre_ln=True, dropout=0.0,
        attn_dropout=float(getattr(cfg, "attention_dropout", 0.0) or 0.0), act_dropout=0.0,
        cls_dropout=0.0, norm="rms", rotary=True, n_kv_head=kv, rope_theta=float(theta),
        rope_type=str(rope.get("rope_type", rope.get("type", "default"))),
        qkv_bias=attn_bias or qwen2, o_bias=attn_bias and not qwen2,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
    )  # fmt: skip


def _gpt2_dims(cfg: Any, d: int, n_layers: int) -> Dims:
    """GPT-2: pre-LayerNorm blocks (with biases), one KV head per query head, plain GELU MLP.

    Positions are learned absolute embeddings added before block 0, so they are in state 0; the
    attention has no rotary. GPT-2's ``scale_attn_by_inverse_layer_idx`` (off in the released
    checkpoints) is not copied: the side scales scores by its own head width only.
    """
    h = cfg.n_head
    return Dims(
        "gpt2", d=d, n_head=h, head_dim=d // h, d_ff=cfg.n_inner or 4 * d,
        n_layers=n_layers, n_dec_layers=0, act=cfg.activation_function, gated=False,
        ln_eps=cfg.layer_norm_epsilon, pre_ln=True, dropout=cfg.resid_pdrop,
        attn_dropout=cfg.attn_pdrop, act_dropout=0.0, cls_dropout=cfg.resid_pdrop,
        norm="layer", rotary=False, n_kv_head=h, qkv_bias=True, o_bias=True, mlp_bias=True,
    )  # fmt: skip
