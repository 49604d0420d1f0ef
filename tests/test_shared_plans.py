"""The product's public functions that the benchmarks call instead of copying them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
