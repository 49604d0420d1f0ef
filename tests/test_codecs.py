"""The numpy codecs of ``cache_store.layout`` give exactly the codes of torch's casts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_store.layout import decode_numpy, encode, encode_rows, state_arrays


def torch_encode(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The torch implementation the cache used before the codecs went numpy-only."""
    if dtype == "float32":
        return x.float().numpy(), None
    if dtype == "float16":
        return x.half().numpy(), None
    if dtype == "bfloat16":
        return x.bfloat16().view(torch.int16).numpy().view(np.uint16), None
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    codes = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.numpy(), scale.numpy()


def samples() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 64)) * rng.choice([1e-3, 1, 30, 3e4], (300, 1))).astype(
        np.float32
    )
    # bfloat16 ties: the low 16 bits exactly 0x8000 (odd and even upper halves), and near-ties
    bits = rng.integers(0, 2**31, (64, 64), dtype=np.uint32) & np.uint32(0xFFFF0000)
    ties = np.concatenate([bits | np.uint32(0x8000), bits | np.uint32(0x7FFF), bits | 1]).view(
        np.float32
    )
    ties = np.where(np.isfinite(ties), ties, 1.0).astype(np.float32)
    # int8 ties: rows whose scaled values land on k + 0.5 (absmax 127 -> scale 1)
    half = np.tile(np.arange(-126.5, 127, 1.0, dtype=np.float32)[:64], (8, 1))
    half[:, 0] = 127.0
    special = np.array(
        [[0.0] * 8, [np.inf, -np.inf, np.nan, 1.0, -0.0, 3.4e38, -3.4e38, 1e-40]], np.float32
    )
    return [x, ties, half, special, np.zeros((0, 64), np.float32)]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_numpy_encode_is_bit_identical_to_torch(dtype):
    for x in samples():
        if dtype == "int8" and not np.isfinite(x).all():
            continue  # NaN/inf states have no int8 code
        nan = np.isnan(x)
        if nan.any():  # torch's NaN bits differ between its vector and scalar paths: NaN is NaN
            assert np.isnan(decode_numpy(encode(x, dtype)[0], None, dtype)[nan]).all()
            x = np.where(nan, np.float32(1.5), x)
        want_codes, want_scale = torch_encode(torch.from_numpy(x.copy()), dtype)
        codes, scale = encode(x, dtype)
        assert codes.dtype == want_codes.dtype
        np.testing.assert_array_equal(codes.view(np.uint8), want_codes.view(np.uint8))
        if want_scale is None:
            assert scale is None
        else:
            np.testing.assert_array_equal(scale.view(np.uint32), want_scale.view(np.uint32))
        # float16 input (a backbone computing in float16) encodes as torch encodes a half tensor
        with np.errstate(over="ignore"):
            h = x.astype(np.float16)
        want_h, _ = torch_encode(torch.from_numpy(h.copy()), dtype)
        np.testing.assert_array_equal(encode(h, dtype)[0].view(np.uint8), want_h.view(np.uint8))


def test_encode_rows_names_match_the_layout_and_decode_round_trips():
    x = np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32)
    packed = encode_rows({0: x, 3: x}, "int8")
    assert set(packed) == set(state_arrays("train", "enc", [0, 3], "int8"))
    y = decode_numpy(packed["layer_03"], packed["layer_03_scale"], "int8")
    assert np.abs(y - x).max() <= np.abs(x).max() / 127
