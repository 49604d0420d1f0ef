"""The configuration sections the stages read (``pipeline.yaml``), validated at load.

Each section is a pydantic model with ``extra="forbid"``: an unknown key or a bad value is an
error that names the key and what is allowed. ``TaskConfig`` lives beside the task registry
(``stages.tasks``); ``pipeline.config`` composes the sections into the file's schema and applies
the CLI's overrides. A stage takes the composed configuration as ``StageConfig``: any object with
these five sections (the stages never import the composition above them).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stages.tasks import TaskConfig

Dtype = Literal["float32", "float16", "bfloat16", "int8"]
Codec = Literal["raw", "lz4", "zstd"]
# bitsandbytes weight quantisation of the backbone (CUDA only); the values of
# ladder.backbones.QUANTIZATIONS, which checks them where the backbone is loaded
Quantization = Literal["none", "4bit", "8bit"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(Section):
    """``backbone:`` the frozen model whose states are cached (read by every stage)."""

    name: str = "minilm-l6"  # short name, Hugging Face name or local path
    revision: str | None = None  # hub revision (branch, tag or commit)
    max_length: int = Field(default=128, ge=2, le=8192)  # truncation (max_source_length)
    vision: str | None = (
        None  # frozen vision encoder for VL tasks (random-vit, CLIP...); None: text
    )
    # "KxK": the vision encoder's patch tokens average-pooled to a K x K grid in stage one (the
    # class token kept): fewer visual tokens, cheaper steps; part of the cache key. None: all
    vision_pool: str | None = Field(default=None, pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")
    # QST-style 4-bit NF4 (or 8-bit) weights through bitsandbytes, CUDA only; it changes the
    # states, so it is part of the cache key. none: the weights as stored
    quantization: Quantization = "none"


class CacheConfig(Section):
    """``cache:`` where caches live and how states are stored (extract writes, the rest read)."""

    root: str = "~/.cache/lst-pipeline"  # local path or fsspec URL; env LST_CACHE_ROOT overrides
    dtype: Dtype = "float16"  # storage dtype of hidden states; int8 keeps a per-token absmax scale
    codec: Codec = "lz4"  # lossless codec preset on top of the dtype (raw: checksum only)
    chunk_mb: float = Field(default=2.0, gt=0, le=256)  # target size of one chunk of one layer
    shard_chunks: int = Field(default=8, ge=1, le=4096)  # chunks per shard (objects on disk)
    # fsspec options for remote roots (s3fs: key, secret, profile, endpoint_url, client_kwargs,
    # config_kwargs); without them botocore reads AWS_* variables, AWS_ENDPOINT_URL included
    storage_options: dict[str, Any] = {}

    @property
    def resolved_root(self) -> str:
        """The root in use: ``LST_CACHE_ROOT`` over ``root``; a local one expanded (``~``)."""
        root = os.environ.get("LST_CACHE_ROOT") or self.root
        return root if "://" in root else str(Path(root).expanduser())


class ExtractConfig(Section):
    """``extract:`` stage one (``stages.extract``, ``stages.side_init``)."""

    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:1, mps
    compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # backbone dtype
    batch_tokens: int = Field(default=8192, ge=16)  # padded tokens per batch (length-grouped)
    max_batch_size: int = Field(default=256, ge=1)
    layers: list[int] | None = None  # state numbers to store (0 = embeddings .. L); None = all
    reduction_factors: list[int] = [4, 8, 16, 32]  # side_init is computed for each
    side_init: list[Literal["magnitude", "fisher"]] = ["magnitude", "fisher"]
    fisher_samples: int = Field(default=1024, ge=1)  # training examples for the Fisher pass
    seed: int = 42  # Fisher sampling and classification-head init

    @field_validator("reduction_factors")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(r < 1 for r in v):
            raise ValueError(f"reduction factors must be positive integers, got {v}")
        return v


class TrainSideConfig(Section):
    """``train_side:`` stage two (``stages.train_side``, ``stages.sweep``)."""

    reduction_factors: list[int] = [8]  # one side network per factor, trained in one pass
    seeds: list[int] = [0]
    learning_rates: list[float] = [3e-3]
    batch_size: int = Field(default=100, ge=1)
    epochs: int | None = Field(default=None, ge=1)  # None: 20 for small tasks, 10 for the rest
    warmup_steps: int = Field(default=500, ge=0)  # the authors' default; see warmup_ratio
    # warm-up as a share of the run's optimizer steps, ceil(ratio * steps), as HF Trainer has
    # it; when set it overrides warmup_steps (500 steps can be most of a small task's run)
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    kept_layers: list[int] | None = None  # backbone blocks with a ladder; None = all
    fusion: Literal["ladder", "late", "none", "xladder"] = "ladder"
    # xladder's delta: the top delta blocks ladder into 2 * delta side blocks; None = L // 2
    xladder_depth: int | None = Field(default=None, ge=1)
    init: Literal["random", "magnitude", "fisher"] = "fisher"
    # classification on a decoder-only backbone: cls, a head on the last real token; lm, a
    # verbaliser: the frozen LM head's logits of each label word after an answer prompt (the
    # cache's template, fields-answer: extraction reads this key too)
    head: Literal["cls", "lm"] = "cls"
    ladder_dropout: float = Field(default=0.0, ge=0, lt=1)
    # one rate for every dropout of the side network (residual, attention probabilities, FFN,
    # head); None: the backbone's own rates (the authors')
    dropout: float | None = Field(default=None, ge=0, lt=1)
    # classification: "balanced" weighs each class's cross-entropy by n / (n_classes * n_class)
    # over the training split (scikit-learn's class_weight="balanced"), so rare answers (easy-VQA's
    # shapes among its yes/no) are not drowned out; "none", every example alike (the authors')
    class_weight: Literal["none", "balanced"] = "none"
    # VL tasks: how the visual tokens enter the side stream (ladder.vision): "ladder", before
    # every side block through a gate, as the backbone's states do; "input", once (the authors')
    visual_fusion: Literal["ladder", "input"] = "ladder"
    # VL tasks, encoder-only backbones: what the head reads: "text", the first text token's side
    # state; "text+visual", plus a pooling over the visual positions (zero at init)
    visual_readout: Literal["text", "text+visual"] = "text"
    threads: int | None = Field(default=None, ge=1)  # CPU threads; None: all cores but one
    # RAM for one split's states: kept whole if they fit, else streamed through a shuffle buffer
    memory_mb: int = Field(default=4096, ge=16)
    run_dir: str = "runs"  # run folders are created under this directory
    # experiment trackers (the HF Trainer convention): per-step loss and learning rate,
    # per-epoch validation metrics, per network; [] or [none]: no tracking
    report_to: list[Literal["tensorboard", "mlflow", "none"]] = []
    # networks of one shape (same r, kept layers, fusion) trained as one stacked model
    # (ladder.stacked); auto: where more than one network of the grid shares a shape. Groups
    # are split to fit memory_mb. Encoder-only (with visual tokens too) and causal backbones
    # (head "cls"; not xladder); the others train one by one.
    batched: Literal["auto", "on", "off"] = "auto"
    # torch.compile of the stacked step (inductor); auto: off on CPU, where it was measured not
    # to pay (README, "Measured here"), on for CUDA
    compile: Literal["auto", "on", "off"] = "auto"
    # where the side networks train: auto (cuda when present), cpu, cuda, cuda:1, mps
    device: str = "auto"
    # the side networks' forward under autocast: bfloat16 (no loss scaling needed), float16
    # (GPUs without bfloat16: the loss scaled by a GradScaler; networks train one by one);
    # float32 is the authors' and the equivalence tests'
    precision: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("reduction_factors", "seeds", "learning_rates")
    @classmethod
    def _one_at_least(cls, v: list) -> list:
        if not v:
            raise ValueError("the list is empty; give at least one value")
        return v

    @field_validator("reduction_factors")
    @classmethod
    def _positive_factors(cls, v: list[int]) -> list[int]:
        if any(r < 1 for r in v):
            raise ValueError(f"reduction factors must be positive integers, got {v}")
        return v

    @field_validator("learning_rates")
    @classmethod
    def _finite_positive(cls, v: list[float]) -> list[float]:
        bad = [lr for lr in v if not math.isfinite(lr) or lr <= 0]
        if bad:
            raise ValueError(
                f"learning rates must be finite numbers greater than 0 (e.g. 3e-3), got {bad}"
            )
        return v


class StageConfig(Protocol):
    """What a stage is given: the five sections (``pipeline.config.Config`` is one)."""

    task: TaskConfig
    backbone: BackboneConfig
    cache: CacheConfig
    extract: ExtractConfig
    train_side: TrainSideConfig

    def model_dump(self) -> dict[str, Any]: ...

    def model_copy(self, *, update: dict[str, Any] | None = None) -> StageConfig: ...
