"""The product's public functions that the benchmarks call instead of copying them."""

from __future__ import annotations

import pytest
import torch

from stages.train_side import linear_schedule


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
