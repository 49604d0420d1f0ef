"""K side networks of one shape (encoder-only, or causal with the classification head) trained
as one model: weights stacked (K, ...).

Networks that share a shape (same backbone, r, kept layers, fusion; any seed, learning rate or
dropout) run their forward, backward and AdamW step together: every weight is held as one
(K, out, in) tensor and every linear is one batched matmul (``baddbmm``) over the K networks,
the attention runs on (K * B) rows, and the cached states are widened to float32 once for all K
(they are the same for every network). Per network there stay: its loss, its gradient norm and
clipping, its AdamW moments, step count and learning rate, and its random stream.

Why stacked weights and not ``torch.func.vmap`` over ``functional_call``: each network's dropout
must draw from its own stream in the order it draws alone (so a network's figures do not depend
on the others of the run, and a network resumed behind catches up on its own stream); ``vmap``
has one stream for all (``randomness="different"`` draws other masks), and the custom autograd
Functions (the 1-byte-mask attention, the narrow-input ladders) would need vmap rules. Here each
mask is drawn per network from a ``torch.Generator`` holding that network's state, with the same
call on the same shape as the network's own modules make: the masks are the same bits, and
the figures the same up to float rounding (batched matmuls round like the unbatched ones to
~1e-7). The computation of a network does not depend on K (every op is per network slice), so
a network gives the same bits in a group of 1 as in a group of 9.

Stacked are the encoder-only family (BERT, RoBERTa, ELECTRA, BART/mBART encoder;
:class:`StackedEncoderSide`), with visual tokens too (``VisualSideNetwork``:
:class:`StackedVisualSide`), and the decoder-only family with the classification head (Llama,
SmolLM2, Mistral, Qwen2 and GPT-2, head "cls": :class:`StackedCausalSide`), with fusion
"ladder", "late" or "none". Not stacked, and trained one by one: fusion "xladder" (the stacked
forward lacks its free blocks), the causal LM head ("lm"), T5 (with visual tokens or without)
and the multi-task network; ``stackable`` says whether a network is, :func:`stack_networks`
stacks a group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ladder.attention import attention, drop_rate, dropout, keep_mask, mask_bias
from ladder.causal import CausalSideNetwork, rotary_tables, rotate_half
from ladder.ladders import stream_state
from ladder.shared import RMSNorm
from ladder.side import EncoderSideNetwork
from ladder.vision import VisualSideNetwork


def stackable(net: torch.nn.Module) -> bool:
    """Whether ``net`` can be trained stacked: the encoder-only side network (with visual
    tokens or without), or the causal one with the classification head (``side.head ==
    "cls"``); fusion "xladder", whose free blocks the stacked forward lacks, trains one by one."""
    if type(net) is CausalSideNetwork:
        return net.side.head == "cls" and net.side.fusion != "xladder"
    encoder = type(net) is EncoderSideNetwork or type(net) is VisualSideNetwork
    varying = getattr(net, "tokens_per_image", None) is not None  # images per batch: one by one
    return encoder and net.side.fusion != "xladder" and not varying


def shape_key(net: torch.nn.Module) -> tuple:
    """Networks with equal keys stack: their class, configuration and parameter shapes."""
    side = net.side
    return (
        type(net).__name__,
        side.reduction_factor,
        side.kept_layers,
        side.fusion,
        side.num_labels,
        getattr(net, "visual_fusion", None),
        getattr(net, "visual_readout", None),
        tuple((n, tuple(p.shape)) for n, p in net.named_parameters()),
    )


class _NarrowStackedLinear(torch.autograd.Function):
    """``x W^T + b`` per network for a constant ``x`` (K, N, in) in a narrower dtype than W.

    As ``ladder.ladders._NarrowInputLinear``: keeps the float16/bfloat16 ``x`` for the weight's
    gradient and widens it again in backward. ``x`` may be a stride-0 expansion of one shared
    (N, in) state: it is then held once.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.baddbmm(bias.unsqueeze(1), _widen(x, weight.dtype), weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor]:
        (x,) = ctx.saved_tensors
        gw = torch.bmm(grad.transpose(1, 2), _widen(x, grad.dtype))
        return None, gw, grad.sum(1)


