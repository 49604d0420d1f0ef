"""side_init for the decoder-only families (GPT-2, Llama): the Fisher pass's classifier and both
methods' weights from an extraction, on tiny random backbones."""

from __future__ import annotations

import pytest
import torch

from cache_store.registry import open_cache
from ladder.pruning import fisher_model_for
from ladder.side import SideConfig, build_side_network
from stages.extract import extract
from stages.train_side import load_side_init
from tests.conftest import make_config, tiny_gpt2, tiny_llama

CLASSIFIERS = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification"}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def causal(request, minilm_tokenizer):
    """(family, tiny random backbone of it)."""
    tiny = {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]
    return request.param, tiny(minilm_tokenizer)


def test_fisher_model_is_sequence_classification_pooling_the_last_non_pad(causal):
    family, backbone = causal
    model = fisher_model_for(family, backbone.config, 2, seed=0, pad_token_id=0)
    assert type(model).__name__ == CLASSIFIERS[family]
    assert model.config.pad_token_id == 0
    model.base_model.load_state_dict(backbone.model.state_dict())
    ids = torch.tensor([[101, 2054, 2003, 102, 0, 0]])
    full = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    short = model(input_ids=ids[:, :4]).logits
    torch.testing.assert_close(full, short, rtol=1e-5, atol=1e-6)


def test_magnitude_and_fisher_side_init_from_the_extraction(tmp_path, glue_dir, causal):
    _, backbone = causal
    cfg = make_config(
        tmp_path,
        glue_dir,
        **{
            "task.limit": 6,
            "extract.side_init": ["magnitude", "fisher"],
            "extract.reduction_factors": [2],
            "extract.fisher_samples": 4,
        },
    )
    result = extract(cfg, backbone=backbone, progress=False)
    assert sorted(result.manifest["side_init"]["r2"]) == ["fisher", "magnitude"]
    cache = open_cache(cfg.cache_root, result.key)
    fisher, magnitude = load_side_init(cache, 2, "fisher"), load_side_init(cache, 2, "magnitude")
    for w in (fisher, magnitude):
        build_side_network(backbone.config, SideConfig(reduction_factor=2)).load_side_init(w)
    assert any(not torch.equal(fisher[k], magnitude[k]) for k in fisher)
