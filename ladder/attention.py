"""Attention with dropout on the probabilities that keeps 1 byte per score for backward, and the
side networks' dropout, whose masks are drawn the same way (``keep_mask``: 1 random byte each).

The side network keeps the backbone's head count at width d/r, so its attention maps are as large
as the backbone's (B x heads x T x T) while everything else shrinks by r. With dropout on the
probabilities (the authors' setting) PyTorch's CPU kernels take the unfused math path, which
keeps several float32 copies of every map for backward and spends much of its time in
``bernoulli_`` and in the all-masked-row checks of its safe softmax. This function saves only
q, k, v, the bias and a keep-mask of bytes, and recomputes the softmax in backward; without dropout
(evaluation, or p = 0) it is ``F.scaled_dot_product_attention``.

Hand-written because no kernel in PyTorch fuses attention-probability dropout on CPU. On CUDA,
where SDPA's fused kernels draw the dropout inside (FlashAttention, memory-efficient attention),
SDPA is used as it is unless the caller brings its own mask (stacked networks, each with its own
random stream).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_BYTES = 1 << 20  # float32 (.., Tq, Tk) maps computed at once: batch rows per chunk
NARROW = 16  # head widths below this multiply a map by a (.., T, hd) operand as (x^T m^T)^T
SHORT_ROWS = 16  # softmax rows shorter than this (a 512-bit vector of floats): whole-tensor passes


def _chunks(B: int, per_row: int) -> list[slice]:
    """Batch slices whose full-size float32 maps take about ``CHUNK_BYTES`` each, so that every
    pass over a chunk's maps after the first finds them in the core's L2 cache; one slice under
    torch.compile, where a loop over symbolic sizes would specialise (and recompile) the graph
    on every sequence length, and inductor plans the buffers itself."""
    if torch.compiler.is_compiling():
        return [slice(None)]
    n = max(1, CHUNK_BYTES // max(1, per_row * 4))
    return [slice(i, min(B, i + n)) for i in range(0, B, n)]


def _narrow(hd: int, device: torch.device) -> bool:
    """Whether a map times a (.., T, hd) operand runs as the transposed product x^T m^T: for
    narrow heads (the side network's d/r) MKL's batched GEMM runs it 3-6x faster on CPU
    (measured, hd 4 and 8; no gain from 16 on)."""
    return hd < NARROW and device.type != "cuda"


def _result(shape: torch.Size | tuple[int, ...], like: Tensor) -> tuple[Tensor, Tensor]:
    """A buffer for m @ x results of ``shape`` (.., T, hd), with ``like``'s dtype and device,
    and the view of it that :func:`_map_times_into` writes: transposed (.., hd, T) storage for
    narrow heads."""
    if not _narrow(shape[-1], like.device):
        buf = like.new_empty(shape)
        return buf, buf
    buf = like.new_empty(*shape[:-2], shape[-1], shape[-2])
    return buf.transpose(-1, -2), buf


def _map_times_into(m: Tensor, x: Tensor, store: Tensor) -> None:
    """``store`` = m (.., T, S) @ x (.., S, hd), written in place (``store`` is a slice of a
    :func:`_result` buffer: no copy of the product)."""
    if _narrow(x.shape[-1], x.device):
        torch.matmul(x.transpose(-1, -2), m.transpose(-1, -2), out=store)
    else:
        torch.matmul(m, x, out=store)


def _softmax_(s: Tensor) -> Tensor:
    """softmax over the last dim, in place where it can be. PyTorch's CPU kernel runs rows
    shorter than a vector (16 floats) element by element, 5-9x slower than the same
    arithmetic as whole-tensor passes (measured at T = 5 and 9: most of SST-2's batches)."""
    if s.shape[-1] >= SHORT_ROWS or s.is_cuda or torch.compiler.is_compiling():
        return s.softmax(dim=-1)
    s = s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
    return s.div_(s.sum(dim=-1, keepdim=True))


class _DropoutAttention(torch.autograd.Function):
    """Saves q, k, v, bias, out and the keep-mask; recomputes the probabilities in backward.

    Constants are folded into the small (.., T, hd) operands so that every full-size (T x T)
    pass is one that cannot be avoided; the softmax backward's row sums come from out and its
    gradient, as in FlashAttention: sum_j dP_ij P_ij = dO_i . O_i. The float32 maps are made a
    few batch rows at a time (``CHUNK_BYTES``), so a step never holds more than a chunk of them;
    the keep-mask is drawn whole first, so chunking does not change which scores are dropped. It
    is applied as a multiply by its bytes (0 or 1), which PyTorch vectorises (``masked_fill`` on
    CPU is a scalar loop, 4x slower).
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
        keep: Tensor | None = None,
    ) -> Tensor:
        B, H, Tq, _ = q.shape
        shape = torch.broadcast_shapes((B, H, Tq, k.shape[-2]), bias.shape)
        # (B, T, H, hd) projections come in as transposed views; a batched matmul on a chunk of
        # one would copy it per chunk and per product
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if keep is None:
            keep, p = keep_mask(shape, p, q.device)
        kept = keep.view(torch.uint8)  # a caller's bool mask, viewed as its bytes
        out, store = _result((*q.shape[:-1], v.shape[-1]), q)
        batched = bias.dim() == 4 and bias.shape[0] == B and B > 1
        qs, vs = q * scale, v * (1.0 / (1.0 - p))
        for sl in _chunks(B, math.prod(shape[1:])):
            b = bias[sl] if batched else bias
            probs = _softmax_(torch.matmul(qs[sl], k[sl].transpose(-1, -2)).add_(b))
            _map_times_into(probs.mul_(kept[sl]), vs[sl], store[sl])
        ctx.save_for_backward(q, k, v, bias, keep, out)
        ctx.p, ctx.scale, ctx.batched = p, scale, batched
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias, keep, out = ctx.saved_tensors
        p, scale = ctx.p, ctx.scale
        kept = keep.view(torch.uint8)
        grad_c = grad * (1.0 / (1.0 - p))
        qs_all, ks_all = q * scale, k * scale
        rows = (grad * out).sum(-1, keepdim=True)  # sum_j dP_ij P_ij, every row at once
        (grad_q, gq), (grad_k, gk), (grad_v, gv) = (_result(t.shape, t) for t in (q, k, v))
        need_bias = ctx.needs_input_grad[3]
        grad_bias = torch.zeros_like(bias) if need_bias else None
        for sl in _chunks(q.shape[0], math.prod(keep.shape[1:])):
            b = bias[sl] if ctx.batched else bias
            qs, kp = qs_all[sl], kept[sl]
            probs = _softmax_(torch.matmul(qs, k[sl].transpose(-1, -2)).add_(b))
            _map_times_into((probs * kp).transpose(-1, -2), grad_c[sl], gv[sl])
            gs = torch.matmul(grad_c[sl], v[sl].transpose(-1, -2)).mul_(kp)
            gs = gs.sub_(rows[sl]).mul_(probs)
            if grad_bias is not None and ctx.batched:
                grad_bias[sl] = gs.sum_to_size(b.shape)
            elif grad_bias is not None:
                grad_bias += gs.sum_to_size(bias.shape)
            _map_times_into(gs, ks_all[sl], gq[sl])
            _map_times_into(gs.transpose(-1, -2), qs, gk[sl])
        return grad_q, grad_k, grad_v, grad_bias, None, None, None


def _random_bytes(n: int, device: torch.device | None, generator: torch.Generator | None) -> Tensor:
    """``n`` random bytes, eight from each 64-bit draw (2.5x faster on CPU than 32-bit draws);
    under torch.compile four from each 32-bit draw, the form its functionalisation traces (an
    in-place ``random_`` on a dtype view does not)."""
    if torch.compiler.is_compiling():
        lo, hi, size = -(2**31), 2**31 - 1, (-(-n // 4),)
        if generator is None:  # the overload torch.compile traces with dynamic sizes
            words = torch.randint(lo, hi, size, dtype=torch.int32, device=device)
        else:
            words = torch.randint(
                lo, hi, size, dtype=torch.int32, device=device, generator=generator
            )
        return words.view(torch.uint8)[:n]
    words = torch.empty(-(-n // 8), dtype=torch.int64, device=device)
    return words.random_(-(2**63), 2**63 - 1, generator=generator).view(torch.uint8)[:n]


def _threshold(p: float) -> int:
    """Bytes below this are dropped: p rounded to 1/256 (at most 255/256)."""
    return min(255, round(p * 256))


def drop_rate(p: float) -> float:
    """The rate a ``keep_mask`` of probability ``p`` drops at: p rounded to 1/256."""
    return _threshold(p) / 256


def keep_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """A keep-mask of 0/1 bytes (uint8) that drops with probability ``p`` rounded to 1/256, and
    that rate.

    One random byte per element, eight from each 64-bit draw: 4x faster than ``rand_like``
    and 6x faster than ``bernoulli_`` on CPU, where drawing masks is a large cost of the side
    network's step. A byte is kept when it is at least the threshold, computed as a clamp to
    (thr - 1, thr) minus thr - 1: 15x faster than ``>=``, whose bool output PyTorch does not
    vectorise on CPU. p = 0.1 drops 26/256 = 0.1016. ``generator``: the stream to draw from
    (default: the global one).
    """
    thr = _threshold(p)
    if thr == 0:
        return torch.ones(shape, dtype=torch.uint8, device=device), 0.0
    draw = _random_bytes(math.prod(shape), device, generator).view(shape)
    return draw.clamp_(thr - 1, thr).sub_(thr - 1), thr / 256


def dropout(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Training-mode dropout with a ``keep_mask`` (rate p rounded to 1/256): the kept values
    scaled by 1 / (1 - rate). Backward keeps the 1-byte mask, not a float one."""
    if p >= 1:
        return x * 0.0
    if drop_rate(p) == 0:
        return x
    keep, rate = keep_mask(x.shape, p, x.device, generator)
    return (x * keep).mul_(1.0 / (1.0 - rate))


class Dropout(nn.Dropout):
    """``nn.Dropout`` drawn as :func:`dropout` draws: the side networks' dropout everywhere, so
    that stacked networks (``ladder.stacked``) draw each network's mask the same way."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p) if self.training else x


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    dropout_p: float = 0.0,
    scale: float | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T * scale + bias) v, with dropout ``dropout_p`` on the probabilities.

    q: (B, H, Tq, hd); k, v: (B, H, Tk, hd); bias: additive float, broadcastable to
    (B, H, Tq, Tk) (a large negative value where attention is not allowed; every query row needs
    one allowed key) or a boolean mask (True = may attend), and may require grad (T5's relative
    position bias). ``scale`` defaults to hd^-0.5. ``dropout_p`` is rounded to 1/256
    (``keep_mask``). ``keep``: the keep-mask to use (``keep_mask``: 0/1 bytes or bool, broadcast shape of
    the scores), drawn by the caller, e.g. from each stacked network's own stream.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if bias.dtype == torch.bool:
        bias = mask_bias(bias, q.dtype)
    if drop_rate(dropout_p) == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    if q.is_cuda and keep is None:  # fused dropout; p is not rounded there
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
        )
    if keep is not None:
        dropout_p = drop_rate(dropout_p)
    if torch.compiler.is_compiling():
        return _traced_attention(q, k, v, bias, dropout_p, scale, keep)
    return _DropoutAttention.apply(q, k, v, bias, dropout_p, scale, keep)


def _traced_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, p: float, scale: float, keep: Tensor | None
) -> Tensor:
    """The same attention in plain operations, for torch.compile: the compiler derives and
    fuses the backward, and a graph without a custom autograd function can be kept in AOT
    autograd's on-disk cache (one with ``_DropoutAttention`` is compiled anew every run). For
    a given keep-mask it is the eager attention; one it draws is ``keep_mask``'s, of the same
    shape and rate (its bytes come from 32-bit draws under compile: ``_random_bytes``)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul(scale).add(bias)
    if keep is None:
        keep, p = keep_mask(scores.shape, p, q.device)
    probs = torch.softmax(scores, -1).mul(keep.view(torch.uint8)).mul(1.0 / (1.0 - p))
    return torch.matmul(probs, v)


def mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A (B, T) or broadcastable boolean mask (True = may attend) as an additive bias."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask.bool(), torch.finfo(dtype).min
    )


class SideKVCache:
    """A side network's keys and values of the tokens seen so far (incremental decoding):
    ``blocks`` per kept block its attention's cached tensors, and ``length``, the tokens seen.

    The causal side network keeps ``{"k", "v"}`` (B, nkv, T, hd/r) after rotary per block; the
    T5 side decoder ``{"sa": {"k", "v"}, "ca": {"k", "v"}}``: its self-attention's, which grow
    by the new tokens each step, and its cross-attention's over the side encoder's output,
    computed at the first step.
    """

    def __init__(self) -> None:
        self.blocks: dict[int, dict[str, Any]] = {}
        self.length = 0

    def reorder(self, rows: Tensor) -> None:
        """Keep the rows ``rows`` (B_new,) of every cached tensor, in that order (beam search:
        the beams kept)."""

        def pick(d: dict[str, Any]) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    pick(v)
                else:
                    d[k] = v.index_select(0, rows.to(v.device))

        for block in self.blocks.values():
            pick(block)


def extend_cached(entry: dict[str, Tensor] | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The new positions' keys and values ``k``, ``v`` (B, heads, T_new, hd) after an
    attention's cached ones (``entry``'s ``"k"``/``"v"``, along the positions), stored back in
    ``entry`` and returned; ``entry`` None (no incremental decoding): ``k``, ``v`` as given."""
    if entry is None:
        return k, v
    if "k" in entry:
        k, v = torch.cat((entry["k"], k), 2), torch.cat((entry["v"], v), 2)
    entry["k"], entry["v"] = k, v
    return k, v
