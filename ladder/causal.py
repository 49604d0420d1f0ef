"""Ladder side network for decoder-only causal LMs: the Llama family (Llama, SmolLM2, Mistral,
Qwen2) and GPT-2.

The side blocks are the backbone's blocks at width d/r, as for the other families: pre-RMSNorm,
causal self-attention with rotary positions that keeps the backbone's query heads *and* its
grouped key-value heads (query head h reads key-value head h // (n_head / n_kv_head), as in
transformers' ``repeat_kv``), each head_dim/r wide, and a SwiGLU MLP at d_ff/r. The ladders
(``ladder.ladders``) are the same as everywhere: ``first_down`` on state 0 (the token
embeddings), and a gated ``down_i(state i + 1)`` mixed in before each kept side block.

    side = SideConfig(reduction_factor=8, num_labels=2)
    net = CausalSideNetwork(llama_config, side)                # or build_side_network(...)
    logits = net({k: states[k] for k in net.needed_layers()}, attention_mask)   # [B, 2]

States: state 0 is ``embed_tokens(ids)``, state ``i + 1`` the residual stream after block ``i``;
for the last block that is before the model's final norm (as the T5 states), so every state is
a raw residual stream. The side network has its own final RMSNorm.

Head (classification or regression): the side stream after the final norm is read at each
example's last real token (the attention mask's last True position: with right padding that is
``mask.sum(1) - 1``), as ``LlamaForSequenceClassification`` pools; then, as the encoder-only
side network's head, ``up`` (d/r -> d), dropout, dense, tanh, dropout, out. A causal model's last
token is the only one that has seen the whole input.

GPT-2, through the same classes (``Dims`` chooses): LayerNorm with bias in place of RMSNorm
(:func:`side_norm`), every head its own key-value head, biases on q/k/v/o and on the MLP, a plain
``up -> gelu_new -> down`` MLP in place of SwiGLU (``dims.gated`` False), and no rotary: GPT-2's
positions are learned absolute embeddings added to the token embeddings before block 0, so they
are in state 0 (``wte(ids) + wpe(pos)``) and reach the side stream through ``first_down``; the
side's attention gets ``cos, sin = None``.

Head "lm" (``SideConfig(head="lm")``, generation): the side stream after the final norm goes up
to d (``up``, d/r -> d, trained) and through the backbone's *frozen* LM head [V, d] (a
non-persistent buffer: never trained, never saved; stage one stores it in the cache's
``frozen/lm_head``, for tied embeddings ``embed_tokens``' weight), as ``LlamaForCausalLM``: the
logits at position t predict token t + 1, and the loss is the cross-entropy on the positions
whose label is not -100 (the answer tokens). :meth:`CausalSideNetwork.decode` runs new tokens
only, against a :class:`~ladder.attention.SideKVCache` of every kept block's keys and values
(rotary at the positions after the cached ones), for greedy generation (``ladder.generation``).

Head "lm" with ``SideConfig(label_tokens=...)`` (a verbaliser, classification): the side stream
is read at the last real token, as the "cls" head reads it, then goes through ``up`` and the
frozen LM head's rows of the label words' first tokens (:func:`label_rows`): the logits
(B, num_labels) are the LM's next-token logits of those words after the prompt, and the loss is
the classification cross-entropy over them.

Rotary: the side's heads are head_dim/r wide and rotate pairs (j, j + head_dim/(2r)) at the
plain rotary frequencies of that width with the backbone's base theta, which are every r-th
frequency of the backbone's own. Rotary scaling variants of the backbone (Llama 3's ``llama3``
type) are not copied; the side's sequences are short.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from ladder.attention import Dropout, SideKVCache, attention, extend_cached, mask_bias
from ladder.errors import LadderError
from ladder.families import Dims
from ladder.ladders import Ladders
from ladder.shared import (
    ClassifierHead,
    RMSNorm,
    backbone_dims,
    frozen_lm_head,
    init_weights,
)

if TYPE_CHECKING:
    from ladder.side import SideConfig


def label_rows(lm_head: Tensor, label_tokens: tuple[int, ...]) -> Tensor:
    """The verbaliser's head: the frozen LM head's rows [num_labels, d] of the label words' first
    tokens, so that ``up(x) @ rows.T`` equals the full logits gathered at those ids."""
    V = lm_head.shape[0]
    if max(label_tokens) >= V:
        raise LadderError(
            f"side.label_tokens={list(label_tokens)}; allowed: token ids below the LM head's "
            f"vocabulary size {V}"
        )
    return lm_head[list(label_tokens)].clone()


def side_norm(dims: Dims, d: int) -> nn.Module:
    """The family's norm at width ``d``: RMSNorm (Llama) or LayerNorm with bias (GPT-2)."""
    return RMSNorm(d, dims.ln_eps) if dims.norm == "rms" else nn.LayerNorm(d, eps=dims.ln_eps)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's halves (transformers' Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(inv_freq: Tensor, T: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin (T, head_dim) for positions 0..T-1, computed in float32 as transformers does."""
    pos = torch.arange(T, device=inv_freq.device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.float()[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class CausalSideAttention(nn.Module):
    """Causal self-attention (rotary positions if given, grouped KV heads) at side width."""

    def __init__(self, d: int, n_head: int, n_kv_head: int, head_dim: int, dims: Dims) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.group = n_head // n_kv_head  # query heads per key-value head
        self.dropout = dims.attn_dropout
        self.q = nn.Linear(d, n_head * head_dim, bias=dims.qkv_bias)
        self.k = nn.Linear(d, n_kv_head * head_dim, bias=dims.qkv_bias)
        self.v = nn.Linear(d, n_kv_head * head_dim, bias=dims.qkv_bias)
        self.o = nn.Linear(n_head * head_dim, d, bias=dims.o_bias)

    def forward(
        self,
        x: Tensor,
        bias: Tensor,
        cos: Tensor | None = None,
        sin: Tensor | None = None,
        kv: dict | None = None,
    ) -> Tensor:
        """x: (B, T, d/r); bias: (B, 1, T, T_kv) additive (causal + padding); cos, sin: (T, hd/r)
        at x's positions, or None for no rotary (GPT-2). ``kv`` (incremental decoding): this
        block's cached ``"k"``/``"v"`` (B, nkv, T_past, hd/r), extended in place with x's keys and
        values (T_kv = T_past + T)."""
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.q(x).view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd/r)
        k = self.k(x).view(B, T, self.n_kv_head, hd).transpose(1, 2)  # (B, nkv, T, hd/r)
        v = self.v(x).view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if cos is not None and sin is not None:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        k, v = extend_cached(kv, k, v)  # (B, nkv, T_past + T, hd/r)
        if self.group > 1:  # query head h reads key-value head h // group
            k = k.repeat_interleave(self.group, dim=1)  # (B, nh, T, hd/r)
            v = v.repeat_interleave(self.group, dim=1)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, bias, dropout_p=p)  # (B, nh, T, hd/r), scale hd^-0.5
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * hd))


class CausalSideBlock(nn.Module):
    """A pre-norm decoder block at side width: x + attn(norm(x)), then x + mlp(norm(x)).

    Llama: RMSNorm, SwiGLU MLP ``down(act(gate(h)) * up(h))``; GPT-2: LayerNorm, plain MLP
    ``down(act(up(h)))`` (``up`` is GPT-2's ``c_fc``, ``down`` its ``mlp.c_proj``).
    """

    def __init__(self, dims: Dims, r: int) -> None:
        super().__init__()
        d, d_ff = dims.d // r, dims.d_ff // r
        self.ln_attn = side_norm(dims, d)  # input_layernorm / ln_1
        self.attn = CausalSideAttention(d, dims.n_head, dims.n_kv_head, dims.head_dim // r, dims)
        self.ln_ffn = side_norm(dims, d)  # post_attention_layernorm / ln_2
        if dims.gated:
            self.gate = nn.Linear(d, d_ff, bias=dims.mlp_bias)
        self.up = nn.Linear(d, d_ff, bias=dims.mlp_bias)
        self.down = nn.Linear(d_ff, d, bias=dims.mlp_bias)
        self.act = ACT2FN[dims.act]
        self.drop = Dropout(dims.dropout)
        self.gated = dims.gated

    def forward(
        self,
        x: Tensor,
        bias: Tensor,
        cos: Tensor | None = None,
        sin: Tensor | None = None,
        kv: dict | None = None,
    ) -> Tensor:
        """x: (B, T, d/r) -> (B, T, d/r); ``kv``: the attention's cache (incremental decoding)."""
        x = x + self.drop(self.attn(self.ln_attn(x), bias, cos, sin, kv))
        return x + self.drop(self.mlp(self.ln_ffn(x)))

    def mlp(self, h: Tensor) -> Tensor:
        """(B, T, d/r) -> (B, T, d/r) via (B, T, d_ff/r)."""
        if self.gated:
            return self.down(self.act(self.gate(h)) * self.up(h))
        return self.down(self.act(self.up(h)))


class CausalSideNetwork(ClassifierHead, Ladders):
    """Side network for Llama-family and GPT-2 backbones, with a last-real-token classification
    head (``side.head == "cls"``) or the backbone's frozen LM head (``"lm"``, needs ``lm_head``).

    Canonical init keys (``load_side_init``), this module's own ``state_dict`` names:
    ``layers.{i}.attn.{q,k,v,o}.{weight[,bias]}``, ``layers.{i}.{gate,up,down}.weight``
    (GPT-2: ``layers.{i}.{up,down}.{weight,bias}``), ``layers.{i}.{ln_attn,ln_ffn}.weight``
    (GPT-2: and ``.bias``) for kept ``i``, and ``final_ln.weight`` (GPT-2: and ``.bias``).
    Fusion "xladder" (``ladder.ladders``) adds free blocks ``layers.{L + j}`` after the kept top
    delta; no side init names them, they keep their random init.
    """

    stream_note = "the causal stream"
    init_keys = (
        "layers.{i}.{attn.q,attn.k,attn.v,attn.o,gate,up,down,ln_attn,ln_ffn}.{weight,bias} "
        "for i < L, final_ln.{weight,bias}"
    )

    def __init__(
        self, backbone_config: PretrainedConfig, side: SideConfig, lm_head: Tensor | None = None
    ) -> None:
        super().__init__()
        side.validate(backbone_config)
        dims = backbone_dims(backbone_config, side)
        if not dims.causal:
            raise LadderError(
                f"model_type={backbone_config.model_type!r} is not a decoder-only causal LM "
                "(Llama family, GPT-2); use build_side_network"
            )
        r = side.reduction_factor
        self.dims = dims
        self.build_ladders(side, dims.d, dims.n_layers, dims.dropout, "backbone")
        self.layers = nn.ModuleDict({str(i): CausalSideBlock(dims, r) for i in self.side_blocks})
        self.final_ln = side_norm(dims, self.d_side)  # the model's final norm
        # head "lm": generation (every position, every token) or, with label_tokens, a
        # verbaliser (the last real token, the label words' first tokens only)
        self.verbaliser = side.label_tokens is not None
        self.lm = side.head == "lm" and not self.verbaliser
        if side.head == "lm":
            self.up = nn.Linear(self.d_side, self.d)  # the only trained part of the head
            lm = frozen_lm_head(lm_head, self.d, "causal side network with head 'lm':")
            if self.verbaliser:
                lm = label_rows(lm, side.label_tokens)  # (num_labels, d)
            self.register_buffer("lm_head", lm.to(self.up.weight.dtype), persistent=False)
            self.init_class_weight()  # the verbaliser's loss is ClassifierHead's
        else:
            self.build_head(self.d_side, self.d, dims.cls_dropout, side.num_labels)
        inv_freq = None  # no rotary (GPT-2)
        if dims.rotary:
            hd = dims.head_dim // r
            inv_freq = 1.0 / (dims.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hd/2r,) or None
        self.apply(init_weights)

    def side_stream(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor | None,
        cache: SideKVCache | None = None,
    ) -> Tensor:
        """The side stream after the final norm, (B, T, d/r).

        attention_mask: (B, T), True on real tokens (None: all real); ``cache``: the tokens
        before these (their positions come first), extended in place with these.
        """
        x = self.side_input(hiddens)  # (B, T, d/r)
        B, T, _ = x.shape
        past = 0 if cache is None else cache.length
        allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        allowed = allowed[None, None]  # (1, 1, T, past + T): causal, offset by the past
        if attention_mask is not None:
            if past:
                raise LadderError(
                    "attention_mask with a non-empty cache; allowed: None (no padding)"
                )
            allowed = allowed & attention_mask.bool().to(x.device)[:, None, None, :]
        bias = mask_bias(allowed, x.dtype)  # (B | 1, 1, T, past + T)
        cos = sin = None  # GPT-2: positions came in with state 0
        if self.inv_freq is not None:
            cos, sin = rotary_tables(self.inv_freq, past + T, x.dtype)
            cos, sin = cos[past:], sin[past:]  # (T, hd/r): the positions of these tokens
        for i in self.side_blocks:  # kept blocks, then xladder's free ones
            x = self.before_block(x, i, hiddens)
            kv = None if cache is None else cache.blocks.setdefault(i, {})
            x = self.layers[str(i)](x, bias, cos, sin, kv)  # (B, T, d/r)
        if cache is not None:
            cache.length = past + T
        return self.final_ln(self.after_blocks(x, hiddens))  # (B, T, d/r)

    def lm_logits(self, x: Tensor) -> Tensor:
        """Side states (..., d/r) -> vocabulary logits (..., V) through ``up`` and the frozen head
        (a verbaliser: the label words' rows of it, (..., num_labels))."""
        return F.linear(self.up(x), self.lm_head)

    def forward(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        pool_index: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, num_labels); head "lm": next-token logits (B, T, V) at every position.

        hiddens: {state: (B, T, d)}, at least ``needed_layers()``; attention_mask: (B, T) bool or
        0/1, True on real tokens; pool_index: (B,) position whose side state feeds the head
        (default: the last real token).
        """
        x = self.side_stream(hiddens, attention_mask)  # (B, T, d/r)
        if self.lm:
            return self.lm_logits(x)  # (B, T, V)
        B, T, _ = x.shape
        mask = attention_mask.bool().to(x.device)
        if pool_index is None:  # the last real token: right padding or not
            pos = torch.arange(T, device=x.device)
            pool_index = (pos * mask).argmax(-1)  # (B,)
        pooled = x[torch.arange(B, device=x.device), pool_index.to(x.device)]  # (B, d/r)
        if self.verbaliser:  # the next-token logits of the label words' first tokens
            return self.lm_logits(pooled)  # (B, num_labels)
        return self.head(pooled)  # (B, num_labels)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Head "lm": next-token cross-entropy of logits (B, T, V) on labels (B, T) aligned with
        the inputs, -100 where nothing is predicted (prompt, padding), shifted by one as in
        ``LlamaForCausalLM``; else the classification (or regression) loss."""
        if not self.lm:
            return ClassifierHead.loss(self, logits, labels)
        shifted = labels[:, 1:].to(logits.device).long()
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100
        )

    def answer_logits(
        self, hiddens: Mapping[int, Tensor], attention_mask: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Head "lm": the logits of the predicted (answer) positions only, (N, V), their targets
        (N,) and rows (N,) in the batch. Position t predicts ``labels[:, t + 1]``; the vocabulary
        projection runs on those N positions alone (the prompt's would be most of (B, T, V))."""
        x = self.side_stream(hiddens, attention_mask)  # (B, T, d/r)
        shifted = labels[:, 1:].to(x.device).long()  # (B, T - 1)
        sel = shifted != -100
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(shifted)[sel]
        return self.lm_logits(x[:, :-1][sel]), shifted[sel], rows

    def lm_loss(
        self, hiddens: Mapping[int, Tensor], attention_mask: Tensor, labels: Tensor
    ) -> Tensor:
        """Head "lm": the mean cross-entropy over the answer tokens (as :meth:`loss`, cheaper)."""
        logits, targets, _ = self.answer_logits(hiddens, attention_mask, labels)
        return F.cross_entropy(logits.float(), targets)

    def decode(self, hiddens: Mapping[int, Tensor], cache: SideKVCache) -> Tensor:
        """Head "lm", incremental: next-token logits (B, T_new, V) of new tokens, from their
        states alone ({state: (B, T_new, d)}, no padding); ``cache`` holds the earlier tokens and
        is extended with these. Equals :meth:`forward` on the whole sequence (eval mode)."""
        return self.lm_logits(self.side_stream(hiddens, None, cache))
