"""The configuration file (``pipeline.yaml``): the stages' sections composed, loaded, overridden.

Each section is defined beside the code that reads it (``stages.tasks.TaskConfig``, the others in
``stages.config``); this module composes them into one schema, loads the YAML file, applies the
CLI's overrides, and reports every problem at once, each with its key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import PipelineError
from stages.config import (
    BackboneConfig,
    CacheConfig,
    ExtractConfig,
    Section,
    TrainSideConfig,
)
from stages.tasks import TaskConfig


class Config(Section):
    task: TaskConfig = TaskConfig()
    backbone: BackboneConfig = BackboneConfig()
    cache: CacheConfig = CacheConfig()
    extract: ExtractConfig = ExtractConfig()
    train_side: TrainSideConfig = TrainSideConfig()

    @property
    def cache_root(self) -> str:
        return self.cache.resolved_root


def schema_field(key: str) -> Any:
    """The pydantic field of ``section.key`` in the schema."""
    section, name = key.split(".", 1)
    model: type[BaseModel] = Config.model_fields[section].annotation  # type: ignore[assignment]
    return model.model_fields[name]


def schema_default(key: str) -> Any:
    """The schema's default value of ``section.key`` (what pipeline.yaml spells out)."""
    return schema_field(key).get_default(call_default_factory=True)


def _problem(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = Config
        for part in err["loc"][:-1]:
            model = model.model_fields[str(part)].annotation  # type: ignore[assignment]
        msg = f"unknown key; allowed: {', '.join(model.model_fields)}"
    elif "input" in err and err["type"] != "missing":
        msg = f"{msg} (got {err['input']!r})"
    return f"{loc}: {msg}"


def describe(err: ValidationError, origin: str) -> str:
    """Every problem of a validation, on one line: ``origin: key: problem; key: problem``."""
    return f"{origin}: " + "; ".join(_problem(e) for e in err.errors())


def load_config(path: str | Path | None = None) -> Config:
    """Load ``path``, else ``./pipeline.yaml`` when present, else the schema's defaults.

    The repository's ``pipeline.yaml`` spells out those defaults (a test keeps them equal).
    """
    p = config_path(path)
    if p is None:
        return Config()
    data = _read_yaml(p)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise PipelineError(describe(e, str(p))) from None


def config_path(path: str | Path | None) -> Path | None:
    """The file ``load_config`` reads: ``path``, else ``./pipeline.yaml`` when present, else None."""
    if path is None:
        return Path("pipeline.yaml") if Path("pipeline.yaml").is_file() else None
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"config file {p} does not exist")
    return p


def _read_yaml(p: Path) -> dict[str, Any]:
    origin = str(p)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{origin} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{origin} must be a mapping of sections, got {type(data).__name__}")
    return data


def config_sources(path: str | Path | None, flags: dict[str, str]) -> dict[str, str]:
    """Where each ``section.key`` gets its value: ``default``, ``file (PATH)``, ``environment
    (LST_CACHE_ROOT)`` or ``flag (--option)``; ``flags`` maps the keys set by options to them."""
    out = {
        f"{section}.{key}": "default"
        for section, field in Config.model_fields.items()
        for key in field.annotation.model_fields  # type: ignore[union-attr]
    }
    p = config_path(path)
    if p is not None:
        for section, values in _read_yaml(p).items():
            for key in values if isinstance(values, dict) else ():
                out[f"{section}.{key}"] = f"file ({p.resolve()})"
    if os.environ.get("LST_CACHE_ROOT"):
        out["cache.root"] = "environment (LST_CACHE_ROOT)"
    for key, flag in flags.items():
        out[key] = f"flag ({flag})"
    return out


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
        raise PipelineError(describe(e, "option")) from None
