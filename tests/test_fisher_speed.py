"""The fast Fisher pass (ladder/fisher.py ``compute_fisher``) against a naive batch-size-1 loop.

``compute_fisher`` gives embedding tables sparse gradients and squares into a reused buffer; both
must leave the result bit for bit equal to ``sum(grad**2)`` over dense per-example gradients, with
the rows no example looks up exactly zero. ``fisher_s`` must reach the extract manifest. (The
batched pass, equal up to rounding, is compared in tests/test_fisher_batched.py.)
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from cache_store.registry import open_cache
from ladder.fisher import compute_fisher
from stages.extract import extract
from tests.conftest import make_config, tiny_bert
from tests.test_pruning import BART_CFG, BERT_CFG, T5_CFG

T = 9  # tokens per BERT example; position rows >= T are never looked up


def naive_fisher(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]):
    """The reference's loop: dense per-example gradients, ``grad**2`` summed, eval mode."""
    model.eval()
    names, params = zip(*model.named_parameters(), strict=True)
    for p in params:
        p.requires_grad_(True)
    expected = {n: torch.zeros_like(p) for n, p in zip(names, params, strict=True)}
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                expected[n] += g**2
    return expected


def bert_case():
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=2, **BERT_CFG))
    gen = torch.Generator().manual_seed(5)
    batches = []
    for i in range(6):
        ids = torch.randint(1, 60, (1, T), generator=gen)  # ids >= 60 are never looked up
        if i < 3:
            ids[0, :3] = 7  # one row looked up several times in one example
            ids[0, 4] = 0  # the padding index: its gradient row is dropped
        types = torch.tensor([[0] * 4 + [1] * (T - 4)])
        batches.append({"input_ids": ids, "token_type_ids": types, "labels": torch.tensor([i % 2])})
    return model, batches


def t5_case(tied: bool):
    torch.manual_seed(0)
    config = tf.T5Config(
        vocab_size=100,
        decoder_start_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=tied,
        **T5_CFG,
    )
    model = tf.T5ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(6)
    batches = [
        {
            "input_ids": torch.randint(1, 100, (1, 11), generator=gen),
            "labels": torch.randint(1, 100, (1, 4), generator=gen),
        }
        for _ in range(5)
    ]
    return model, batches


def bart_case():
    torch.manual_seed(0)
    model = tf.BartForSequenceClassification(tf.BartConfig(num_labels=2, **BART_CFG))
    gen = torch.Generator().manual_seed(7)
    batches = []
    for i in range(5):
        body = torch.randint(3, 100, (1, 5), generator=gen)
        ids = torch.cat([torch.tensor([[0]]), body, torch.tensor([[2]])], 1)
        batches.append({"input_ids": ids, "labels": torch.tensor([i % 2])})
    return model, batches


CASES = {
    "bert": bert_case,
    "t5-tied": lambda: t5_case(True),
    "t5-untied": lambda: t5_case(False),
    "bart": bart_case,
}


def embedding_state(model: torch.nn.Module) -> list[tuple[bool, int]]:
    return [
        (m.sparse, len(m._forward_hooks))
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding)
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fisher_is_bit_identical_to_the_naive_batch_size_one_sum(case):
    model, batches = CASES[case]()
    before = embedding_state(model)
    fisher = compute_fisher(model, batches, num_samples=len(batches), batched=False)
    assert embedding_state(model) == before  # sparse flags back, hooks gone
    expected = naive_fisher(model, batches)
    assert fisher.keys() == expected.keys()
    for name, value in expected.items():
        assert fisher[name].dtype == torch.float32
        assert torch.equal(fisher[name], value), name


def test_rows_no_example_looks_up_stay_exactly_zero():
    model, batches = bert_case()
    fisher = compute_fisher(model, batches, num_samples=len(batches))
    words = fisher["bert.embeddings.word_embeddings.weight"]
    seen = torch.unique(torch.cat([b["input_ids"].flatten() for b in batches]))
    touched = torch.zeros(words.shape[0], dtype=torch.bool)
    touched[seen] = True
    touched[0] = False  # padding_idx: looked up, but its gradient row is always zero
    assert words[~touched].abs().sum() == 0
    assert (words[touched].abs().sum(1) > 0).all()
    positions = fisher["bert.embeddings.position_embeddings.weight"]
    assert positions[T:].abs().sum() == 0 and (positions[:T].abs().sum(1) > 0).all()
    types = fisher["bert.embeddings.token_type_embeddings.weight"]
    assert (types.abs().sum(1) > 0).all()  # both token types are used


class _OddTables(torch.nn.Module):
    """``a`` is looked up twice per forward; ``b``'s weight is also read outside its module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Embedding(50, 8)
        self.b = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        x = self.a(input_ids) + 0.5 * self.a(input_ids.flip(1)) + self.b(input_ids)
        y = self.head(x).mean() + (self.b.weight[:3] ** 2).sum()
        return tf.modeling_outputs.SequenceClassifierOutput(loss=(y - labels).pow(2).sum())


def test_tables_looked_up_twice_or_used_elsewhere_fall_back_to_dense_exactly():
    torch.manual_seed(0)
    model = _OddTables()
    gen = torch.Generator().manual_seed(8)
    batches = [
        {"input_ids": torch.randint(0, 50, (1, 30), generator=gen), "labels": torch.ones(1)}
        for _ in range(4)
    ]
    fisher = compute_fisher(model, batches, num_samples=4)
    assert embedding_state(model) == [(False, 0), (False, 0)]
    expected = naive_fisher(model, batches)
    for name, value in expected.items():
        assert torch.equal(fisher[name], value), name


def test_fisher_leaves_a_callers_sparse_table_sparse():
    model, batches = bert_case()
    model.bert.embeddings.word_embeddings.sparse = True
    fisher = compute_fisher(model, batches, num_samples=2)
    assert model.bert.embeddings.word_embeddings.sparse
    expected = naive_fisher(model, batches[:2])
    torch.testing.assert_close(
        fisher["bert.embeddings.word_embeddings.weight"],
        expected["bert.embeddings.word_embeddings.weight"],
        rtol=1e-6,
        atol=0,
    )


@pytest.mark.parametrize("methods", [["magnitude", "fisher"], ["magnitude"]])
def test_extract_records_the_fisher_pass_time(tmp_path, glue_dir, minilm_tokenizer, methods):
    cfg = make_config(
        tmp_path,
        glue_dir,
        **{
            "task.limit": 8,
            "extract.side_init": methods,
            "extract.reduction_factors": [2],
            "extract.fisher_samples": 4,
        },
    )
    result = extract(cfg, backbone=tiny_bert(minilm_tokenizer, layers=1), progress=False)
    timings = open_cache(cfg.cache_root, result.key).manifest["timings"]
    if "fisher" in methods:
        assert 0 < timings["fisher_s"] <= timings["side_init_s"]
    else:
        assert "fisher_s" not in timings
