"""The product's public functions that the benchmarks call instead of copying them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_store.loader import bucketed_batches
from stages.tasks import Example, TaskData, get_task
from stages.tokens import padded_batches, plan_batches, tokenize_split, tokenize_texts
from stages.train_side import linear_schedule
from tests.conftest import tiny_bert


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 10), (10, 10), (5, 40)])
def test_linear_schedule_is_transformers_linear_schedule_with_warmup(warmup, total):
    from transformers import get_linear_schedule_with_warmup

    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_linear_schedule_with_warmup(ref_opt, warmup, total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ours = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(warmup, total))
    for _ in range(total + 3):  # past the end the factor stays 0
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
        for o, s in ((ref_opt, ref), (opt, ours)):
            o.step()
            s.step()


def test_bucketed_batches_partition_sorted_groups_and_determinism():
    lengths = [int(x) for x in np.random.default_rng(0).integers(1, 60, size=537)]

    def plan(seed: int | None) -> list[list[int]]:
        rng = None if seed is None else np.random.default_rng([seed, 1])
        return bucketed_batches(lengths, 10, 5, rng)

    for seed in (None, 3):
        batches = plan(seed)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) == 10 for b in batches[:-1] if seed is None)
        assert all(1 <= len(b) <= 10 for b in batches)
        # within a batch, lengths are sorted: a batch is a slice of a length-sorted group
        assert all([lengths[i] for i in b] == sorted(lengths[i] for i in b) for b in batches)
    ordered = [i for b in plan(None) for i in b]  # evaluation: everything by length
    assert [lengths[i] for i in ordered] == sorted(lengths)
    assert plan(3) == plan(3)
    assert plan(3) != plan(4)
    # shuffled, a group holds 5 batches' worth of examples: little padding against random batches
    pad = sum(max(lengths[i] for i in b) * len(b) for b in plan(3))
    assert pad < 1.2 * sum(lengths)


def test_tokenize_texts_is_tokenize_split_for_encoder_only(minilm_tokenizer):
    spec = get_task("mrpc")
    examples = [
        Example(("A short one.", "And its pair, a little longer."), 1),
        Example(("Another sentence " * 40, "truncated"), 0),
    ]
    data = TaskData(spec, {"train": examples}, "test")
    backbone = tiny_bert(minilm_tokenizer)
    ref = tokenize_split(backbone, data, "train", 32)["enc"]
    got = tokenize_texts(minilm_tokenizer, examples, 32)
    assert got.ids == ref.ids and got.token_types == ref.token_types
    assert max(len(x) for x in got.ids) == 32
    assert np.array_equal(got.offsets, ref.offsets)


def test_padded_batches_are_plan_batches_padded(minilm_tokenizer):
    texts = [("word " * n, "pair " * (n % 3)) for n in range(1, 40)]
    stream = tokenize_texts(minilm_tokenizer, [Example(t, 0) for t in texts], 64)
    lo, hi = 5, 33
    lengths = [stream.length(i) for i in range(lo, hi)]
    plan = plan_batches(lengths, 200, 8)
    got = list(padded_batches(stream, lo, hi, 200, 8, pad_id=0))
    assert [b.index for b in got] == [[lo + i for i in batch] for batch in plan]
    for b in got:
        assert b.mask.dtype == torch.bool and b.ids.shape == b.mask.shape
        assert b.token_types is not None and b.token_types.shape == b.ids.shape
        for row, i in enumerate(b.index):
            n = stream.length(i)
            assert b.mask[row].sum() == n
            assert b.ids[row, :n].tolist() == stream.ids[i]
            assert b.token_types[row, :n].tolist() == stream.token_types[i]
            assert not b.ids[row, n:].any() and not b.token_types[row, n:].any()
