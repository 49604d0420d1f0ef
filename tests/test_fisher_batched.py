"""The batched Fisher pass (padded, length-sorted batches) against the naive batch-size-1 loop.

Examples of different lengths share a batch, so padding must be inert: the attention mask keeps
pad positions from the real ones and each example's sums stop at its own length. Key biases have
a gradient of exactly zero in exact arithmetic (softmax ignores a shift shared by all keys), so
both sides hold rounding noise there (~1e-25); they are compared against the model's largest
entry instead of their own.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import ladder.fisher as fisher_module
from ladder.fisher import compute_fisher
from tests.test_fisher_speed import BART_CFG, BERT_CFG, naive_fisher, t5_case

RTOL = 1e-4  # relative to each tensor's largest entry
LENGTHS = [3, 9, 5, 12, 7, 4, 11, 6]


def bert_ragged():
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=2, **BERT_CFG))
    gen = torch.Generator().manual_seed(5)
    batches = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(1, 60, (1, n), generator=gen)
        ids[0, : min(2, n)] = 7  # a row looked up twice in one example
        types = torch.tensor([[0] * (n // 2) + [1] * (n - n // 2)])
        batch = {"input_ids": ids, "token_type_ids": types, "labels": torch.tensor([i % 2])}
        if i % 2:
            batch["attention_mask"] = torch.ones_like(ids)
        batches.append(batch)
    return model, batches


def bert_regression():
    torch.manual_seed(1)
    model = tf.BertForSequenceClassification(
        tf.BertConfig(num_labels=1, problem_type="regression", **BERT_CFG)
    )
    gen = torch.Generator().manual_seed(3)
    batches = [
        {
            "input_ids": torch.randint(1, 60, (1, n), generator=gen),
            "labels": torch.tensor([0.3 * n]),
        }
        for n in LENGTHS
    ]
    return model, batches


def bart_ragged():
    torch.manual_seed(0)
    model = tf.BartForSequenceClassification(tf.BartConfig(num_labels=2, **BART_CFG))
    gen = torch.Generator().manual_seed(7)
    batches = []
    for i, n in enumerate(LENGTHS):
        body = torch.randint(3, 100, (1, n), generator=gen)
        ids = torch.cat([torch.tensor([[0]]), body, torch.tensor([[2]])], 1)
        batches.append({"input_ids": ids, "labels": torch.tensor([i % 2])})
    return model, batches


CASES = {"bert": bert_ragged, "bert-regression": bert_regression, "bart": bart_ragged}


def worst_error(fisher, expected):
    """The largest |batched - loop| of each tensor over its largest entry (noise floor: model's)."""
    floor = 1e-10 * max(v.abs().max() for v in expected.values())
    return {
        name: ((fisher[name] - v).abs().max() / torch.clamp(v.abs().max(), min=floor)).item()
        for name, v in expected.items()
    }


def run(case, monkeypatch, token_budget):
    model, batches = CASES[case]()
    used = []
    real = fisher_module._batched_fisher
    monkeypatch.setattr(
        fisher_module, "_batched_fisher", lambda *a: used.append(real(*a)) or used[-1]
    )
    fisher = compute_fisher(model, batches, num_samples=len(batches), token_budget=token_budget)
    return fisher, naive_fisher(model, batches), used


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("token_budget", [40, 4096])  # several ragged batches, and one batch
def test_batched_fisher_matches_the_loop_on_ragged_batches(case, token_budget, monkeypatch):
    fisher, expected, used = run(case, monkeypatch, token_budget)
    assert used == [True]  # the batched path ran, not the loop
    assert fisher.keys() == expected.keys()
    errors = worst_error(fisher, expected)
    assert max(errors.values()) < RTOL, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_a_broken_padding_mask_is_caught(monkeypatch):
    """Let pad tokens be attended: the real tokens' gradients change and the comparison fails."""
    real = fisher_module._collate

    def unmasked(*args):
        batch = real(*args)
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
        return batch

    monkeypatch.setattr(fisher_module, "_collate", unmasked)
    fisher, expected, used = run("bert", monkeypatch, 4096)
    assert used == [True]
    assert max(worst_error(fisher, expected).values()) > 1e-2


@pytest.mark.parametrize("tied", [True, False])
def test_t5_falls_back_to_the_loop_bit_for_bit(tied, monkeypatch):
    model, batches = t5_case(tied)
    for i, b in enumerate(batches):  # ragged sources and targets
        b["input_ids"] = b["input_ids"][:, : 6 + i]
        b["labels"] = b["labels"][:, : 2 + i % 3]
    used = []
    real = fisher_module._batched_fisher
    monkeypatch.setattr(
        fisher_module, "_batched_fisher", lambda *a: used.append(real(*a)) or used[-1]
    )
    fisher = compute_fisher(model, batches, num_samples=len(batches))
    assert used == [False]
    expected = naive_fisher(model, batches)
    for name, value in expected.items():
        assert torch.equal(fisher[name], value), name


def test_length_groups_respect_the_budget_and_avoid_square_batches():
    lengths = sorted([3, 3, 3, 4, 4, 9, 9, 12, 30])
    sizes = fisher_module._length_groups(lengths, 24)
    assert sum(sizes) == len(lengths)
    start = 0
    for size in sizes:
        longest = lengths[start + size - 1]
        assert size * longest <= 24 or size == 1
        assert size != longest or size == 1
        start += size
