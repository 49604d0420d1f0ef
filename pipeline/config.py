"""The configuration schema (``pipeline.yaml``), validated at load.

Every section is a pydantic model with ``extra="forbid"``: an unknown key or a bad value is an
error that names the key and what is allowed. CLI options override the file (``apply_overrides``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import PipelineError

Dtype = Literal["float32", "float16", "bfloat16", "int8"]
Codec = Literal["raw", "lz4", "zstd"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Section):
    name: str = "rte"  # a GLUE task (cola sst2 mrpc qqp stsb mnli qnli rte) or "custom"
    data_dir: str | None = None  # glue_data folder; None = the Hugging Face hub
    files: dict[str, str] = {}  # custom task: split -> CSV/TSV/JSONL path
    text_columns: list[str] = []  # custom task: text columns, in order
    label_column: str = "label"  # custom task: label column
    problem: Literal["classification", "regression"] = "classification"  # custom task
    metric: Literal["accuracy", "mcc", "acc_f1", "pearson_spearman"] = "accuracy"  # custom task
    split_seed: int = (
        42  # shuffle seed for the paper's validation/test splits (fixed, as data_seed)
    )
    limit: int | None = Field(default=None, ge=1)  # first N examples of each split (smoke runs)


class BackboneConfig(_Section):
    name: str = "minilm-l6"  # short name, Hugging Face name or local path
    revision: str | None = None  # hub revision (branch, tag or commit)
    max_length: int = Field(
        default=128, ge=2, le=8192
    )  # truncation, as the authors' max_source_length


class CacheConfig(_Section):
    root: str = "~/.cache/lst-pipeline"  # local path or fsspec URL; env LST_CACHE_ROOT overrides
    dtype: Dtype = "float16"  # storage dtype of hidden states; int8 keeps a per-token absmax scale
    codec: Codec = "lz4"  # lossless codec preset on top of the dtype (raw: checksum only)
    chunk_mb: float = Field(default=2.0, gt=0, le=256)  # target size of one chunk of one layer
    shard_chunks: int = Field(default=8, ge=1, le=4096)  # chunks per shard (objects on disk)
    # fsspec options for remote roots (s3fs: key, secret, profile, endpoint_url, client_kwargs,
    # config_kwargs); without them botocore reads AWS_* variables, AWS_ENDPOINT_URL included
    storage_options: dict[str, Any] = {}


class ExtractConfig(_Section):
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


class TrainSideConfig(_Section):
    reduction_factors: list[int] = [8]  # one side network per factor, trained in one pass
    seeds: list[int] = [0]
    learning_rates: list[float] = [3e-3]
    batch_size: int = Field(default=100, ge=1)
    epochs: int | None = Field(default=None, ge=1)  # None: 20 for small tasks, 10 for the rest
    warmup_steps: int = Field(default=500, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    kept_layers: list[int] | None = None  # backbone blocks with a ladder; None = all
    fusion: Literal["ladder", "late", "none"] = "ladder"
    init: Literal["random", "magnitude", "fisher"] = "fisher"
    ladder_dropout: float = Field(default=0.0, ge=0, lt=1)
    threads: int | None = Field(default=None, ge=1)  # CPU threads; None: all cores but one
    # RAM for one split's states: kept whole if they fit, else streamed through a shuffle buffer
    memory_mb: int = Field(default=4096, ge=16)
    run_dir: str = "runs"  # run folders are created under this directory


class Config(_Section):
    task: TaskConfig = TaskConfig()
    backbone: BackboneConfig = BackboneConfig()
    cache: CacheConfig = CacheConfig()
    extract: ExtractConfig = ExtractConfig()
    train_side: TrainSideConfig = TrainSideConfig()

    @property
    def cache_root(self) -> str:
        root = os.environ.get("LST_CACHE_ROOT") or self.cache.root
        return root if "://" in root else str(Path(root).expanduser())


def _one_line(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        section = first["loc"][:-1]
        model: type[BaseModel] = Config
        for part in section:
            model = model.model_fields[str(part)].annotation  # type: ignore[assignment]
        allowed = ", ".join(model.model_fields)
        msg = f"unknown key; allowed: {allowed}"
    elif "input" in first and first["type"] != "missing":
        msg = f"{msg} (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{origin}: {loc}: {msg}{more}"


def load_config(path: str | Path | None = None) -> Config:
    """Load ``path``, else ``./pipeline.yaml`` when present, else the schema's defaults.

    The repository's ``pipeline.yaml`` spells out those defaults (a test keeps them equal).
    """
    if path is None:
        if not Path("pipeline.yaml").is_file():
            return Config()
        path = "pipeline.yaml"
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"config file {p} does not exist")
    text, origin = p.read_text(), str(p)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{origin} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{origin} must be a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise PipelineError(_one_line(e, origin)) from None


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Apply ``{"section.key": value}`` overrides (CLI options); ``None`` values are skipped."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        data[section][key] = value
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise PipelineError(_one_line(e, "option")) from None
