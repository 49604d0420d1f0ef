"""Pieces every side network shares: the backbone's sizes with the side's dropout, the reference's
init, loading canonical (pruned) weights, the RMSNorm of T5 and Llama, and the classification
head of the encoder-only and causal networks.

``ladder.side`` (encoder-only and T5) and ``ladder.causal`` (Llama family, GPT-2) build on these.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig

from ladder.attention import Dropout
from ladder.errors import LadderError
from ladder.families import CAUSAL_TYPES, ENCODER_TYPES, FAMILY, T5_TYPES, Dims, dims_of

if TYPE_CHECKING:
    from ladder.side import SideConfig


def backbone_dims(cfg: PretrainedConfig, side: SideConfig) -> Dims:
    """The backbone's :class:`Dims`, with ``side.dropout`` (if set) in place of its dropouts."""
    mt = getattr(cfg, "model_type", None)
    if mt not in FAMILY:
        raise no_side_network(mt)
    dims = dims_of(cfg)
    if side.dropout is None:
        return dims
    p = side.dropout  # one rate for every dropout the family has (BERT, causal: none in the FFN)
    act = 0.0 if dims.family == "bert" or dims.causal else p
    return replace(dims, dropout=p, attn_dropout=p, cls_dropout=p, act_dropout=act)


def no_side_network(mt: object) -> LadderError:
    allowed = ", ".join(ENCODER_TYPES + T5_TYPES + CAUSAL_TYPES)
    return LadderError(f"backbone model_type={mt!r} has no side network; allowed: {allowed}")


def init_weights(module: nn.Module) -> None:
    """The reference's init for modules not loaded from pruning: Linear ~ N(0, 0.01), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def load_init(
    weights: Mapping[str, Tensor],
    own: Mapping[str, Tensor],
    is_dropped: Callable[[str], bool],
    allowed: str,
) -> None:
    """Copy canonical side-init tensors into ``own``; all shapes are checked before any copy."""
    staged = []
    for key, w in weights.items():
        if key in own:
            if tuple(w.shape) != tuple(own[key].shape):
                raise LadderError(
                    f"side init {key!r} has shape {tuple(w.shape)}; "
                    f"allowed: {tuple(own[key].shape)}"
                )
            staged.append((own[key], w))
        elif not is_dropped(key):
            raise LadderError(
                f"side init key {key!r} is not a side-network key; allowed: {allowed}"
            )
    with torch.no_grad():
        for p, w in staged:
            p.copy_(w)


def dropped_key(
    key: str, pattern: re.Pattern[str], kept: Mapping[str, list[int]], n: Mapping[str, int]
) -> bool:
    """A canonical key of a block that exists in the backbone but is dropped from the side."""
    m = pattern.match(key)
    if m is None:
        return False
    stack, i = m.group(1), int(m.group(2))
    return 0 <= i < n[stack] and i not in kept[stack]


def frozen_lm_head(lm_head: Tensor | None, d: int, who: str) -> Tensor:
    """The frozen LM head weight [V, d] a network keeps as a non-persistent buffer (never trained,
    never saved with a side checkpoint: stage two reads it from the cache's ``frozen/lm_head``)."""
    if lm_head is None or lm_head.dim() != 2 or lm_head.shape[1] != d:
        got = None if lm_head is None else tuple(lm_head.shape)
        raise LadderError(f"{who} lm_head={got}; allowed: the frozen LM head weight [V, {d}]")
    return lm_head.detach()


class RMSNorm(nn.Module):
    """T5's and Llama's norm: scale only, no mean subtraction, variance in float32."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


class ClassifierHead:
    """What the one-stream side networks (encoder-only, causal) share, as a mixin for a
    ``Ladders`` module: the stream they read, their kept blocks' init, and the head.

    The pooled side state goes up to the backbone's width, then through the BART/RoBERTa
    classification head: dropout -> dense -> tanh -> dropout -> out. Its parameters are the
    network's own (``up``, ``head_dense``, ``head_out``), so checkpoints name them as before.
    """

    stream_note: str  # what the one stream ``enc`` is, for errors
    init_keys: str  # the canonical side-init keys, for errors
    side: SideConfig
    kept: list[int]
    n_layers: int
    layers: nn.ModuleDict
    final_ln: nn.Module | None
    up: nn.Linear
    head_drop: Dropout
    head_dense: nn.Linear
    head_out: nn.Linear
    class_weight: Tensor | None

    def needed_layers(self, stack: str = "enc") -> list[int]:
        """State numbers the forward reads (0 = embeddings, i + 1 = output of block i)."""
        if stack != "enc":
            raise LadderError(f"stack={stack!r}; allowed: 'enc' ({self.stream_note})")
        return self.needed_states()  # type: ignore[attr-defined]

    def load_side_init(self, weights: Mapping[str, Tensor]) -> None:
        """Copy canonical (pruned) weights into the kept layers; dropped layers' keys are ignored.

        Raises LadderError on a shape mismatch or a key that is not canonical, before copying.
        """
        own = {f"layers.{k}": p for k, p in self.layers.named_parameters()}
        if self.final_ln is not None:
            own.update({f"final_ln.{k}": p for k, p in self.final_ln.named_parameters()})
        pattern = re.compile(r"^(layers)\.(\d+)\.")
        kept, n = {"layers": self.kept}, {"layers": self.n_layers}
        load_init(weights, own, lambda key: dropped_key(key, pattern, kept, n), self.init_keys)

    def build_head(self, d_side: int, d: int, dropout: float, num_labels: int) -> None:
        self.up = nn.Linear(d_side, d)
        self.head_drop = Dropout(dropout)
        self.head_dense = nn.Linear(d, d)
        self.head_out = nn.Linear(d, num_labels)
        self.init_class_weight()

    def init_class_weight(self) -> None:
        """Every class alike, until ``set_class_weight`` (a buffer: it follows the head's device,
        and is not saved with the weights)."""
        self.register_buffer("class_weight", None, persistent=False)  # type: ignore[attr-defined]

    def set_class_weight(self, weight: Tensor | None) -> None:
        """Weigh each class's cross-entropy (num_labels,) from now on, on the head's device; None:
        every class alike."""
        n = self.side.num_labels
        if weight is not None and (n == 1 or weight.shape != (n,) or not (weight >= 0).all()):
            raise LadderError(
                f"class weights of shape {tuple(weight.shape)}; allowed: ({n},), >= 0, for a "
                "classification head (num_labels > 1)"
            )
        self.class_weight = (
            None if weight is None else weight.float().to(self.head_out.weight.device)
        )

    def head(self, pooled: Tensor) -> Tensor:
        """(B, d/r) pooled side states -> (B, num_labels) logits."""
        h = self.up(pooled)  # (B, d); up is per-token linear, so pooling first is exact and cheaper
        h = torch.tanh(self.head_dense(self.head_drop(h)))  # (B, d)
        return self.head_out(self.head_drop(h))  # (B, num_labels)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy, or MSE when num_labels == 1 (regression)."""
        if self.side.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long(), weight=self.class_weight)
