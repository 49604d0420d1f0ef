"""Ladder side networks (LST; Sung, Cho and Bansal, NeurIPS 2022) fed by a frozen backbone's states.

The side network never holds backbone weights: it is built from the backbone's
``PretrainedConfig`` (no weights) and a ``SideConfig``, and reads the backbone's hidden states
from wherever they come from (the activation cache, or a live backbone in online LST).

State numbering (the cache's, and every forward's ``hiddens`` dict): state 0 is the embedding
output (BERT family: the embeddings module's output; BART: ``layernorm_embedding(tok + pos)``;
T5: ``shared(ids)``, unscaled), and state ``i + 1`` is the output of backbone block ``i``
(T5: before the stack's final layer norm). A backbone with L blocks has L + 1 states per stream;
``needed_layers()`` says which of them a side network reads, so a loader reads only those.

    side = SideConfig(reduction_factor=8, kept_layers=(1, 2, 3, 5), num_labels=3)
    net = build_side_network(backbone_config, side)          # T5: pass lm_head=[V, d] too
    logits = net({k: states[k] for k in net.needed_layers()}, attention_mask)   # [B, 3]
    loss = net.loss(logits, labels)

Behaviour follows the authors' code (LST_REFERENCE.md sections 1, 3 and 5): side blocks are the
backbone's blocks at width d/r with the same head count, a gate ``g = sigmoid(alpha_i / T)`` per
backbone layer mixes ``down_i(state i+1)`` into the side stream *before* side block i, and
dropped layers have neither a side block nor a down-projection.

The file reads top to bottom: configuration (``SideConfig``), the encoder-only family (BERT,
RoBERTa, ELECTRA, BART/mBART encoder), the T5 family, the builder. The decoder-only Llama family
(Llama, SmolLM2, Mistral, Qwen2) and GPT-2 have their own module, ``ladder.causal``. The family table and the
sizes read from a backbone config live in ``ladder.families``; the ladders (first and per-layer
down-projections, gates, fusion) that every family shares live in ``ladder.ladders``, and the
other shared pieces (init, loading pruned weights, RMSNorm) in ``ladder.shared``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.models.t5.modeling_t5 import T5Attention

from ladder.attention import Dropout, SideKVCache, attention, extend_cached, mask_bias
from ladder.causal import CausalSideNetwork
from ladder.errors import LadderError
from ladder.families import CAUSAL_TYPES, ENCODER_TYPES, T5_TYPES, Dims, divisors
from ladder.ladders import Ladders
from ladder.shared import (
    ClassifierHead,
    RMSNorm,
    backbone_dims,
    dropped_key,
    frozen_lm_head,
    init_weights,
    load_init,
    no_side_network,
)

FUSIONS = ("ladder", "late", "none", "xladder")
HEADS = ("cls", "lm")  # the one-stream networks' head: classification/regression, or causal LM
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SideConfig:
    """What to build on top of a backbone config; every field has a safe default."""

    reduction_factor: int = 8  # r: widths d/r, d_kv/r, d_ff/r; head count stays the backbone's
    kept_layers: tuple[int, ...] | None = None  # 0-based blocks with a side block; None = all
    fusion: str = "ladder"  # "ladder" | "late" (Side-Tuning: state L once) | "none" | "xladder"
    # xladder's delta: the top delta backbone blocks ladder into the first delta of 2 * delta side
    # blocks (ladder.ladders); None = half the backbone's blocks, rounded down, at least 1
    xladder_depth: int | None = None
    gate_alpha: float = 0.0  # initial alpha of every gate: sigmoid(0) = 0.5, the paper's zero init
    gate_T: float = 0.1  # gate temperature T in sigmoid(alpha / T), the authors' default
    ladder_dropout: float = 0.0  # dropout on ladder inputs: noise an eval-mode cache lacks
    dropout: float | None = None  # one rate for every side dropout; None = the backbone's own rates
    num_labels: int = 2  # head outputs (encoder-only families); 1 = regression (MSE); unused by T5
    head: str = "cls"  # "cls" (classification/regression) | "lm" (Llama family: the frozen LM head)
    # head "lm" as a verbaliser (classification): the vocabulary id of each label word's first
    # token, in label order; the logits are the LM head's at those ids. None: generation
    label_tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        r = self.reduction_factor
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise LadderError(f"side.reduction_factor={r!r}; allowed: an int >= 1")
        if self.kept_layers is not None:
            # JSON round trips give lists; sort so the side stream follows the backbone's order.
            kept = list(self.kept_layers) if isinstance(self.kept_layers, Iterable) else None
            if kept is None or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in kept
            ):
                raise LadderError(
                    f"side.kept_layers={self.kept_layers!r}; allowed: None or a list of "
                    "0-based block indices"
                )
            if not kept:
                raise LadderError(
                    "side.kept_layers=[] keeps no layer; allowed: None (all) or a non-empty list"
                )
            dup = sorted({i for i in kept if kept.count(i) > 1})
            if dup:
                raise LadderError(f"side.kept_layers repeats {dup}; allowed: each index once")
            object.__setattr__(self, "kept_layers", tuple(sorted(kept)))
        if self.fusion not in FUSIONS:
            raise LadderError(
                f"side.fusion={self.fusion!r}; allowed: {', '.join(map(repr, FUSIONS))}"
            )
        depth = self.xladder_depth
        if depth is not None:
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
                raise LadderError(
                    f"side.xladder_depth={depth!r}; allowed: None (half the blocks) or an int "
                    "in 1..L (the backbone's blocks)"
                )
            if self.fusion != "xladder":
                raise LadderError(
                    f"side.xladder_depth={depth} with side.fusion={self.fusion!r}; allowed: "
                    "xladder_depth only with fusion 'xladder'"
                )
        if self.fusion == "xladder" and self.kept_layers is not None:
            raise LadderError(
                f"side.kept_layers={list(self.kept_layers)} with side.fusion='xladder'; allowed: "
                "kept_layers None (xladder keeps the top xladder_depth blocks)"
            )
        if not _is_real(self.gate_alpha):
            raise LadderError(f"side.gate_alpha={self.gate_alpha!r}; allowed: a finite number")
        if not _is_real(self.gate_T) or self.gate_T <= 0:
            raise LadderError(f"side.gate_T={self.gate_T!r}; allowed: a number > 0")
        for name in ("ladder_dropout", "dropout"):
            p = getattr(self, name)
            if p is None and name == "dropout":
                continue
            if not _is_real(p) or not 0 <= p < 1:
                raise LadderError(f"side.{name}={p!r}; allowed: a probability in [0, 1)")
        if self.head not in HEADS:
            raise LadderError(f"side.head={self.head!r}; allowed: {', '.join(map(repr, HEADS))}")
        n = self.num_labels
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LadderError(f"side.num_labels={n!r}; allowed: an int >= 1 (1 = regression)")
        if self.label_tokens is not None:
            self.check_label_tokens()

    def check_label_tokens(self) -> None:
        """The verbaliser's token ids: one int per label (at least 2), each a different token,
        with head "lm"; a JSON list becomes a tuple."""
        toks = self.label_tokens
        ok = isinstance(toks, Iterable) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in toks
        )
        if not ok:
            raise LadderError(
                f"side.label_tokens={toks!r}; allowed: None or a list of token ids (ints >= 0)"
            )
        toks = tuple(toks)
        if self.head != "lm" or len(toks) != self.num_labels or self.num_labels < 2:
            raise LadderError(
                f"side.label_tokens={list(toks)} with head={self.head!r} and "
                f"num_labels={self.num_labels}; allowed: head 'lm' and one token per label "
                "(at least 2: a verbaliser classifies)"
            )
        if len(set(toks)) != len(toks):
            dup = sorted({t for t in toks if toks.count(t) > 1})
            raise LadderError(
                f"side.label_tokens={list(toks)} repeats token {dup}; allowed: a different "
                "first token for each label"
            )
        object.__setattr__(self, "label_tokens", toks)

    def depth(self, n_layers: int) -> int:
        """xladder's delta for a stack of ``n_layers`` blocks (the default: L // 2, at least 1)."""
        return self.xladder_depth if self.xladder_depth is not None else max(1, n_layers // 2)

    def kept(self, n_layers: int) -> list[int]:
        """The kept block indices for a stack of ``n_layers`` blocks (xladder: the top delta)."""
        if self.fusion == "xladder":
            return list(range(n_layers - self.depth(n_layers), n_layers))
        return list(range(n_layers)) if self.kept_layers is None else list(self.kept_layers)

    def free(self, n_layers: int) -> list[int]:
        """Side blocks with no backbone counterpart and no ladder, numbered after the backbone's
        blocks: xladder's L .. L + delta - 1; none for the other fusions."""
        if self.fusion != "xladder":
            return []
        return list(range(n_layers, n_layers + self.depth(n_layers)))

    def validate(self, backbone_config: PretrainedConfig) -> None:
        """Check r and the kept layers against a backbone; raise LadderError naming the value."""
        dims = backbone_dims(backbone_config, self)
        r = self.reduction_factor
        sizes = dims.r_divides()
        for name, value in sizes.items():
            if value % r:
                name = "the per-head dim" if name == "per-head dim" else name
                heads = ""
                if dims.rotary and name != "d_model" and name != "d_ff":  # head sizes
                    heads = (
                        f" (the side keeps the {dims.n_head} query heads grouped over "
                        f"{dims.n_kv_head} key-value heads, each head_dim/r wide, rotary pairs whole)"
                    )
                elif dims.causal and name == "the per-head dim":
                    heads = f" (the side keeps the {dims.n_head} heads, each head_dim/r wide)"
                raise LadderError(
                    f"side.reduction_factor={r} does not divide {name}={value}{heads}; "
                    f"allowed: one of {divisors(sizes)}"
                )
        if self.fusion == "xladder":
            if dims.t5:
                raise LadderError(
                    f"side.fusion='xladder' with model_type={backbone_config.model_type!r}; "
                    "allowed: a decoder-only causal LM (Llama family, GPT-2) or an encoder-only "
                    "backbone (BERT family, BART)"
                )
            n, depth = dims.n_layers, self.depth(dims.n_layers)
            if depth > n:
                raise LadderError(
                    f"side.xladder_depth={depth} exceeds the backbone's {n} blocks; allowed: 1..{n}"
                )
        stacks = (
            {"encoder": dims.n_layers, "decoder": dims.n_dec_layers}
            if dims.t5
            else {"backbone": dims.n_layers}
        )
        for stack, n in stacks.items():
            bad = [i for i in self.kept(n) if not 0 <= i < n]
            if bad:
                raise LadderError(
                    f"side.kept_layers has {bad} outside the {stack}'s {n} blocks; "
                    f"allowed: 0..{n - 1}"
                )


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- encoder-only families


class EncoderSideBlock(nn.Module):
    """A BERT/BART encoder block at side width (post-LN; mBART: pre-LN, each LN before its sublayer)."""

    def __init__(self, dims: Dims, r: int) -> None:
        super().__init__()
        d, d_ff = dims.d // r, dims.d_ff // r  # side widths; the head count stays the backbone's
        self.n_head, self.head_dim, self.pre_ln = dims.n_head, dims.head_dim // r, dims.pre_ln
        self.attn_dropout = dims.attn_dropout
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln_attn = nn.LayerNorm(d, eps=dims.ln_eps)  # after the attention residual
        self.ffn_in = nn.Linear(d, d_ff)
        self.act = ACT2FN[dims.act]
        self.ffn_out = nn.Linear(d_ff, d)
        self.ln_ffn = nn.LayerNorm(d, eps=dims.ln_eps)  # after the FFN residual
        self.drop = Dropout(dims.dropout)
        self.act_drop = Dropout(dims.act_dropout)

    def attention(self, x: Tensor, mask: Tensor) -> Tensor:
        B, T, C = x.shape  # batch, tokens, side width
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        p = self.attn_dropout if self.training else 0.0
        y = attention(q, k, v, mask, dropout_p=p)  # (B, nh, T, hs)
        return self.o(y.transpose(1, 2).reshape(B, T, C))

    def ffn(self, x: Tensor) -> Tensor:
        h = self.act_drop(self.act(self.ffn_in(x)))  # (B, T, d_ff/r)
        return self.ffn_out(h)  # (B, T, d/r)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (B, T, d/r); mask: (B, 1, 1, T) bool, True = a real token to attend to."""
        if self.pre_ln:
            x = x + self.drop(self.attention(self.ln_attn(x), mask))  # (B, T, d/r)
            return x + self.drop(self.ffn(self.ln_ffn(x)))
        x = self.ln_attn(x + self.drop(self.attention(x, mask)))  # (B, T, d/r)
        return self.ln_ffn(x + self.drop(self.ffn(x)))


class EncoderSideNetwork(ClassifierHead, Ladders):
    """Side network for BERT-family and BART/mBART encoders, with a first-token classification head.

    Canonical init keys (``load_side_init``): ``layers.{i}.{q,k,v,o,ffn_in,ffn_out}.{weight,bias}``
    and ``layers.{i}.{ln_attn,ln_ffn}.{weight,bias}`` for kept ``i`` (mBART also ``final_ln.*``);
    they are this module's own ``state_dict`` names. Fusion "xladder" (``ladder.ladders``) adds
    free blocks ``layers.{L + j}`` that no side init names (they keep their random init).
    """

    stream_note = "encoder-only backbone"
    init_keys = "layers.{i}.{q,k,v,o,ln_attn,ffn_in,ffn_out,ln_ffn}.{weight,bias} for i < L"

    def __init__(self, backbone_config: PretrainedConfig, side: SideConfig) -> None:
        super().__init__()
        side.validate(backbone_config)
        dims = backbone_dims(backbone_config, side)
        if dims.t5:
            raise LadderError(
                f"model_type={backbone_config.model_type!r} is encoder-decoder; use T5SideNetwork"
            )
        r = side.reduction_factor
        # BART's classification head reads the last </s> (the last real token); BERT's [CLS]
        self.pool_last = dims.family == "bart"
        self.build_ladders(side, dims.d, dims.n_layers, dims.dropout, "encoder")
        self.layers = nn.ModuleDict({str(i): EncoderSideBlock(dims, r) for i in self.side_blocks})
        self.final_ln = nn.LayerNorm(self.d_side, eps=dims.ln_eps) if dims.pre_ln else None
        self.build_head(self.d_side, self.d, dims.cls_dropout, side.num_labels)
        self.apply(init_weights)

    def forward(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        pool_index: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, num_labels).

        hiddens: {state: (B, T, d)}, at least ``needed_layers()``; attention_mask: (B, T) bool or
        0/1; pool_index: (B,) position whose side state feeds the head (default: [CLS] for
        the BERT family, the last real token, </s>, for BART, as the authors' heads).
        """
        return self.head(self.pooled(hiddens, attention_mask, pool_index))  # (B, num_labels)

    def pooled(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        pool_index: Tensor | None = None,
    ) -> Tensor:
        """The side state (B, d/r) that feeds the head: the body's output, before any head
        parameter (a multi-task network puts one head per task on it); arguments as forward."""
        x = self.side_input(hiddens)  # (B, T, d/r)
        mask = mask_bias(attention_mask[:, None, None, :], x.dtype)  # (B, 1, 1, T), additive
        for i in self.side_blocks:  # kept blocks, then xladder's free ones
            x = self.before_block(x, i, hiddens)
            x = self.layers[str(i)](x, mask)  # (B, T, d/r)
        x = self.after_blocks(x, hiddens)  # (B, T, d/r)
        if self.final_ln is not None:
            x = self.final_ln(x)
        if pool_index is None and self.pool_last:
            pool_index = attention_mask.long().sum(1) - 1  # right padding: the last </s>
        if pool_index is None:
            pooled = x[:, 0]  # (B, d/r): [CLS]
        else:
            rows = torch.arange(x.shape[0], device=x.device)
            pooled = x[rows, pool_index.to(x.device)]  # (B, d/r)
        return pooled


# --------------------------------------------------------------------------- T5 family


def _t5_scales_output(cfg: PretrainedConfig) -> bool:
    """Whether T5 multiplies the decoder output by d**-0.5 before the LM head.

    transformers >= 5 forces ``tie_word_embeddings=True`` and keeps the checkpoint's flag as
    ``scale_decoder_outputs`` (T5 only; its mT5 never scales); 4.x reads ``tie_word_embeddings``
    itself, as the authors' 4.6 code does.
    """
    flag = getattr(cfg, "scale_decoder_outputs", None)
    if flag is not None:
        return bool(flag)
    if cfg.model_type == "mt5" and _TRANSFORMERS_MAJOR >= 5:
        return False
    return bool(cfg.tie_word_embeddings)


class T5SideAttention(nn.Module):
    """T5 attention (no biases, no 1/sqrt(d_kv) scaling); the bias holds position bias + mask."""

    def __init__(self, d: int, n_head: int, d_kv: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.d_kv, self.dropout = n_head, d_kv, dropout
        inner = n_head * d_kv  # equals d/r unless the backbone's heads*d_kv != d (t5-3b)
        self.q = nn.Linear(d, inner, bias=False)
        self.k = nn.Linear(d, inner, bias=False)
        self.v = nn.Linear(d, inner, bias=False)
        self.o = nn.Linear(inner, d, bias=False)

    def forward(
        self,
        x: Tensor,
        kv: Tensor,
        bias: Tensor,
        cache: dict[str, Tensor] | None = None,
        grow: bool = True,
    ) -> Tensor:
        """x: (B, Tq, d/r); kv: (B, Tk, d/r); bias: additive, broadcastable to (B, nh, Tq, Tk).

        ``cache`` (incremental decoding): this attention's ``"k"``/``"v"`` (B, nh, T, hs). With
        ``grow`` (self-attention) kv's keys and values are appended to them, in place; without
        (cross-attention over a fixed memory) they are computed from kv once and then reused.
        """
        B, Tq, _ = x.shape
        q = self.q(x).view(B, Tq, self.n_head, self.d_kv).transpose(1, 2)  # (B, nh, Tq, hs)
        if cache is not None and not grow and "k" in cache:
            k, v = cache["k"], cache["v"]  # the fixed memory's, from the first step
        else:
            Tk = kv.shape[1]
            k = self.k(kv).view(B, Tk, self.n_head, self.d_kv).transpose(1, 2)  # (B, nh, Tk, hs)
            v = self.v(kv).view(B, Tk, self.n_head, self.d_kv).transpose(1, 2)
            # self-attention: after the prefix's; cross-attention: stored at the first step
            k, v = extend_cached(cache, k, v)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, bias.to(q.dtype), dropout_p=p, scale=1.0)  # (B, nh, Tq, hs)
        return self.o(y.transpose(1, 2).reshape(B, Tq, self.n_head * self.d_kv))


class T5SideFF(nn.Module):
    """T5 FFN: wi -> act -> dropout -> wo; gated (v1.1/mT5): act(wi_0) * wi_1."""

    def __init__(self, d: int, d_ff: int, act: str, gated: bool, dropout: float) -> None:
        super().__init__()
        self.gated = gated
        if gated:
            self.wi_0 = nn.Linear(d, d_ff, bias=False)
            self.wi_1 = nn.Linear(d, d_ff, bias=False)
        else:
            self.wi = nn.Linear(d, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d, bias=False)
        self.act = ACT2FN[act]
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, d/r) -> (B, T, d/r), through (B, T, d_ff/r)."""
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.drop(h))  # (B, T, d/r)


class T5SideBlock(nn.Module):
    """A pre-LN T5 block at side width: self-attention, [cross-attention], FFN."""

    def __init__(self, dims: Dims, r: int, cross: bool) -> None:
        super().__init__()
        d = dims.d // r
        self.n_head, self.head_dim = dims.n_head, dims.head_dim // r
        self.sa = T5SideAttention(d, dims.n_head, self.head_dim, dims.attn_dropout)
        self.sa_ln = RMSNorm(d, dims.ln_eps)
        if cross:
            self.ca = T5SideAttention(d, dims.n_head, self.head_dim, dims.attn_dropout)
            self.ca_ln = RMSNorm(d, dims.ln_eps)
        self.ff = T5SideFF(d, dims.d_ff // r, dims.act, dims.gated, dims.act_dropout)
        self.ff_ln = RMSNorm(d, dims.ln_eps)
        self.drop = Dropout(dims.dropout)

    def forward(
        self,
        x: Tensor,
        sa_bias: Tensor,
        enc: Tensor | None = None,
        ca_bias: Tensor | None = None,
        cache: dict[str, Any] | None = None,
    ) -> Tensor:
        """x: (B, T, d/r); sa_bias: (B, nh, T, T_past + T) position bias + mask; enc: (B, Te,
        d/r). ``cache``: this block's ``{"sa": ..., "ca": ...}`` (incremental decoding)."""
        sa = ca = None
        if cache is not None:
            sa, ca = cache.setdefault("sa", {}), cache.setdefault("ca", {})
        h = self.sa_ln(x)
        x = x + self.drop(self.sa(h, h, sa_bias, sa))  # (B, T, d/r)
        if enc is not None:
            x = x + self.drop(self.ca(self.ca_ln(x), enc, ca_bias, ca, grow=False))  # (B, T, d/r)
        return x + self.drop(self.ff(self.ff_ln(x)))


class T5SideStack(Ladders):
    """One side stack (encoder or decoder). Kept block i is the child module named ``"i"``."""

    def __init__(self, cfg: PretrainedConfig, dims: Dims, side: SideConfig, decoder: bool) -> None:
        super().__init__()
        r = side.reduction_factor
        L = dims.n_dec_layers if decoder else dims.n_layers
        self.decoder = decoder
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.build_ladders(side, dims.d, L, dims.dropout, "decoder" if decoder else "encoder")
        for i in self.kept:
            self.add_module(str(i), T5SideBlock(dims, r, cross=decoder))
        # The reference's first kept side block owns the table and later blocks reuse its bias;
        # one table per stack, computed once per forward, is the same thing.
        self.rel_bias = nn.Embedding(self.num_buckets, dims.n_head)
        self.final_ln = RMSNorm(self.d_side, dims.ln_eps)
        self.apply(init_weights)
        nn.init.normal_(self.rel_bias.weight, std=self.d_side**-0.5)  # HF T5 init at side d_model

    def block(self, i: int) -> T5SideBlock:
        return getattr(self, str(i))

    def position_bias(self, T: int, device: torch.device, past: int = 0) -> Tensor:
        """Relative position bias (1, nh, T, past + T) of queries at positions past .. past + T - 1
        over memory 0 .. past + T - 1; bidirectional buckets in the encoder only."""
        query = torch.arange(past, past + T, dtype=torch.long, device=device)
        memory = torch.arange(past + T, dtype=torch.long, device=device)
        buckets = T5Attention._relative_position_bucket(
            memory[None, :] - query[:, None],  # memory - query, (T, past + T)
            bidirectional=not self.decoder,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.rel_bias(buckets).permute(2, 0, 1)[None]

    def forward(
        self,
        hiddens: Mapping[int, Tensor],
        mask: Tensor | None,
        enc: Tensor | None = None,
        enc_mask: Tensor | None = None,
        cache: SideKVCache | None = None,
    ) -> Tensor:
        """(B, T, d/r) from hiddens {state: (B, T, d)} and mask (B, T) or None.

        Decoder: ``enc`` (B, T_enc, d/r) is the side encoder output, ``enc_mask`` (B, T_enc);
        ``cache`` (incremental decoding, decoder only, no padding: ``mask`` None): the earlier
        positions' keys and values per kept block, the new positions' added to it. Every
        operation outside attention is per position, so the new positions' outputs are the ones
        a pass over the whole prefix computes there.
        """
        x = self.side_input(hiddens)  # (B, T, d/r)
        B, T, _ = x.shape
        past = 0
        if cache is not None:
            if not self.decoder or mask is not None:
                raise LadderError(
                    "a side KV cache is for the decoder without padding; allowed: the decoder "
                    "stack with mask None"
                )
            past = cache.length
        allowed = torch.ones(B, 1, 1, past + T, dtype=torch.bool, device=x.device)
        if mask is not None:
            allowed = mask.bool().to(x.device)[:, None, None, :]  # (B, 1, 1, T)
        if self.decoder:  # query past + t sees memory 0 .. past + t
            causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            allowed = allowed & causal  # (B, 1, T, past + T)
        neg = torch.finfo(x.dtype).min  # finite, so a fully masked row stays finite
        # (B, nh, T, past + T): relative position bias + mask
        bias = self.position_bias(T, x.device, past)
        sa_bias = bias + torch.where(allowed, 0.0, neg).to(x.dtype)
        ca_bias = None
        if enc is not None:
            e = (
                torch.ones(enc.shape[:2], dtype=torch.bool, device=x.device)
                if enc_mask is None
                else enc_mask
            )
            e = e.bool().to(x.device)[:, None, None, :]  # (B, 1, 1, T_enc)
            ca_bias = torch.where(e, 0.0, neg).to(x.dtype)  # (B, 1, 1, T_enc)
        for i in self.kept:
            x = self.before_block(x, i, hiddens)
            kv = None if cache is None else cache.blocks.setdefault(i, {})
            x = self.block(i)(x, sa_bias, enc, ca_bias, kv)  # (B, T, d/r)
        if cache is not None:
            cache.length = past + T
        x = self.after_blocks(x, hiddens)  # (B, T, d/r)
        return self.drop(self.final_ln(x))  # (B, T, d/r)

    def canonical_params(self, prefix: str) -> dict[str, Tensor]:
        own = {
            f"{prefix}.{i}.{k}": p for i in self.kept for k, p in self.block(i).named_parameters()
        }
        own[f"{prefix}.rel_bias.weight"] = self.rel_bias.weight
        own[f"{prefix}.final_ln.weight"] = self.final_ln.weight
        return own


class T5SideNetwork(nn.Module):
    """LST for T5/mT5: side encoder and side decoder, up-projection, frozen LM head.

    Canonical init keys (``load_side_init``) are this module's own ``state_dict`` names:
    ``enc.{i}.sa.{q,k,v,o}.weight``, ``enc.{i}.{sa_ln,ff_ln}.weight``,
    ``enc.{i}.ff.{wi|wi_0,wi_1,wo}.weight``, ``enc.rel_bias.weight``, ``enc.final_ln.weight``;
    the same under ``dec.`` plus ``dec.{i}.ca.{q,k,v,o}.weight`` and ``dec.{i}.ca_ln.weight``.
    The kept list applies to both stacks.
    """

    def __init__(
        self, backbone_config: PretrainedConfig, side: SideConfig, lm_head: Tensor
    ) -> None:
        super().__init__()
        side.validate(backbone_config)
        dims = backbone_dims(backbone_config, side)
        if not dims.t5:
            raise LadderError(
                f"model_type={backbone_config.model_type!r} is not T5; use EncoderSideNetwork"
            )
        lm = frozen_lm_head(lm_head, dims.d, "T5 side network")
        self.side, self.d, self.d_side = side, dims.d, dims.d // side.reduction_factor
        self.enc = T5SideStack(backbone_config, dims, side, decoder=False)
        self.dec = T5SideStack(backbone_config, dims, side, decoder=True)
        self.up = nn.Linear(self.d_side, self.d)
        init_weights(self.up)
        self.out_scale = self.d**-0.5 if _t5_scales_output(backbone_config) else 1.0
        # Frozen and not saved with the side checkpoint: stage two gets it from the cache.
        self.register_buffer("lm_head", lm.to(self.up.weight.dtype), persistent=False)

    def needed_layers(self, stack: str = "enc") -> list[int]:
        """State numbers stack 'enc' or 'dec' reads (0 = shared(ids), i + 1 = output of block i)."""
        if stack not in ("enc", "dec"):
            raise LadderError(f"stack={stack!r}; allowed: 'enc', 'dec'")
        s = self.enc if stack == "enc" else self.dec
        return s.needed_states()

    def _logits(self, dec: Tensor) -> Tensor:
        return F.linear(self.up(dec) * self.out_scale, self.lm_head)  # (B, T, V)

    def forward(
        self,
        enc_hiddens: Mapping[int, Tensor],
        enc_mask: Tensor,
        dec_hiddens: Mapping[int, Tensor],
        dec_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced pass -> (logits (B, T_dec, V), loss or None).

        enc_hiddens: {state: (B, T_enc, d)}; enc_mask: (B, T_enc); dec_hiddens:
        {state: (B, T_dec, d)} on the shifted-right targets; dec_mask: (B, T_dec) or None
        (causal only, as the reference trains); labels: (B, T_dec), -100 on padding.
        """
        enc, enc_mask = self.encode(enc_hiddens, enc_mask)
        return self.decode(enc, enc_mask, dec_hiddens, dec_mask, labels)

    def encode(self, enc_hiddens: Mapping[int, Tensor], enc_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The side encoder's output (B, T_enc, d/r) and the mask (B, T_enc) the side decoder's
        cross-attention reads it with (here ``enc_mask`` itself)."""
        return self.enc(enc_hiddens, enc_mask), enc_mask

    def decode(
        self,
        enc: Tensor,
        enc_mask: Tensor,
        dec_hiddens: Mapping[int, Tensor],
        dec_mask: Tensor | None = None,
        labels: Tensor | None = None,
        last_only: bool = False,
        cache: SideKVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`forward` after the side encoder: enc (B, T_e, d/r), enc_mask (B, T_e).
        ``last_only``: the logits of the last decoder position alone (B, 1, V), what greedy
        decoding reads (the LM head on every position of the prefix would be most of a step).
        ``cache`` (incremental decoding): ``dec_hiddens`` are the new positions' states alone,
        the earlier positions' keys and values come from the cache (:meth:`T5SideStack.forward`)."""
        dec = self.dec(dec_hiddens, dec_mask, enc, enc_mask, cache)  # (B, T_dec, d/r)
        logits = self._logits(dec[:, -1:] if last_only else dec)
        loss = None if labels is None else self.loss(logits, labels)
        return logits, loss

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Token cross-entropy, ignoring -100."""
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten().long(), ignore_index=-100
        )

    def score_candidates(
        self,
        enc_hiddens: Mapping[int, Tensor],
        enc_mask: Tensor,
        dec_hiddens: Mapping[int, Tensor],
        dec_mask: Tensor | None,
        labels: Tensor,
    ) -> Tensor:
        """Summed log-probability of each candidate label string -> (B, C).

        The side encoder runs once per example. dec_hiddens: {state: (B, C, T_dec, d)} under teacher
        forcing on each candidate; dec_mask: (B, C, T_dec) or None; labels: (B, C, T_dec), -100 on
        padding. Pick a prediction with ``argmax(-1)``.
        """
        enc, enc_mask = self.encode(enc_hiddens, enc_mask)
        return self.score_encoded(enc, enc_mask, dec_hiddens, dec_mask, labels)

    def score_encoded(
        self,
        enc: Tensor,
        enc_mask: Tensor,
        dec_hiddens: Mapping[int, Tensor],
        dec_mask: Tensor | None,
        labels: Tensor,
    ) -> Tensor:
        """:meth:`score_candidates` after the side encoder: enc (B, T_e, d/r), enc_mask (B, T_e)."""
        B, C, T = labels.shape
        enc = enc.repeat_interleave(C, dim=0)  # (B*C, T_enc, d/r)
        flat = {k: h.flatten(0, 1) for k, h in dec_hiddens.items()}  # (B*C, T_dec, d)
        dmask = None if dec_mask is None else dec_mask.flatten(0, 1)
        dec = self.dec(flat, dmask, enc, enc_mask.repeat_interleave(C, dim=0))  # (B*C, T_dec, d/r)
        logp = self._logits(dec).float().log_softmax(-1)  # (B*C, T_dec, V)
        tok = labels.flatten(0, 1).to(logp.device)
        valid = tok != -100
        lp = logp.gather(-1, tok.clamp(min=0)[..., None]).squeeze(-1) * valid  # (B*C, T_dec)
        return lp.sum(-1).view(B, C)

    def load_side_init(self, weights: Mapping[str, Tensor]) -> None:
        """Copy canonical (pruned) weights into both stacks' kept layers; see EncoderSideNetwork."""
        own = {**self.enc.canonical_params("enc"), **self.dec.canonical_params("dec")}
        pattern = re.compile(r"^(enc|dec)\.(\d+)\.")
        kept = {"enc": self.enc.kept, "dec": self.dec.kept}
        n = {"enc": self.enc.n_layers, "dec": self.dec.n_layers}
        allowed = (
            "{enc,dec}.{i}.{sa,ca,ff,sa_ln,ca_ln,ff_ln}..., {enc,dec}.{rel_bias,final_ln}.weight"
        )
        load_init(weights, own, lambda key: dropped_key(key, pattern, kept, n), allowed)


# --------------------------------------------------------------------------- builder


def build_side_network(
    backbone_config: PretrainedConfig, side: SideConfig, lm_head: Tensor | None = None
) -> nn.Module:
    """EncoderSideNetwork, CausalSideNetwork (Llama family, GPT-2) or T5SideNetwork (needs
    ``lm_head`` [V, d]) for a backbone config; a causal network with ``side.head == "lm"`` needs
    it too."""
    mt = getattr(backbone_config, "model_type", None)
    if side.head == "lm" and mt not in CAUSAL_TYPES:
        raise LadderError(
            f"side.head='lm' needs a decoder-only causal backbone; model_type={mt!r} is not one "
            f"(allowed: {', '.join(CAUSAL_TYPES)})"
        )
    if mt in ENCODER_TYPES:
        return EncoderSideNetwork(backbone_config, side)
    if mt in CAUSAL_TYPES:
        return CausalSideNetwork(backbone_config, side, lm_head)
    if mt in T5_TYPES:
        if lm_head is None:
            raise LadderError(
                f"model_type={mt!r} needs lm_head (the frozen [V, d] LM head weight); got None"
            )
        return T5SideNetwork(backbone_config, side, lm_head)
    raise no_side_network(mt)


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that require grad (the frozen LM head is a buffer, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
