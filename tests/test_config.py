"""The configuration schema and its loader (pipeline/config.py), and the repository's pipeline.yaml."""

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    BackboneConfig,
    CacheConfig,
    Config,
    ExtractConfig,
    TaskConfig,
    TrainSideConfig,
    apply_overrides,
    load_config,
)
from pipeline.errors import PipelineError

REPO_YAML = Path(__file__).resolve().parents[1] / "pipeline.yaml"
SECTIONS = {
    "task": TaskConfig,
    "backbone": BackboneConfig,
    "cache": CacheConfig,
    "extract": ExtractConfig,
    "train_side": TrainSideConfig,
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(PipelineError) as info:
        load_config(_write(tmp_path, text))
    msg = str(info.value)
    assert "\n" not in msg  # one line, as the CLI prints it
    return msg


# --------------------------------------------------------------------------- pipeline.yaml


def test_repo_pipeline_yaml_equals_the_schema_defaults():
    assert load_config(REPO_YAML) == Config()


def test_repo_pipeline_yaml_sets_no_key_to_a_non_default_value():
    raw = yaml.safe_load(REPO_YAML.read_text())
    assert set(raw) == set(SECTIONS)  # every section is spelled out, in the schema's names
    defaults = Config().model_dump()
    for section, values in raw.items():
        for key, value in values.items():
            assert key in SECTIONS[section].model_fields, f"{section}.{key}"
            assert SECTIONS[section](**{key: value}).model_dump()[key] == defaults[section][key], (
                f"{section}.{key}"
            )


def test_no_file_in_cwd_gives_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None) == Config()
    assert load_config() == Config()


def test_pipeline_yaml_in_cwd_is_picked_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipeline.yaml").write_text("task:\n  name: cola\n")
    cfg = load_config(None)
    assert cfg.task.name == "cola"
    assert cfg.cache == CacheConfig()  # unspecified sections keep their defaults


def test_file_values_are_applied(tmp_path):
    cfg = load_config(
        _write(
            tmp_path,
            "task: {name: stsb, limit: 3}\ncache: {dtype: int8, codec: zstd}\n"
            "extract: {layers: [0, 6], reduction_factors: [8]}\n",
        )
    )
    assert (cfg.task.name, cfg.task.limit) == ("stsb", 3)
    assert (cfg.cache.dtype, cfg.cache.codec) == ("int8", "zstd")
    assert (cfg.extract.layers, cfg.extract.reduction_factors) == ([0, 6], [8])


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing set\n")) == Config()


# --------------------------------------------------------------------------- errors


def test_unknown_top_level_key(tmp_path):
    msg = _error(tmp_path, "tasks:\n  name: rte\n")
    assert msg == (
        f"{tmp_path / 'cfg.yaml'}: tasks: unknown key; "
        "allowed: task, backbone, cache, extract, train_side"
    )


def test_unknown_key_inside_a_section(tmp_path):
    msg = _error(tmp_path, "cache:\n  dtype: float16\n  colour: red\n")
    assert "cache.colour: unknown key" in msg
    assert msg.endswith("allowed: root, dtype, codec, chunk_mb, shard_chunks, storage_options")
    msg = _error(tmp_path, "train_side:\n  lr: 0.1\n")
    assert "train_side.lr: unknown key" in msg and "learning_rates" in msg


def test_bad_enum_names_the_allowed_values(tmp_path):
    msg = _error(tmp_path, "cache:\n  dtype: float64\n")
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}: cache.dtype: ")
    assert re.search(r"'float32', 'float16', 'bfloat16' or 'int8'", msg)
    assert msg.endswith("(got 'float64')")
    msg = _error(tmp_path, "train_side:\n  fusion: early\n")
    assert "train_side.fusion" in msg and "'ladder', 'late', 'none' or 'xladder'" in msg


