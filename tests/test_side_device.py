"""Where the side networks train (``train_side.device``) and in what precision
(``train_side.precision``): batches sent ahead to the device, bfloat16 autocast, and checkpoints
that hold one device's random stream. No GPU here: the CPU runs the same code, and the device
copies are checked on PyTorch's ``meta`` device."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import apply_overrides
from stages.batches import Batch, on_device
from stages.errors import StageError
from stages.extract import extract
from stages.train_side import train_side
from tests.conftest import SHORT_RUN, make_config, tiny_bert


def _batch(k: int) -> Batch:
    return Batch(
        index=torch.arange(2) + 2 * k,
        labels=torch.tensor([k, k]),
        states={"enc": {0: torch.full((2, 3, 4), float(k), dtype=torch.float16)}},
        masks={"enc": torch.ones(2, 3, dtype=torch.bool)},
        input_ids={"enc": torch.ones(2, 3, dtype=torch.long)},
        target_ids={"dec": torch.zeros(2, 1, dtype=torch.long)},
        token_type_ids=torch.zeros(2, 3, dtype=torch.long),
        visual=torch.zeros(2, 5, 6),
    )


def test_batches_go_to_the_device_one_batch_ahead():
    made: list[int] = []

    def source():
        for k in range(4):
            made.append(k)
            yield _batch(k)

    meta = torch.device("meta")
    seen = []
    for b in on_device(source(), meta):
        k = int(b.index[0]) // 2
        # the next batch was already sent when this one is used (the copy overlaps the step)
        assert made[-1] == min(k + 1, 3), (k, made)
        assert b.labels.device == meta and b.states["enc"][0].device == meta
        assert b.states["enc"][0].dtype == torch.float16  # widened on the device, not here
        assert b.masks["enc"].device == meta and b.input_ids["enc"].device == meta
        assert b.index.device.type == "cpu"  # predictions are gathered by index on the CPU
        assert {t.device for t in b.tensors() if t is not b.index} == {meta}
        seen.append(k)
    assert seen == [0, 1, 2, 3]
    cpu = [_batch(k) for k in range(2)]
    assert list(on_device(iter(cpu), torch.device("cpu"))) == cpu  # the same objects


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, glue_dir, minilm_tokenizer):
    tmp = tmp_path_factory.mktemp("device")
    backbone = tiny_bert(minilm_tokenizer)
    cfg = make_config(tmp, glue_dir, **{"task.limit": 24})
    cfg = apply_overrides(
        cfg,
        {
            "backbone.name": backbone.name,
            **SHORT_RUN,
            "train_side.seeds": [0, 1],
            "train_side.device": "cpu",
            "train_side.run_dir": str(tmp / "runs"),
        },
    )
    extract(cfg, backbone=backbone, progress=False)
    return cfg


def _losses(result) -> dict[str, list[float]]:
    return {
        k: [h["train_loss"] for h in v["epochs"]] for k, v in result.metrics["networks"].items()
    }


@pytest.mark.parametrize("batched", ["off", "on"])
def test_bfloat16_autocast_trains_close_to_float32_and_is_a_run_of_its_own(
    tiny_cache, batched, capsys
):
    cfg = apply_overrides(tiny_cache, {"train_side.batched": batched})
    full = train_side(cfg, progress=False, echo=False, run_name=f"f32-{batched}")
    assert "bfloat16" not in capsys.readouterr().err
    half_cfg = apply_overrides(cfg, {"train_side.precision": "bfloat16"})
    half = train_side(half_cfg, progress=False, echo=False, run_name=f"bf16-{batched}")
    assert "warning: --precision bfloat16 on the CPU" in capsys.readouterr().err
    a, b = _losses(full), _losses(half)
    assert a.keys() == b.keys() and len(a) == 2
    for name in a:
        assert a[name] != b[name], "bfloat16 gave float32's losses bit for bit: no autocast"
        assert b[name] == pytest.approx(a[name], rel=1e-3)
    # a float32 run does not resume as a bfloat16 one
    with pytest.raises(StageError, match="belongs to another configuration"):
        train_side(half_cfg, progress=False, echo=False, run_name=f"f32-{batched}")


def test_float16_trains_one_by_one_with_a_loss_scale_kept_in_its_checkpoint(tiny_cache, capsys):
    full = train_side(tiny_cache, progress=False, echo=False, run_name="f32-scaled")
    cfg = apply_overrides(tiny_cache, {"train_side.precision": "float16"})
    half = train_side(cfg, progress=False, echo=False, run_name="f16")  # batched auto: 2 seeds
    assert "warning: --precision float16 on the CPU" in capsys.readouterr().err
    a, b = _losses(full), _losses(half)
    for name in a:
        assert a[name] != b[name], "float16 gave float32's losses bit for bit: no autocast"
        assert b[name] == pytest.approx(a[name], rel=1e-2)
    for ck in (half.folder / "checkpoints").glob("*.last.pt"):
        scaler = torch.load(ck, weights_only=False)["scaler"]
        assert scaler["scale"] > 1 and scaler["_growth_tracker"] > 0  # scaled, steps taken
    on = apply_overrides(cfg, {"train_side.batched": "on"})
    with pytest.raises(StageError, match=r"--batched on with --precision float16.*allowed"):
        train_side(on, progress=False, echo=False, run_name="f16-on")
    assert not (half.folder.parent / "f16-on").exists()  # refused before any run folder


def test_the_side_network_runs_its_matrices_in_bfloat16_under_autocast(tiny_cache):
    from stages.train_side import (
        Trial,
        autocast,
        backbone_config_of,
        build_trial,
        resolve_cache,
        task_spec_of,
    )

    cfg = apply_overrides(tiny_cache, {"train_side.precision": "bfloat16"})
    cache = resolve_cache(cfg, None)
    ts = build_trial(
        cfg, cache, backbone_config_of(cache), task_spec_of(cache), Trial(8, 0, 1e-3), 1
    )
    dtypes = []
    linear = next(m for m in ts.net.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = torch.randn(2, 5, linear.in_features)
    with autocast(ts):
        linear(x)
    linear(x)
    assert dtypes == [torch.bfloat16, torch.float32]
    assert all(p.dtype == torch.float32 for p in ts.net.parameters())  # master weights


def test_a_checkpoint_of_another_device_is_refused_not_resumed(tiny_cache):
    cfg = apply_overrides(tiny_cache, {"train_side.seeds": [0]})
    result = train_side(cfg, progress=False, echo=False, run_name="moved")
    ck_path = next((result.folder / "checkpoints").glob("*.last.pt"))
    assert torch.load(ck_path, weights_only=False)["rng_device"] == "cpu"
    ck = torch.load(ck_path, weights_only=False)
    ck["rng_device"] = "cuda"  # as a run on a GPU writes it
    torch.save(ck, ck_path)
    before = (result.folder / "metrics.json").read_text()
    with pytest.raises(StageError, match=r"trained on cuda .*allowed: resume it with"):
        train_side(cfg, progress=False, echo=False, run_name="moved")
    assert json.loads((result.folder / "metrics.json").read_text()) == json.loads(before)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "unknown train_side.device 'tpu'; allowed: auto, cpu, cuda"),
        ("cuda", "train_side.device 'cuda' asked for, but no CUDA GPU is available"),
    ],
)
def test_a_side_device_that_is_not_there_is_one_line_and_exit_2(
    tmp_path, capsys, monkeypatch, device, message
):
    from pipeline.cli import run_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    args = ["run", "train-side", "--task", "rte", "--side-device", device]
    args += ["--run-dir", str(tmp_path / "runs"), "--cache-root", str(tmp_path / "cache")]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()
