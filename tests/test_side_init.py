"""side_init in the cache: the pruned weights are exactly the backbone rows and columns they name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_store.registry import open_cache
from stages.extract import extract
from tests.conftest import make_config, tiny_bert

BERT_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ln_attn": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ln_ffn": "output.LayerNorm",
}


@pytest.fixture(scope="module")
def cache_with_side_init(tmp_path_factory, glue_dir, minilm_tokenizer):
    tmp = tmp_path_factory.mktemp("side_init")
    backbone = tiny_bert(minilm_tokenizer)
    cfg = make_config(
        tmp,
        glue_dir,
        **{
            "task.limit": 16,
            "extract.side_init": ["magnitude", "fisher"],
            "extract.reduction_factors": [2, 4],
            "extract.fisher_samples": 8,
        },
    )
    result = extract(cfg, backbone=backbone, progress=False)
    return backbone, open_cache(cfg.cache_root, result.key)


def _read(group, name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(group[name][...]))


@pytest.mark.parametrize("method", ["magnitude", "fisher"])
@pytest.mark.parametrize("r", [2, 4])
def test_side_init_holds_exactly_the_selected_backbone_rows_and_columns(
    cache_with_side_init, method, r
):
    backbone, cache = cache_with_side_init
    assert {k: sorted(v) for k, v in cache.manifest["side_init"].items()} == {
        "r2": ["fisher", "magnitude"],
        "r4": ["fisher", "magnitude"],
    }
    group = cache.group[f"side_init/r{r}/{method}"]
    names = {name for name, _ in group.arrays()}
    state = backbone.model.state_dict()
    d, d_ff = 32, 64
    checked = 0
    for layer in range(backbone.n_layers):
        for canon, hf in BERT_NAMES.items():
            rows = _read(group, f"idx.layers.{layer}.{canon}.rows")
            assert torch.equal(rows, torch.sort(rows).values) and len(set(rows.tolist())) == len(
                rows
            )
            weight = _read(group, f"layers.{layer}.{canon}.weight")
            full = state[f"encoder.layer.{layer}.{hf}.weight"]
            if weight.dim() == 2:
                cols = _read(group, f"idx.layers.{layer}.{canon}.cols")
                assert torch.equal(weight, full[rows][:, cols])
                out_dim = d_ff if canon == "ffn_in" else d
                in_dim = d_ff if canon == "ffn_out" else d
                assert weight.shape == (out_dim // r, in_dim // r)
            else:
                assert torch.equal(weight, full[rows])
            bias = _read(group, f"layers.{layer}.{canon}.bias")
            assert torch.equal(bias, state[f"encoder.layer.{layer}.{hf}.bias"][rows])
            checked += 1
    assert checked == backbone.n_layers * len(BERT_NAMES)
    assert "layers.0.q.weight" in names


def test_fisher_and_magnitude_select_differently(cache_with_side_init):
    _, cache = cache_with_side_init
    picks = {
        m: [_read(cache.group[f"side_init/r4/{m}"], f"idx.layers.{i}.q.rows") for i in range(3)]
        for m in ("magnitude", "fisher")
    }
    assert any(
        not torch.equal(a, b) for a, b in zip(picks["magnitude"], picks["fisher"], strict=True)
    )


def test_side_network_loads_side_init_exactly(cache_with_side_init):
    from ladder.side import SideConfig, build_side_network
    from stages.train_side import load_side_init

    backbone, cache = cache_with_side_init
    weights = load_side_init(cache, 4, "fisher")
    net = build_side_network(backbone.config, SideConfig(reduction_factor=4, kept_layers=(0, 2)))
    net.load_side_init(weights)
    own = net.state_dict()
    for layer in (0, 2):
        for canon in BERT_NAMES:
            for kind in ("weight", "bias"):
                key = f"layers.{layer}.{canon}.{kind}"
                assert torch.equal(own[key], weights[key]), key
    assert not any(k.startswith("layers.1.") for k in own)
