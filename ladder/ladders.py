"""The ladders of one side stack: how the frozen backbone's states enter the side stream.

State 0 (the embedding output) enters through ``first_down`` and is the side stream's input.
Fusion "ladder" (LST) mixes ``down_i(state i + 1)`` into the stream before each kept side block
i, with a gate ``g_i = sigmoid(alpha_i / T)``: ``x = g_i * x + (1 - g_i) * down_i(h)``. Fusion
"late" (Side-Tuning) mixes in state L once, after the last block; "none" reads state 0 only.
Dropped layers have neither a side block nor a down-projection; ``gates`` keeps one alpha per
backbone layer all the same, so checkpoints of every kept list have one shape.

Fusion "xladder" (depth-extended ladder: "Ladder Up, Memory Down", Zheng et al., arXiv
2512.14237). Taken from the paper's public description: the *top* delta blocks of the L-block
frozen backbone are connected to the *first* delta blocks of a trainable side transformer of
l = 2 * delta blocks; the remaining delta side blocks are free (not connected), so the forward
depth is L + delta, and gradients stay in the side network. Our choices, which the summaries do
not fix:

- the connected side blocks are the backbone's blocks L - delta .. L - 1 at width d/r (kept =
  those, so pruned side init loads into them as for "ladder"), each with the same gated ladder
  ``down_i(state i + 1)`` before it that fusion "ladder" gives block i (same gate, same init);
- the side stream's input is ``first_down(state L - delta)``, the input of the first connected
  backbone block (the equivalent of state 0 for block 0), under ``ladder_drop`` (it is a cached
  inner state like the ladders', not the embedding output that ``drop`` mimics the backbone's
  embedding dropout on);
- the free blocks are numbered L .. L + delta - 1 after the backbone's blocks, have no ladder,
  and keep the reference's random init (Linear ~ N(0, 0.01)): each starts near the identity, so
  at step 0 the network computes about what its connected blocks compute; they are never
  loaded from side init (there is no backbone block to prune them from);
- the final norm and head follow the last free block, as for every fusion.

So an xladder network reads states L - delta .. L only (``needed_states``): a cache of those
delta + 1 states is enough.

Both side networks (the encoder-only one, and each T5 stack) are a :class:`Ladders`. The
ladder parameters are the network's own attributes (``first_down``, ``down.{i}``, ``gates``),
not a submodule's, so the state-dict keys are the network's, as checkpoints and side init expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ladder.attention import Dropout
from ladder.errors import LadderError

if TYPE_CHECKING:
    from ladder.side import SideConfig


def stream_state(hiddens: Mapping[int, Tensor], k: int, d: int, stream: str) -> Tensor:
    """State ``k`` of a stream, checked; left in its dtype (caches hand over float16/bfloat16)."""
    h = hiddens.get(k)
    if h is None:
        raise LadderError(
            f"{stream} hidden state {k} is missing (given: {sorted(hiddens)}); "
            "allowed: a dict holding every state in needed_layers()"
        )
    if h.shape[-1] != d:
        raise LadderError(f"{stream} hidden state {k} is {h.shape[-1]} wide; allowed: d_model={d}")
    return h


class _NarrowInputLinear(torch.autograd.Function):
    """``x W^T + b`` for a constant ``x`` held in a narrower dtype than ``W`` (cached states).

    ``nn.Linear`` on ``x.float()`` would keep that float32 copy for the weight's gradient, one per
    ladder, for the whole step; this keeps the float16/bfloat16 ``x`` the batch holds anyway and
    widens it again in backward, so the states of a step cost their stored size once.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x)
        ctx.has_bias = bias is not None
        return F.linear(x.to(weight.dtype), weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:
        (x,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gw = g.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return None, gw, gb


def ladder_linear(linear: nn.Linear, h: Tensor) -> Tensor:
    """``linear(h)`` in the linear's dtype; a constant narrower ``h`` is saved as it is."""
    w = linear.weight
    if (
        h.dtype == w.dtype
        or h.requires_grad
        or not torch.is_grad_enabled()
        or torch.compiler.is_compiling()  # the compiler plans the saved tensors itself
    ):
        return linear(h.to(w.dtype))
    return _NarrowInputLinear.apply(h, w, linear.bias)


class Ladders(nn.Module):
    """Base of a side stack with ladders; :meth:`build_ladders` creates the parameters."""

    side: SideConfig
    n_layers: int  # backbone blocks L of this stack
    kept: list[int]  # backbone blocks with a side block, ascending
    free: list[int]  # side blocks after them with no backbone block and no ladder (xladder)
    side_blocks: list[int]  # every side block in stream order: kept, then free
    d: int  # backbone width
    d_side: int  # side width d/r

    def build_ladders(
        self, side: SideConfig, d: int, n_layers: int, dropout: float, stream: str
    ) -> None:
        """Create ``drop``, ``ladder_drop``, ``first_down``, ``down``, ``gates`` in this order.

        The order is the networks' registration order: it fixes the state-dict order and what a
        seeded initialisation draws. ``stream`` ("encoder" | "decoder") names the states in errors.
        """
        self.side, self.n_layers, self.fusion = side, n_layers, side.fusion
        self.d, self.d_side = d, d // side.reduction_factor
        self.kept = side.kept(n_layers)
        self.free = side.free(n_layers)
        self.side_blocks = self.kept + self.free
        self.stream = stream
        self.drop = Dropout(dropout)  # on state 0 (the backbone's embedding dropout)
        self.ladder_drop = Dropout(side.ladder_dropout)
        self.first_down = nn.Linear(self.d, self.d_side)
        L = n_layers
        fused = {"ladder": self.kept, "xladder": self.kept, "late": [L - 1]}.get(side.fusion, [])
        self.down = nn.ModuleDict({str(i): nn.Linear(self.d, self.d_side) for i in fused})
        self.gates = nn.Parameter(torch.full((L,), float(side.gate_alpha))) if fused else None

    def needed_states(self) -> list[int]:
        """The state numbers this stack reads (0 = embeddings, i + 1 = output of block i)."""
        if self.fusion in ("ladder", "xladder"):
            return [self.input_state()] + [i + 1 for i in self.kept]
        if self.fusion == "late":
            return [0, self.n_layers]
        return [0]

    def gate_values(self) -> Tensor:
        """sigmoid(alpha / T) per backbone layer, (L,); empty when fusion is 'none'."""
        if self.gates is None:
            return torch.empty(0)
        return torch.sigmoid(self.gates / self.side.gate_T)

    def input_state(self) -> int:
        """The state ``first_down`` reads: 0, or xladder's L - delta (first connected block's input)."""
        return self.kept[0] if self.fusion == "xladder" else 0

    def side_input(self, hiddens: Mapping[int, Tensor]) -> Tensor:
        """The side stream's input (B, T, d/r) from state 0 (xladder: L - delta), (B, T, d)."""
        k = self.input_state()
        h = stream_state(hiddens, k, self.d, self.stream)
        return ladder_linear(self.first_down, (self.ladder_drop if k else self.drop)(h))

    def fuse(self, x: Tensor, i: int, hiddens: Mapping[int, Tensor]) -> Tensor:
        """Gate ``down_i(state i + 1)`` into x: (B, T, d/r) -> (B, T, d/r)."""
        g = torch.sigmoid(self.gates[i] / self.side.gate_T)  # scalar
        h = stream_state(hiddens, i + 1, self.d, self.stream)  # (B, T, d)
        return g * x + (1 - g) * ladder_linear(self.down[str(i)], self.ladder_drop(h))

    def before_block(self, x: Tensor, i: int, hiddens: Mapping[int, Tensor]) -> Tensor:
        """The input of side block i: x with its ladder fused in (fusion "ladder"; "xladder"
        for the connected blocks i < L, not the free ones)."""
        laddered = self.fusion == "ladder" or (self.fusion == "xladder" and i < self.n_layers)
        return self.fuse(x, i, hiddens) if laddered else x

    def after_blocks(self, x: Tensor, hiddens: Mapping[int, Tensor]) -> Tensor:
        """The stream after the last side block: state L fused in once (fusion "late")."""
        return self.fuse(x, self.n_layers - 1, hiddens) if self.fusion == "late" else x