def _widen(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``; a stride-0 expansion of one state is converted once, not K times."""
    if x.dim() == 3 and x.shape[0] > 1 and x.stride(0) == 0:
        return x[0].to(dtype).expand(x.shape)
    return x.to(dtype)


def _dropout(x: Tensor, p: float, gens: Sequence[torch.Generator], shared: bool) -> Tensor:
    """``ladder.attention.dropout`` per network, network k's mask from ``gens[k]``: the bits and
    values each network's ``Dropout`` gives alone.

    ``shared``: x is one tensor for every network (its result is (K, *x.shape)); else x is (K, ...).
    """
    return torch.stack([dropout(x if shared else x[k], p, g) for k, g in enumerate(gens)])


class StackedSide:
    """K one-stream side networks of one shape as stacked tensors; not an ``nn.Module``.

    ``params[name]`` is (K, *shape) for each trainable parameter of the networks, a leaf that
    requires grad. :meth:`unstack` writes the values back into the networks. What the families
    share is here (linears, ladders, norms, dropout, attention, the fused stream, the head); a
    family's subclass gives its block (:meth:`_block`) and its attention bias and pooling
    (:meth:`forward`). :func:`stack_networks` picks the subclass.
    """

    def __init__(self, nets: Sequence[torch.nn.Module]) -> None:
        if not nets or not all(stackable(n) for n in nets):
            raise ValueError(f"{type(self).__name__} takes one or more stackable side networks")
        key = shape_key(nets[0])
        if any(shape_key(n) != key for n in nets):
            raise ValueError("networks of different shapes do not stack")
        self.nets = list(nets)
        self.K = len(nets)
        net0 = nets[0]
        self.net0: Any = net0
        self.names = [n for n, p in net0.named_parameters() if p.requires_grad]
        with torch.no_grad():
            self.params = {
                name: torch.stack([dict(n.named_parameters())[name] for n in nets])
                .detach()
                .clone()
                .requires_grad_(True)
                for name in self.names
            }
        self.ladder_p = [n.ladder_drop.p for n in nets]
        self.state_p = [n.drop.p for n in nets]

    @torch.no_grad()
    def unstack(self) -> None:
        """Copy each network's slice back into its own parameters."""
        for k, net in enumerate(self.nets):
            own = dict(net.named_parameters())
            for name in self.names:
                own[name].copy_(self.params[name][k])

    # --- pieces -------------------------------------------------------------------------------

    def _lin(self, name: str, x: Tensor) -> Tensor:
        """Linear ``name`` of every network on x (K, ..., in) -> (K, ..., out); bias optional."""
        w, b = self.params[f"{name}.weight"], self.params.get(f"{name}.bias")
        K, shape = x.shape[0], x.shape
        x3 = x.reshape(K, -1, shape[-1])
        if b is None:
            y = torch.bmm(x3, w.transpose(1, 2))
        else:
            y = torch.baddbmm(b.unsqueeze(1), x3, w.transpose(1, 2))
        return y.view(*shape[:-1], w.shape[1])

    def _ladder(
        self, name: str, h: Tensor, p: float, gens: Sequence[torch.Generator] | None
    ) -> Tensor:
        """Ladder linear ``name`` on a backbone state h (B, T, d), shared by the networks;
        with dropout p each network drops its own mask. -> (K, B, T, d/r)."""
        w, b = self.params[f"{name}.weight"], self.params[f"{name}.bias"]
        K, (B, T, d) = self.K, h.shape
        if gens is not None and p > 0:
            x = _dropout(h, p, gens, shared=True).reshape(K, B * T, d)
        else:
            x = h.reshape(1, B * T, d).expand(K, B * T, d)  # one state for all: held once
        if x.dtype == w.dtype or not torch.is_grad_enabled():
            y = torch.baddbmm(b.unsqueeze(1), _widen(x, w.dtype), w.transpose(1, 2))
        else:
            y = _NarrowStackedLinear.apply(x, w, b)
        return y.view(K, B, T, w.shape[1])

    def _norm(self, name: str, x: Tensor, module: torch.nn.Module) -> Tensor:
        """The networks' norm ``name`` (x: (K, ..., d)) as ``module`` (theirs) computes it:
        LayerNorm (weight and bias), or RMSNorm (``ladder.shared``: weight only, in float32)."""
        w = self.params[f"{name}.weight"]
        shape = (self.K,) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        if isinstance(module, RMSNorm):
            var = x.float().pow(2).mean(-1, keepdim=True)
            return w.view(shape) * (x.float() * torch.rsqrt(var + module.eps)).to(x.dtype)
        b = self.params[f"{name}.bias"]
        return F.layer_norm(x, x.shape[-1:], eps=module.eps) * w.view(shape) + b.view(shape)

    def _drop(self, x: Tensor, p: float, gens: Sequence[torch.Generator] | None) -> Tensor:
        return x if gens is None or p == 0 else _dropout(x, p, gens, shared=False)

    def _attention(
        self,
        pre: str,
        x: Tensor,
        bias: Tensor,
        heads: tuple[int, int, int],
        p: float,
        gens: Sequence[torch.Generator] | None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Self-attention ``pre.{q,k,v,o}`` of every network on x (K, B, T, C): ``heads`` = (query
        heads, key-value heads, head width; query head h reads key-value head h // group, as
        ``repeat_interleave``), ``bias`` additive (K * B, 1, Tq | 1, T), ``rotary`` (cos, sin)
        (T, hd) or None. The drop-mask (rate p, training) is each network's own draw."""
        K, B, T, C = x.shape
        H, n_kv, hd = heads
        q = self._lin(f"{pre}.q", x).view(K * B, T, H, hd).transpose(1, 2)
        k = self._lin(f"{pre}.k", x).view(K * B, T, n_kv, hd).transpose(1, 2)
        v = self._lin(f"{pre}.v", x).view(K * B, T, n_kv, hd).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if n_kv != H:
            k = k.repeat_interleave(H // n_kv, dim=1)
            v = v.repeat_interleave(H // n_kv, dim=1)
        p = p if gens is not None else 0.0
        keep = None
        if gens is not None and drop_rate(p) > 0:
            keep = torch.cat([keep_mask((B, H, T, T), p, x.device, g)[0] for g in gens])
        y = attention(q, k, v, bias, dropout_p=p, keep=keep)  # (K*B, H, T, hd)
        return self._lin(f"{pre}.o", y.transpose(1, 2).reshape(K, B, T, H * hd))

    def _block(
        self, i: int, x: Tensor, bias: Tensor, gens: Sequence[torch.Generator] | None
    ) -> Tensor:
        raise NotImplementedError

    def _side_input(
        self, hiddens: Mapping[int, Tensor], gens: Sequence[torch.Generator] | None
    ) -> Tensor:
        """State 0 through every network's ``first_down`` (its dropout first): (K, B, T, d/r)."""
        net = self.net0
        h0 = stream_state(hiddens, 0, net.d, net.stream)
        return self._ladder("first_down", h0, self.state_p[0], gens)

    def _fuse(
        self,
        x: Tensor,
        i: int,
        hiddens: Mapping[int, Tensor],
        gens: Sequence[torch.Generator] | None,
    ) -> Tensor:
        """Each network's gate on ``down_i(state i + 1)`` into x (K, B, T, d/r), as the
        networks' ``Ladders.fuse``."""
        net, K = self.net0, self.K
        g = torch.sigmoid(self.params["gates"][:, i] / net.side.gate_T).view(K, 1, 1, 1)
        h = stream_state(hiddens, i + 1, net.d, net.stream)
        return g * x + (1 - g) * self._ladder(f"down.{i}", h, self.ladder_p[0], gens)

    def _stream(
        self,
        hiddens: Mapping[int, Tensor],
        bias: Tensor,
        gens: Sequence[torch.Generator] | None,
    ) -> Tensor:
        """The side stream (K, B, T, d/r) after the final norm: state 0 through ``first_down``,
        the kept blocks with their ladders (fusion "ladder"), or state L once ("late")."""
        net = self.net0
        x = self._side_input(hiddens, gens)  # (K, B, T, d/r)
        for i in net.kept:
            if net.fusion == "ladder":
                x = self._fuse(x, i, hiddens, gens)
            x = self._block(i, x, bias, gens)
        if net.fusion == "late":
            x = self._fuse(x, net.n_layers - 1, hiddens, gens)
        if net.final_ln is not None:
            x = self._norm("final_ln", x, net.final_ln)
        return x

    def _head(self, pooled: Tensor, gens: Sequence[torch.Generator] | None) -> Tensor:
        """``ClassifierHead.head`` of every network: (K, B, d/r) -> (K, B, num_labels)."""
        h = self._lin("up", pooled)
        pc = self.net0.head_drop.p
        h = torch.tanh(self._lin("head_dense", self._drop(h, pc, gens)))
        return self._lin("head_out", self._drop(h, pc, gens))  # (K, B, num_labels)

    def forward(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        gens: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Logits (K, B, num_labels) of every network; ``gens``: one generator per network for
        training (dropout on, each network on its own stream), None for evaluation."""
        raise NotImplementedError

    def losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Each network's loss (K,), as the network's ``loss``."""
        return torch.stack([self.net0.loss(logits[k], labels) for k in range(self.K)])


class StackedEncoderSide(StackedSide):
    """K encoder-only side networks (``EncoderSideNetwork``) of one shape, stacked."""

    def _block(
        self, i: int, x: Tensor, bias: Tensor, gens: Sequence[torch.Generator] | None
    ) -> Tensor:
        blk = self.net0.layers[str(i)]
        pre = f"layers.{i}"
        heads = (blk.n_head, blk.n_head, blk.head_dim)

        def attn(x: Tensor) -> Tensor:
            return self._attention(pre, x, bias, heads, blk.attn_dropout, gens)

        def ffn(x: Tensor) -> Tensor:
            h = self._drop(blk.act(self._lin(f"{pre}.ffn_in", x)), blk.act_drop.p, gens)
            return self._lin(f"{pre}.ffn_out", h)

        pd = blk.drop.p
        ln_a, ln_f = f"{pre}.ln_attn", f"{pre}.ln_ffn"
        if blk.pre_ln:
            x = x + self._drop(attn(self._norm(ln_a, x, blk.ln_attn)), pd, gens)
            return x + self._drop(ffn(self._norm(ln_f, x, blk.ln_ffn)), pd, gens)
        x = self._norm(ln_a, x + self._drop(attn(x), pd, gens), blk.ln_attn)
        return self._norm(ln_f, x + self._drop(ffn(x), pd, gens), blk.ln_ffn)

    def forward(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        gens: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Logits (K, B, num_labels) of every network; ``gens``: one generator per network for
        training (dropout on, each network on its own stream), None for evaluation."""
        net, K = self.net0, self.K
        B = attention_mask.shape[0]
        dtype = self.params["first_down.weight"].dtype
        bias = mask_bias(attention_mask[:, None, None, :], dtype).repeat(K, 1, 1, 1)
        x = self._stream(hiddens, bias, gens)
        if net.pool_last:
            pooled = x[
                :, torch.arange(B, device=x.device), (attention_mask.long().sum(1) - 1).to(x.device)
            ]
        else:
            pooled = x[:, :, 0]  # (K, B, d/r)
        return self._head(pooled, gens)


class StackedVisualSide(StackedEncoderSide):
    """K encoder-only side networks with visual tokens (``VisualSideNetwork``) of one shape,
    stacked: the visual tokens standardised (the networks' shared buffers), projected, normed and
    dropped per network, before the text positions of the stream; the visual ladder gates
    (fusion "ladder") before every block after the first, the text ladders on the text positions
    only; the head on the first text token (and, readout "text+visual", the visual positions'
    pooling). Dropout masks are drawn in the network's own order: state 0, the visual tokens,
    then block by block."""

    def __init__(self, nets: Sequence[torch.nn.Module]) -> None:
        super().__init__(nets)
        net0 = self.net0
        for n in nets[1:]:  # the standardisation is the training images', the same for all
            if not (
                torch.equal(n.visual_mean, net0.visual_mean)
                and torch.equal(n.visual_std, net0.visual_std)
            ):
                raise ValueError("networks with different visual stats do not stack")

    def forward(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        gens: Sequence[torch.Generator] | None = None,
        visual: Tensor | None = None,
    ) -> Tensor:
        """Logits (K, B, num_labels) of every network; visual: (B, T_v, d_v), or None for a
        batch of text alone (the blocks on the text, as the networks run it)."""
        if visual is None:
            return super().forward(hiddens, attention_mask, gens)
        net, K = self.net0, self.K
        B = attention_mask.shape[0]
        text = self._side_input(hiddens, gens)  # (K, B, T, d/r); first: the draws' order
        z = (visual.to(net.visual_mean.dtype) - net.visual_mean) / net.visual_std
        v = self._lin("visual_proj", z.unsqueeze(0).expand(K, *z.shape))  # (K, B, T_v, d/r)
        Tv, d = v.shape[2], v.shape[3]
        if net.n_images > 1:
            per = v.reshape(K, B, net.n_images, Tv // net.n_images, d)
            v = (per + self.params["image_embed.weight"][:, None, :, None, :]).reshape(K, B, Tv, d)
        v = self._drop(self._norm("visual_ln", v, net.visual_ln), self.state_p[0], gens)
        x = torch.cat([v.to(text.dtype), text], 2)  # (K, B, T_v + T, d/r)
        ones = torch.ones(B, Tv, dtype=torch.bool, device=attention_mask.device)
        full = torch.cat([ones, attention_mask.bool()], 1)  # (B, T_v + T)
        bias = mask_bias(full[:, None, None, :].to(x.device), x.dtype).repeat(K, 1, 1, 1)
        for j, i in enumerate(net.kept):
            xv = x[:, :, :Tv]
            if net.visual_gates is not None and j > 0:
                g = torch.sigmoid(self.params["visual_gates"][:, j - 1] / net.side.gate_T)
                xv = g.view(K, 1, 1, 1) * xv + (1 - g.view(K, 1, 1, 1)) * v.to(xv.dtype)
            xt = x[:, :, Tv:]
            x = torch.cat(
                [xv, self._fuse(xt, i, hiddens, gens) if net.fusion == "ladder" else xt], 2
            )
            x = self._block(i, x, bias, gens)
        if net.fusion == "late":
            late = self._fuse(x[:, :, Tv:], net.n_layers - 1, hiddens, gens)
            x = torch.cat([x[:, :, :Tv], late], 2)
        if net.final_ln is not None:
            x = self._norm("final_ln", x, net.final_ln)
        if net.pool_last:
            at = (attention_mask.long().sum(1) - 1).to(x.device)
        else:
            at = torch.zeros(B, dtype=torch.long, device=x.device)
        pooled = x[:, torch.arange(B, device=x.device), Tv + at]  # (K, B, d/r)
        if net.visual_readout == "text+visual":
            tokens = F.gelu(self._lin("readout_token", x[:, :, :Tv]))  # (K, B, T_v, d/r)
            pooled = pooled + self._lin(
                "readout_out", torch.cat([tokens.mean(2), tokens.amax(2)], -1)
            )
        return self._head(pooled, gens)


class StackedCausalSide(StackedSide):
    """K causal side networks (``CausalSideNetwork``, head "cls": Llama family or GPT-2) of one
    shape, stacked: pre-norm blocks (RMSNorm or LayerNorm), causal attention with rotary
    positions (Llama) and grouped key-value heads, SwiGLU (Llama) or plain (GPT-2) MLP, and the
    head on each example's last real token."""

    _rotary: tuple[Tensor, Tensor] | None = None  # this forward's (cos, sin); None: GPT-2

    def _block(
        self, i: int, x: Tensor, bias: Tensor, gens: Sequence[torch.Generator] | None
    ) -> Tensor:
        blk = self.net0.layers[str(i)]
        pre = f"layers.{i}"
        a = blk.attn
        heads = (a.n_head, a.n_kv_head, a.head_dim)
        h = self._norm(f"{pre}.ln_attn", x, blk.ln_attn)
        y = self._attention(f"{pre}.attn", h, bias, heads, a.dropout, gens, self._rotary)
        x = x + self._drop(y, blk.drop.p, gens)
        h = self._norm(f"{pre}.ln_ffn", x, blk.ln_ffn)
        if blk.gated:
            m = blk.act(self._lin(f"{pre}.gate", h)) * self._lin(f"{pre}.up", h)
        else:
            m = blk.act(self._lin(f"{pre}.up", h))
        return x + self._drop(self._lin(f"{pre}.down", m), blk.drop.p, gens)

    def forward(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        gens: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Logits (K, B, num_labels) of every network; ``gens``: one generator per network for
        training (dropout on, each network on its own stream), None for evaluation."""
        net, K = self.net0, self.K
        B, T = attention_mask.shape
        dtype = self.params["first_down.weight"].dtype
        device = self.params["first_down.weight"].device
        mask = attention_mask.bool().to(device)
        allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
        bias = mask_bias(allowed & mask[:, None, None, :], dtype).repeat(K, 1, 1, 1)
        self._rotary = None
        if net.inv_freq is not None:
            self._rotary = rotary_tables(net.inv_freq, T, dtype)
        x = self._stream(hiddens, bias, gens)  # (K, B, T, d/r)
        last = (torch.arange(T, device=device) * mask).argmax(-1)  # the last real token
        return self._head(x[:, torch.arange(B, device=device), last], gens)


def stack_networks(nets: Sequence[torch.nn.Module]) -> StackedSide:
    """The stacked model of ``nets`` (stackable, one shape): encoder-only (with visual tokens
    or without) or causal."""
    if nets and type(nets[0]) is CausalSideNetwork:
        return StackedCausalSide(nets)
    if nets and type(nets[0]) is VisualSideNetwork:
        return StackedVisualSide(nets)
    return StackedEncoderSide(nets)


class StackedAdamW:
    """AdamW (torch.optim.AdamW's arithmetic, single-tensor path) on stacked parameters with a
    learning rate, a step count and moments per network; gradient clipping per network."""

    def __init__(
        self,
        params: Mapping[str, Tensor],
        K: int,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = params
        self.K, self.wd, self.betas, self.eps = K, weight_decay, betas, eps
        self.steps = [0.0] * K
        self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}

    def _per(self, values: Sequence[float], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(
            (self.K,) + (1,) * (like.dim() - 1)
        )

    @torch.no_grad()
    def clip_(self, max_norm: float) -> Tensor:
        """``clip_grad_norm_`` per network; returns the K total norms."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack(
            [torch.linalg.vector_norm(g.reshape(self.K, -1), dim=1) for g in grads], 1
        )
        total = torch.linalg.vector_norm(norms, dim=1)  # (K,)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.view((self.K,) + (1,) * (g.dim() - 1)))
        return total

    @torch.no_grad()
    def step(self, lrs: Sequence[float]) -> None:
        b1, b2 = self.betas
        self.steps = [s + 1 for s in self.steps]
        bc1 = [1 - b1**s for s in self.steps]
        bc2_sqrt = [(1 - b2**s) ** 0.5 for s in self.steps]
        step_size = [lr / c for lr, c in zip(lrs, bc1, strict=True)]
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            if self.wd != 0:
                p.mul_(self._per([1 - lr * self.wd for lr in lrs], p))
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / self._per(bc2_sqrt, p)).add_(self.eps)
            p.sub_(m / denom * self._per(step_size, p))

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


def activation_bytes(net: torch.nn.Module, batch: int, tokens: int) -> int:
    """A bound on what one stacked network holds for backward in a step of ``batch`` x ``tokens``
    (the drop-masks, the float32 activations of each side block, its slice of the ladders'
    inputs), plus its weights, gradients and AdamW moments: what :func:`group_sizes` budgets."""
    blk: Any = next(iter(net.layers.values()))
    if isinstance(net, CausalSideNetwork):  # SwiGLU: a fourth d_ff-wide activation
        n_head, d_ff, wide = blk.attn.n_head, blk.down.in_features, 4 if blk.gated else 3
    else:
        n_head, d_ff, wide = blk.n_head, blk.ffn_in.out_features, 3
    d_s = net.d_side
    n = batch * tokens
    per_layer = batch * n_head * tokens * tokens + 4 * n * (12 * d_s + wide * d_ff)
    ladders = (len(net.kept) + 1) * n * net.d * 2  # a dropped state per network (float16)
    params = sum(p.numel() for p in net.parameters()) * 4 * 4
    return len(net.kept) * per_layer + ladders + params


def group_sizes(n: int, per_network: int, budget: int) -> list[int]:
    """Split ``n`` networks of one shape into groups that each fit ``budget`` bytes."""
    most = max(1, budget // max(1, per_network))
    groups = math.ceil(n / most)
    base, extra = divmod(n, groups)
    return [base + (1 if g < extra else 0) for g in range(groups)]