def test_bad_range(tmp_path):
    msg = _error(tmp_path, "extract:\n  batch_tokens: 1\n")
    assert "extract.batch_tokens: " in msg
    assert "greater than or equal to 16" in msg and msg.endswith("(got 1)")
    msg = _error(tmp_path, "train_side:\n  ladder_dropout: 1.0\n")
    assert "train_side.ladder_dropout" in msg and "less than 1" in msg


def test_non_positive_reduction_factor(tmp_path):
    msg = _error(tmp_path, "extract:\n  reduction_factors: [8, 0]\n")
    assert "extract.reduction_factors" in msg and "positive" in msg


def test_every_error_is_named_at_once_on_one_line(tmp_path):
    msg = _error(tmp_path, "cache:\n  dtype: float64\n  codec: gzip\n")
    assert "\n" not in msg
    assert "cache.dtype: " in msg and "'float64'" in msg
    assert "cache.codec: " in msg and "'gzip'" in msg


def test_non_mapping_yaml(tmp_path):
    msg = _error(tmp_path, "- task\n- cache\n")
    assert msg == f"{tmp_path / 'cfg.yaml'} must be a mapping of sections, got list"
    assert "got str" in _error(tmp_path, "just a string\n")


def test_section_that_is_not_a_mapping(tmp_path):
    msg = _error(tmp_path, "cache: 5\n")
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}: cache: ") and "(got 5)" in msg


def test_invalid_yaml(tmp_path):
    msg = _error(tmp_path, "task:\n  name: [rte\n")
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'} is not valid YAML: ")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(PipelineError, match=re.escape(f"config file {path} does not exist")):
        load_config(path)


# --------------------------------------------------------------------------- overrides


def test_apply_overrides_overrides_and_skips_none():
    base = apply_overrides(Config(), {"task.limit": 5})
    cfg = apply_overrides(
        base,
        {
            "task.name": "cola",
            "task.limit": None,  # not given on the command line: keep the file's value
            "cache.dtype": "bfloat16",
            "extract.layers": [1, 2],
            "backbone.max_length": None,
        },
    )
    assert cfg.task.name == "cola" and cfg.task.limit == 5
    assert cfg.cache.dtype == "bfloat16" and cfg.extract.layers == [1, 2]
    assert cfg.backbone.max_length == 128
    assert base.task.name == "rte" and base.cache.dtype == "float16"  # input not mutated
    assert apply_overrides(Config(), {}) == Config()


def test_bad_override_value():
    with pytest.raises(
        PipelineError,
        match=re.escape("option: task.limit: Input should be greater than or equal to 1 (got 0)"),
    ):
        apply_overrides(Config(), {"task.limit": 0})
    with pytest.raises(PipelineError, match=r"option: cache\.codec: .*'raw', 'lz4' or 'zstd'"):
        apply_overrides(Config(), {"cache.codec": "gzip"})
    with pytest.raises(PipelineError, match=r"option: task\.colour: unknown key; allowed: name, "):
        apply_overrides(Config(), {"task.colour": "red"})


# --------------------------------------------------------------------------- cache root


def test_cache_root_expands_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LST_CACHE_ROOT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Config().cache_root == str(tmp_path / ".cache" / "lst-pipeline")
    assert "~" not in Config().cache_root
    cfg = apply_overrides(Config(), {"cache.root": "~/elsewhere"})
    assert cfg.cache_root == str(tmp_path / "elsewhere")


def test_env_overrides_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = apply_overrides(Config(), {"cache.root": "/from/the/file"})
    monkeypatch.setenv("LST_CACHE_ROOT", "/from/env")
    assert cfg.cache_root == "/from/env"
    monkeypatch.setenv("LST_CACHE_ROOT", "~/env-cache")
    assert cfg.cache_root == str(tmp_path / "env-cache")
    monkeypatch.setenv("LST_CACHE_ROOT", "s3://bucket/prefix")
    assert cfg.cache_root == "s3://bucket/prefix"  # URLs are left alone
    monkeypatch.delenv("LST_CACHE_ROOT")
    assert cfg.cache_root == "/from/the/file"
