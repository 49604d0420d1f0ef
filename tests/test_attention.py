"""The side network's attention: SDPA's values and gradients, 1 byte per score kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ladder import attention as attention_module
from ladder.attention import attention, keep_mask, mask_bias


def _inputs(seed: int, bias_grad: bool):
    g = torch.Generator().manual_seed(seed)
    B, H, T, hd = 3, 4, 7, 5
    q, k, v = (torch.randn(B, H, T, hd, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 6:] = False
    bias = mask_bias(mask[:, None, None, :], torch.float32)
    if bias_grad == "shared":  # one learned (1, H, T, T) bias for every row of the batch
        bias = torch.randn(1, H, T, T, generator=g).requires_grad_(True)
    elif bias_grad:  # a learned bias, like T5's relative positions, plus the padding mask
        bias = (bias + torch.randn(1, H, T, T, generator=g)).detach().requires_grad_(True)
    return q, k, v, bias


def _reference(q, k, v, bias, p, scale, seed):
    """The textbook computation with the same keep-mask as ``attention`` draws."""
    scores = q @ k.transpose(-1, -2) * scale + bias
    probs = torch.softmax(scores, -1)
    torch.manual_seed(seed)
    keep, p = keep_mask(probs.shape, p)
    return (probs * keep / (1 - p)) @ v


def _assert_same(ours, ref, ours_in, ref_in):
    """Same values, and the same gradients for the inputs that take one, for one output grad."""
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ours)
    ours.backward(g)
    ref.backward(g)
    for a, b in zip(ours_in, ref_in, strict=True):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias_grad", [False, True, "shared"])
@pytest.mark.parametrize("scale", [None, 1.0])
@pytest.mark.parametrize("chunked", [False, True])
def test_dropout_attention_matches_the_textbook_values_and_gradients(
    bias_grad, scale, chunked, monkeypatch
):
    if chunked:  # one batch row per chunk: the maps are made row by row
        monkeypatch.setattr(attention_module, "CHUNK_BYTES", 1)
        assert len(attention_module._chunks(3, 4 * 7 * 7)) == 3
    p = 0.3
    ours_in = _inputs(0, bias_grad)
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in ours_in]
    torch.manual_seed(7)
    ours = attention(*ours_in, dropout_p=p, scale=scale)
    s = ours_in[0].shape[-1] ** -0.5 if scale is None else scale
    ref = _reference(*ref_in, p, s, seed=7)
    _assert_same(ours, ref, ours_in, ref_in)


def test_without_dropout_it_is_sdpa_and_a_boolean_mask_is_accepted():
    q, k, v, bias = _inputs(1, False)
    mask = bias == 0
    torch.testing.assert_close(
        attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_drops_p_rounded_to_1_256(p):
    torch.manual_seed(0)
    keep, rate = keep_mask((64, 1000, 3), p)
    assert rate == round(p * 256) / 256
    assert keep.dtype == torch.uint8 and set(keep.unique().tolist()) == {0, 1}
    assert abs(1 - keep.float().mean().item() - rate) < 0.005
    assert 0.4 < keep[..., 0].float().mean() / keep[..., 2].float().mean() < 2.5  # every byte drawn


def test_dropout_drops_about_p_and_keeps_the_expectation():
    q, k, v, bias = _inputs(2, False)
    with torch.no_grad():
        mean = torch.stack([attention(q, k, v, bias, dropout_p=0.5) for _ in range(400)]).mean(0)
        exact = attention(q, k, v, bias)
    torch.testing.assert_close(mean, exact, rtol=0.15, atol=0.1)


@pytest.mark.parametrize("hd", [4, 16])
def test_narrow_and_wide_heads_give_the_textbook_values_and_gradients(hd):
    """Heads narrower than ``NARROW`` multiply the maps as transposed products into transposed
    buffers; wider ones as they are. Both are the textbook attention, inputs given as the
    (B, T, H, hd) -> (B, H, T, hd) views the side networks pass."""
    g = torch.Generator().manual_seed(3)
    B, H, T = 4, 3, 9
    assert (hd < attention_module.NARROW) == (hd == 4)
    x = [torch.randn(B, T, H, hd, generator=g) for _ in range(3)]
    ours_in = [t.clone().requires_grad_(True) for t in x]
    ref_in = [t.clone().requires_grad_(True) for t in x]
    bias = torch.randn(B, 1, 1, T, generator=g)
    torch.manual_seed(11)
    ours = attention(*(t.transpose(1, 2) for t in ours_in), bias, dropout_p=0.2)
    ref = _reference(*(t.transpose(1, 2) for t in ref_in), bias, 0.2, hd**-0.5, seed=11)
    _assert_same(ours, ref, ours_in, ref_in)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_side_dropout_keeps_p_rounded_and_the_expectation(p):
    """``Dropout``: a byte keep-mask, kept values scaled by 1 / (1 - rate); identity in eval."""
    from ladder.attention import Dropout

    drop = Dropout(p)
    x = torch.full((200, 300), 2.0, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    rate = round(p * 256) / 256
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - rate) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / (1 - rate)))
    y.sum().backward()  # the gradient passes where the value was kept, scaled the same
    torch.testing.assert_close(x.grad, kept.float() / (1 - rate))
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the global stream decides the mask
    assert torch.equal(drop.eval()(x), x)


def test_the_compiled_attention_is_the_eager_one_for_the_same_keep_mask():
    """Under torch.compile the attention is traced as plain operations (``_traced_attention``,
    which AOT autograd can keep on disk, unlike a custom autograd function): for a given
    keep-mask its values and gradients are the eager ``_DropoutAttention``'s."""
    q, k, v, bias = _inputs(4, True)
    keep, _ = keep_mask((3, 4, 7, 7), 0.3)
    eager_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    traced_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    eager = attention(*eager_in, dropout_p=0.3, keep=keep)

    def call(q, k, v, bias):
        return attention(q, k, v, bias, dropout_p=0.3, keep=keep)

    traced = torch.compile(call, backend="aot_eager", fullgraph=True)(*traced_in)
    _assert_same(traced, eager, traced_in, eager_in)
