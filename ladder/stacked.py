"""K encoder-only side networks of one shape trained as one model: weights stacked (K, ...).

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

Only the encoder-only family (BERT, RoBERTa, ELECTRA, BART/mBART encoder) is stacked;
``stackable`` says whether a network is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ladder.attention import attention, drop_mask, mask_bias
from ladder.side import EncoderSideNetwork


def stackable(net: torch.nn.Module) -> bool:
    """Whether ``net`` can be trained stacked (the encoder-only side network, no visual tokens;
    fusion "xladder", whose free blocks the stacked forward lacks, trains one by one)."""
    return type(net) is EncoderSideNetwork and net.side.fusion != "xladder"


def shape_key(net: torch.nn.Module) -> tuple:
    """Networks with equal keys stack: their class, configuration and parameter shapes."""
    side = net.side
    return (
        type(net).__name__,
        side.reduction_factor,
        side.kept_layers,
        side.fusion,
        side.num_labels,
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
    """``F.dropout`` per network: network k's mask from ``gens[k]``, drawn as F.dropout draws
    it (``empty_like(x).bernoulli_(1 - p)``, divided by 1 - p in x's dtype).

    ``shared``: x is one tensor for every network (its result is (K, *x.shape)); else x is (K, ...).
    """
    one = x.shape if shared else x.shape[1:]
    noise = torch.stack(
        [
            torch.empty(one, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=g)
            for g in gens
        ]
    ).div_(1 - p)
    return (x.unsqueeze(0) if shared else x) * noise


class StackedEncoderSide:
    """K encoder-only side networks of one shape as stacked tensors; not an ``nn.Module``.

    ``params[name]`` is (K, *shape) for each trainable parameter of the networks, a leaf that
    requires grad. :meth:`unstack` writes the values back into the networks.
    """

    def __init__(self, nets: Sequence[EncoderSideNetwork]) -> None:
        if not nets or not all(stackable(n) for n in nets):
            raise ValueError("StackedEncoderSide takes one or more EncoderSideNetwork")
        key = shape_key(nets[0])
        if any(shape_key(n) != key for n in nets):
            raise ValueError("networks of different shapes do not stack")
        self.nets = list(nets)
        self.K = len(nets)
        net0 = nets[0]
        self.net0 = net0
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

    # --- forward ------------------------------------------------------------------------------

    def _lin(self, name: str, x: Tensor) -> Tensor:
        """Linear ``name`` of every network on x (K, ..., in) -> (K, ..., out)."""
        w, b = self.params[f"{name}.weight"], self.params[f"{name}.bias"]
        K, shape = x.shape[0], x.shape
        y = torch.baddbmm(b.unsqueeze(1), x.reshape(K, -1, shape[-1]), w.transpose(1, 2))
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

    def _ln(self, name: str, x: Tensor, eps: float) -> Tensor:
        w, b = self.params[f"{name}.weight"], self.params[f"{name}.bias"]
        shape = (self.K,) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return F.layer_norm(x, x.shape[-1:], eps=eps) * w.view(shape) + b.view(shape)

    def _drop(self, x: Tensor, p: float, gens: Sequence[torch.Generator] | None) -> Tensor:
        return x if gens is None or p == 0 else _dropout(x, p, gens, shared=False)

    def _block(
        self, i: int, x: Tensor, bias: Tensor, gens: Sequence[torch.Generator] | None
    ) -> Tensor:
        blk = self.net0.layers[str(i)]
        pre = f"layers.{i}"
        K, B, T, C = x.shape
        H, hd = blk.n_head, blk.head_dim
        eps = blk.ln_attn.eps

        def attn(x: Tensor) -> Tensor:
            q, k, v = (
                self._lin(f"{pre}.{n}", x).view(K * B, T, H, hd).transpose(1, 2) for n in "qkv"
            )
            p = blk.attn_dropout if gens is not None else 0.0
            drop = None
            if round(p * 256) > 0:
                drop = torch.cat([drop_mask((B, H, T, T), p, x.device, g)[0] for g in gens])
            y = attention(q, k, v, bias, dropout_p=p, drop=drop)  # (K*B, H, T, hd)
            return self._lin(f"{pre}.o", y.transpose(1, 2).reshape(K, B, T, C))

        def ffn(x: Tensor) -> Tensor:
            h = self._drop(blk.act(self._lin(f"{pre}.ffn_in", x)), blk.act_drop.p, gens)
            return self._lin(f"{pre}.ffn_out", h)

        pd = blk.drop.p
        if blk.pre_ln:
            x = x + self._drop(attn(self._ln(f"{pre}.ln_attn", x, eps)), pd, gens)
            return x + self._drop(ffn(self._ln(f"{pre}.ln_ffn", x, eps)), pd, gens)
        x = self._ln(f"{pre}.ln_attn", x + self._drop(attn(x), pd, gens), eps)
        return self._ln(f"{pre}.ln_ffn", x + self._drop(ffn(x), pd, gens), eps)

    def forward(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        gens: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Logits (K, B, num_labels) of every network; ``gens``: one generator per network for
        training (dropout on, each network on its own stream), None for evaluation."""
        net, K = self.net0, self.K
        from ladder.ladders import _state

        h0 = _state(hiddens, 0, net.d, net.stream)
        p0 = self.state_p[0]
        x = self._ladder("first_down", h0, p0, gens)  # (K, B, T, d/r)
        B = x.shape[1]
        bias = mask_bias(attention_mask[:, None, None, :], x.dtype).repeat(K, 1, 1, 1)
        gate_T = net.side.gate_T

        def fuse(x: Tensor, i: int) -> Tensor:
            g = torch.sigmoid(self.params["gates"][:, i] / gate_T).view(K, 1, 1, 1)
            h = _state(hiddens, i + 1, net.d, net.stream)
            return g * x + (1 - g) * self._ladder(f"down.{i}", h, self.ladder_p[0], gens)

        for i in net.kept:
            if net.fusion == "ladder":
                x = fuse(x, i)
            x = self._block(i, x, bias, gens)
        if net.fusion == "late":
            x = fuse(x, net.n_layers - 1)
        if net.final_ln is not None:
            x = self._ln("final_ln", x, net.final_ln.eps)
        if net.pool_last:
            pooled = x[:, torch.arange(B), (attention_mask.long().sum(1) - 1).to(x.device)]
        else:
            pooled = x[:, :, 0]  # (K, B, d/r)
        h = self._lin("up", pooled)
        pc = net.head_drop.p
        h = torch.tanh(self._lin("head_dense", self._drop(h, pc, gens)))
        return self._lin("head_out", self._drop(h, pc, gens))  # (K, B, num_labels)

    def losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Each network's loss (K,), as ``EncoderSideNetwork.loss``."""
        return torch.stack([self.net0.loss(logits[k], labels) for k in range(self.K)])


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


def activation_bytes(net: EncoderSideNetwork, batch: int, tokens: int) -> int:
    """A bound on what one stacked network holds for backward in a step of ``batch`` x ``tokens``
    (the drop-masks, the float32 activations of each side block, its slice of the ladders'
    inputs), plus its weights, gradients and AdamW moments: what :func:`group_sizes` budgets."""
    blk = next(iter(net.layers.values()))
    d_s, d_ff = net.d_side, blk.ffn_in.out_features
    n = batch * tokens
    per_layer = batch * blk.n_head * tokens * tokens + 4 * n * (12 * d_s + 3 * d_ff)
    ladders = (len(net.kept) + 1) * n * net.d * 2  # a dropped state per network (float16)
    params = sum(p.numel() for p in net.parameters()) * 4 * 4
    return len(net.kept) * per_layer + ladders + params


def group_sizes(n: int, per_network: int, budget: int) -> list[int]:
    """Split ``n`` networks of one shape into groups that each fit ``budget`` bytes."""
    most = max(1, budget // max(1, per_network))
    groups = math.ceil(n / most)
    base, extra = divmod(n, groups)
    return [base + (1 if g < extra else 0) for g in range(groups)]
