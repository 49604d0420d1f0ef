"""One side network for several tasks: a shared body (ladders and side blocks) and a head per task.

    net = MultiTaskSideNetwork(backbone_config, side, {"rte": 2, "mrpc": 2, "stsb": 1})
    net.select("mrpc")                                  # the head forward and loss use
    logits = net({k: states[k] for k in net.needed_layers()}, attention_mask)   # [B, 2]
    loss = net.loss(logits, labels)

The body is an :class:`~ladder.side.EncoderSideNetwork` up to its pooled side state
(``pooled``); each task's head is the encoder-only head (``ClassifierHead``: up-projection,
dense, tanh, out) with that task's number of labels, 1 = regression (MSE). The first task's head
is the body's own, taken out of it, so a network of one task has the single-task network's
weights, init draws and parameter names under ``heads.<task>``. Encoder-only backbones only (the
BERT family, BART's encoder). A T5 task list needs no heads: every task is text to text through
the frozen LM head, so its tasks share the whole T5 side network (``stages.multitask``); the
causal networks pool another way.

Vision-and-language tasks in the list (``visual=VisualSpec(...)``): the body is a
:class:`~ladder.vision.VisualSideNetwork`; a batch of a VL task passes its visual tokens
(``forward(..., visual=...)``) and a batch of a text task none, and runs the same blocks on the
text alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from torch import Tensor, nn
from transformers import PretrainedConfig

from ladder.errors import LadderError
from ladder.families import ENCODER_TYPES
from ladder.shared import ClassifierHead, init_weights
from ladder.side import EncoderSideNetwork, SideConfig
from ladder.vision import VisualSideNetwork

HEAD_MODULES = ("up", "head_drop", "head_dense", "head_out")  # ClassifierHead.build_head's


class TaskHead(ClassifierHead, nn.Module):
    """One task's classification head: ``ClassifierHead.build_head`` / ``head`` / ``loss``.

    ``source``: a network whose own head modules this head takes over (removed from it);
    without it the head is built and initialised as the side network's (N(0, 0.01)).
    """

    def __init__(
        self,
        side: SideConfig,
        d_side: int,
        d: int,
        dropout: float,
        source: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.side = side  # ClassifierHead.loss reads side.num_labels
        if source is None:
            self.build_head(d_side, d, dropout, side.num_labels)
            self.apply(init_weights)
            return
        for name in HEAD_MODULES:
            module = getattr(source, name)
            delattr(source, name)
            setattr(self, name, module)
        self.init_class_weight()

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, d/r) pooled side states -> (B, num_labels) logits."""
        return self.head(pooled)


@dataclass(frozen=True)
class VisualSpec:
    """The visual part of a multi-task body: the vision encoder's width, images per example,
    how the tokens enter the side stream and what the heads read (``VisualSideNetwork``)."""

    d: int
    n_images: int = 1
    fusion: str = "ladder"
    readout: str = "text"


class MultiTaskSideNetwork(nn.Module):
    """A shared encoder-only side body with one :class:`TaskHead` per task.

    ``num_labels``: task -> its head's outputs, in the run's task order. The head in use is the
    selected task's (:meth:`select`), so the training step and evaluation of a one-task network
    run unchanged; ``forward(..., task=...)`` picks one explicitly.
    """

    def __init__(
        self,
        backbone_config: PretrainedConfig,
        side: SideConfig,
        num_labels: Mapping[str, int],
        visual: VisualSpec | None = None,
    ) -> None:
        super().__init__()
        mt = getattr(backbone_config, "model_type", None)
        if mt not in ENCODER_TYPES:
            raise LadderError(
                f"a multi-task side network needs an encoder-only backbone, got model_type={mt!r}; "
                f"allowed: {', '.join(ENCODER_TYPES)}"
            )
        if not num_labels:
            raise LadderError("a multi-task side network needs at least one task; got none")
        tasks = list(num_labels)
        first = replace(side, num_labels=num_labels[tasks[0]])
        # the body and the first task's head
        self.body: EncoderSideNetwork = (
            EncoderSideNetwork(backbone_config, first)
            if visual is None
            else VisualSideNetwork(
                backbone_config, first, visual.d, visual.n_images, visual.fusion, visual.readout
            )
        )
        d_side, d, p = self.body.d_side, self.body.d, self.body.head_drop.p
        heads = {tasks[0]: TaskHead(first, d_side, d, p, source=self.body)}
        for task in tasks[1:]:
            heads[task] = TaskHead(replace(side, num_labels=num_labels[task]), d_side, d, p)
        self.heads = nn.ModuleDict(heads)
        self.side = first
        self.task = tasks[0]

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def select(self, task: str) -> MultiTaskSideNetwork:
        """Use ``task``'s head in forward and loss from now on; returns the network."""
        if task not in self.heads:
            raise LadderError(f"task {task!r} has no head; allowed: {', '.join(self.heads)}")
        self.task = task
        return self

    def needed_layers(self, stack: str = "enc") -> list[int]:
        return self.body.needed_layers(stack)

    def load_side_init(self, weights: Mapping[str, Tensor]) -> None:
        """Canonical (pruned) weights into the shared body's kept layers (see EncoderSideNetwork)."""
        self.body.load_side_init(weights)

    def forward(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        pool_index: Tensor | None = None,
        task: str | None = None,
        visual: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, num_labels of the task): the shared body, then the task's head.
        ``visual``: a VL task's visual tokens (B, T_v, d_v); None for a text task."""
        if visual is None:
            pooled = self.body.pooled(hiddens, attention_mask, pool_index)
        elif isinstance(self.body, VisualSideNetwork):
            pooled = self.body.pooled(hiddens, attention_mask, pool_index, visual=visual)
        else:
            raise LadderError(
                "visual tokens given to a multi-task network built without a visual part; "
                "allowed: visual=None, or a network built with visual=VisualSpec(...)"
            )
        return self.heads[task or self.task](pooled)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The selected task's loss: cross-entropy, or MSE for a regression task."""
        return self.heads[self.task].loss(logits, labels)
