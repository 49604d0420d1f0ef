"""Networks of one shape trained as one stacked model (``train_side.batched``) follow the
trajectories they follow alone: same dropout masks (each network's own stream), same losses and
weights to float rounding, and the same bits whatever the size of the group."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache_store import layout
from ladder.attention import Dropout
from ladder.stacked import group_sizes
from pipeline.config import apply_overrides
from stages.extract import extract
from stages.train_side import (
    Trial,
    backbone_config_of,
    build_trial,
    class_weight_of,
    resolve_cache,
    run_signature,
    task_spec_of,
    train_side,
)
from tests.conftest import SHORT_RUN, assert_same_trajectories, make_config, strip_timing, tiny_bert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, glue_dir, minilm_tokenizer):
    """A float32 cache of RTE (12 examples a split) from a tiny random BERT (dropout 0.1)."""
    tmp = tmp_path_factory.mktemp("stacked")
    backbone = tiny_bert(minilm_tokenizer)
    cfg = make_config(tmp, glue_dir, **{"cache.dtype": "float32", "task.limit": 12})
    cfg = apply_overrides(
        cfg,
        {
            "backbone.name": backbone.name,
            **SHORT_RUN,
            "train_side.reduction_factors": [2, 4],
            "train_side.seeds": [0, 1],
            "train_side.learning_rates": [3e-3],
            "train_side.ladder_dropout": 0.2,
        },
    )
    extract(cfg, backbone=backbone, progress=False)
    return cfg


def _run(cfg, tmp_path, name, **over):
    cfg = apply_overrides(cfg, {"train_side.run_dir": str(tmp_path / "runs"), **over})
    return train_side(cfg, run_name=name, progress=False, echo=False)


@pytest.mark.parametrize("class_weight", ["none", "balanced"])
def test_stacked_networks_match_training_each_alone_dropout_included(tiny, tmp_path, class_weight):
    """4 networks (2 r x 2 seeds: two stacked groups of 2) vs one by one, dropout on
    (the backbone's 0.1 and ladder dropout 0.2): same losses and weights to 1e-5; with
    balanced class weights too."""
    cw = {"train_side.class_weight": class_weight}
    alone = _run(tiny, tmp_path, "alone", **{"train_side.batched": "off"}, **cw)
    stacked = _run(tiny, tmp_path, "stacked", **{"train_side.batched": "on"}, **cw)
    assert len(alone.metrics["networks"]) == 4
    assert_same_trajectories(alone, stacked)


@pytest.mark.parametrize("ladder_dropout", [0.0, 0.2])
def test_a_network_gives_the_same_bits_in_any_group(tiny, tmp_path, monkeypatch, ladder_dropout):
    """Split into groups of one by memory (``memory_mb``) or stacked two at a time: bit for bit
    (without ladder dropout the networks share each widened state, held once)."""
    import stages.train_side as ts_mod

    over = {"train_side.batched": "on", "train_side.ladder_dropout": ladder_dropout}
    big = _run(tiny, tmp_path, "big", **over)
    monkeypatch.setattr(ts_mod, "activation_bytes", lambda net, b, t: 10**15)
    small = _run(tiny, tmp_path, "small", **over)
    assert strip_timing(big.metrics) == strip_timing(small.metrics)
    for name in big.metrics["networks"]:
        a = (big.folder / f"{name}.best.safetensors").read_bytes()
        assert (small.folder / f"{name}.best.safetensors").read_bytes() == a


def test_groups_are_split_to_fit_the_budget():
    assert group_sizes(9, 100, 10_000) == [9]
    assert group_sizes(9, 100, 400) == [3, 3, 3]
    assert group_sizes(9, 100, 500) == [5, 4]
    assert group_sizes(3, 100, 10) == [1, 1, 1]


def test_batched_and_compile_do_not_define_the_run(tiny, tmp_path):
    """The same run folder under another ``batched`` or ``compile``: resumed (here: nothing left
    to train), not refused."""
    a = _run(tiny, tmp_path, "r", **{"train_side.batched": "off", "train_side.seeds": [0]})
    b = _run(
        tiny, tmp_path, "r",
        **{"train_side.batched": "on", "train_side.compile": "off", "train_side.seeds": [0]},
    )  # fmt: skip
    assert a.folder == b.folder and strip_timing(a.metrics) == strip_timing(b.metrics)


def test_balanced_class_weights_give_each_class_the_same_total_and_change_the_losses(
    tiny, tmp_path
):
    """``class_weight: balanced``: a class's weight times its training examples is n / classes
    for every class; the run's losses are not the unweighted run's; none weighs nothing."""
    cfg = apply_overrides(tiny, {"train_side.class_weight": "balanced"})
    cache = resolve_cache(cfg, None)
    weight = class_weight_of(cfg, cache, task_spec_of(cache))
    labels = np.asarray(cache.array(layout.labels_path("train"))[:])
    counts = np.bincount(labels)
    assert counts.min() != counts.max()  # an uneven split, or the weights would all be 1
    totals = weight.numpy() * counts
    np.testing.assert_allclose(totals, len(labels) / len(counts), rtol=1e-6)
    assert class_weight_of(tiny, cache, task_spec_of(cache)) is None
    one = {"train_side.batched": "off", "train_side.reduction_factors": [4]}
    one["train_side.seeds"] = [0]
    plain = _run(tiny, tmp_path, "plain", **one)
    weighed = _run(tiny, tmp_path, "weighed", **one, **{"train_side.class_weight": "balanced"})
    name = "r4-s0-lr0.003"
    la = [h["train_loss"] for h in plain.metrics["networks"][name]["epochs"]]
    lb = [h["train_loss"] for h in weighed.metrics["networks"][name]["epochs"]]
    assert la != lb
    assert (
        json.loads((weighed.folder / "config.json").read_text())["train_side"]["class_weight"]
        == "balanced"
    )


@pytest.mark.parametrize("dropout", [None, 0.0, 0.3])
def test_train_side_dropout_is_every_side_dropout_and_is_saved(tiny, tmp_path, dropout):
    """train_side.dropout: one rate for the side network's residual, attention-probability and
    head dropouts (the ladders' own rate, ladder_dropout, stays 0.2; BERT's FFN has none); None:
    the tiny backbone's 0.1. The saved network holds it, and a run without it keeps the
    signature of runs made before the option."""
    over = {"train_side.dropout": dropout, "train_side.epochs": 1, "train_side.seeds": [0]}
    out = _run(tiny, tmp_path, "drop", **{**over, "train_side.reduction_factors": [2]})
    saved = json.loads((out.folder / "r2-s0-lr0.003.config.json").read_text())
    assert saved["side"]["dropout"] == dropout
    cfg = apply_overrides(tiny, over)
    cache = resolve_cache(cfg, None)
    spec = task_spec_of(cache)
    ts = build_trial(cfg, cache, backbone_config_of(cache), spec, Trial(2, 0, 3e-3), 1)
    rates = {
        name: m.p
        for name, m in ts.net.named_modules()
        if isinstance(m, Dropout) and not name.endswith(("ladder_drop", "act_drop"))
    }
    rates |= {
        f"{n}.attn": m.attn_dropout for n, m in ts.net.named_modules() if hasattr(m, "attn_dropout")
    }
    want = 0.1 if dropout is None else dropout
    assert len(rates) > 3 and set(rates.values()) == {want}, rates
    assert {m.p for n, m in ts.net.named_modules() if n.endswith("ladder_drop")} == {0.2}
    assert ("dropout" in run_signature(cfg, cache.key, None)["train_side"]) == (dropout is not None)
