"""Attention with dropout on the probabilities that keeps 1 byte per score for backward.

The side network keeps the backbone's head count at width d/r, so its attention maps are as large
as the backbone's (B x heads x T x T) while everything else shrinks by r. With dropout on the
probabilities (the authors' setting) PyTorch's CPU kernels take the unfused math path, which
keeps several float32 copies of every map for backward and spends much of its time in
``bernoulli_`` and in the all-masked-row checks of its safe softmax. This function saves only
q, k, v, the bias and a boolean drop-mask, and recomputes the softmax in backward; without dropout
(evaluation, or p = 0) it is ``F.scaled_dot_product_attention``.

Hand-written because no kernel in PyTorch fuses attention-probability dropout on CPU; with a fused
kernel (FlashAttention on CUDA) ``F.scaled_dot_product_attention`` is used on GPUs as it is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_BYTES = 16 << 20  # float32 (.., Tq, Tk) maps computed at once: batch rows per chunk


def _chunks(B: int, per_row: int) -> list[slice]:
    """Batch slices whose full-size float32 maps take about ``CHUNK_BYTES`` each; one slice
    under torch.compile, where a loop over symbolic sizes would specialise (and recompile) the
    graph on every sequence length, and inductor plans the buffers itself."""
    if torch.compiler.is_compiling():
        return [slice(None)]
    n = max(1, CHUNK_BYTES // max(1, per_row * 4))
    return [slice(i, min(B, i + n)) for i in range(0, B, n)]


class _DropoutAttention(torch.autograd.Function):
    """Saves q, k, v, bias, out and the drop-mask; recomputes the probabilities in backward.

    Constants are folded into the small (.., T, hd) operands so that every full-size (T x T)
    pass is one that cannot be avoided; the softmax backward's row sums come from out and its
    gradient, as in FlashAttention: sum_j dP_ij P_ij = dO_i . O_i. The float32 maps are made a
    few batch rows at a time (``CHUNK_BYTES``), so a step never holds more than a chunk of them;
    the drop-mask is drawn whole first, so chunking does not change which scores are dropped.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor,
        p: float,
        scale: float,
        drop: Tensor | None = None,
    ) -> Tensor:
        B, H, Tq, _ = q.shape
        shape = torch.broadcast_shapes((B, H, Tq, k.shape[-2]), bias.shape)
        if drop is None:
            drop, p = drop_mask(shape, p, q.device)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        batched = bias.dim() == 4 and bias.shape[0] == B and B > 1
        for sl in _chunks(B, math.prod(shape[1:])):
            b = bias[sl] if batched else bias
            probs = torch.matmul(q[sl] * scale, k[sl].transpose(-1, -2)).add_(b).softmax(dim=-1)
            # masked_fill reads the bool mask as it is: a multiply would first widen it to float
            out[sl] = torch.matmul(probs.masked_fill_(drop[sl], 0.0), v[sl] * (1.0 / (1.0 - p)))
        ctx.save_for_backward(q, k, v, bias, drop, out)
        ctx.p, ctx.scale, ctx.batched = p, scale, batched
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias, drop, out = ctx.saved_tensors
        p, scale = ctx.p, ctx.scale
        grad_c = grad * (1.0 / (1.0 - p))
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        need_bias = ctx.needs_input_grad[3]
        grad_bias = torch.zeros_like(bias) if need_bias else None
        for sl in _chunks(q.shape[0], math.prod(drop.shape[1:])):
            b = bias[sl] if ctx.batched else bias
            qs, ks, dp = q[sl] * scale, k[sl], drop[sl]
            probs = torch.matmul(qs, ks.transpose(-1, -2)).add_(b).softmax(dim=-1)
            grad_v[sl] = torch.matmul(probs.masked_fill(dp, 0.0).transpose(-1, -2), grad_c[sl])
            row = (grad[sl] * out[sl]).sum(-1, keepdim=True)  # sum_j dP_ij P_ij
            gs = torch.matmul(grad_c[sl], v[sl].transpose(-1, -2)).masked_fill_(dp, 0.0)
            gs = gs.sub_(row).mul_(probs)
            if grad_bias is not None and ctx.batched:
                grad_bias[sl] = gs.sum_to_size(b.shape)
            elif grad_bias is not None:
                grad_bias += gs.sum_to_size(bias.shape)
            grad_q[sl] = torch.matmul(gs, ks * scale)
            grad_k[sl] = torch.matmul(gs.transpose(-1, -2), qs)
        return grad_q, grad_k, grad_v, grad_bias, None, None, None


def _random_bytes(n: int, device: torch.device | None, generator: torch.Generator | None) -> Tensor:
    """``n`` random bytes, four from each 32-bit draw."""
    lo, hi, size = -(2**31), 2**31 - 1, (-(-n // 4),)
    if generator is None:  # the overload torch.compile traces with dynamic sizes
        words = torch.randint(lo, hi, size, dtype=torch.int32, device=device)
    else:
        words = torch.randint(lo, hi, size, dtype=torch.int32, device=device, generator=generator)
    return words.view(torch.uint8)[:n]


def keep_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """A boolean keep-mask that drops with probability ``p`` rounded to 1/256, and that rate.

    One random byte per element, four from each 32-bit draw: 2.5x faster than ``rand_like``
    on CPU, where drawing the mask is the largest cost of attention dropout. p = 0.1 drops
    26/256 = 0.1016. ``generator``: the stream to draw from (default: the global one).
    """
    thr = min(255, round(p * 256))
    return _random_bytes(math.prod(shape), device, generator).view(shape) >= thr, thr / 256


def drop_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """``~keep_mask(...)`` from the same draw (True = dropped), and the rate; what the attention
    keeps for backward, since ``masked_fill`` takes it without widening it to float."""
    thr = min(255, round(p * 256))
    return _random_bytes(math.prod(shape), device, generator).view(shape) < thr, thr / 256


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    dropout_p: float = 0.0,
    scale: float | None = None,
    drop: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T * scale + bias) v, with dropout ``dropout_p`` on the probabilities.

    q: (B, H, Tq, hd); k, v: (B, H, Tk, hd); bias: additive float, broadcastable to
    (B, H, Tq, Tk) (a large negative value where attention is not allowed; every query row needs
    one allowed key) or a boolean mask (True = may attend), and may require grad (T5's relative
    position bias). ``scale`` defaults to hd^-0.5. ``dropout_p`` is rounded to 1/256
    (``keep_mask``). ``drop``: the boolean drop-mask to use (``drop_mask``, broadcast shape of
    the scores), drawn by the caller, e.g. from each stacked network's own stream.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if bias.dtype == torch.bool:
        bias = mask_bias(bias, q.dtype)
    if round(dropout_p * 256) == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    if drop is not None:
        dropout_p = min(255, round(dropout_p * 256)) / 256
    return _DropoutAttention.apply(q, k, v, bias, dropout_p, scale, drop)


def mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A (B, T) or broadcastable boolean mask (True = may attend) as an additive bias."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask.bool(), torch.finfo(dtype).min
    )
