"""The training loader: every example once per epoch, the stored rows, bounded memory, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from cache_store.loader import CacheLoader
from cache_store.registry import open_cache
from stages.extract import extract
from tests.conftest import make_config, tiny_bert


@pytest.fixture(scope="module")
def cache(tmp_path_factory, glue_dir, minilm_tokenizer):
    tmp = tmp_path_factory.mktemp("loader")
    cfg = make_config(tmp, glue_dir, **{"cache.dtype": "float32", "task.limit": 60})
    backbone = tiny_bert(minilm_tokenizer)
    key = extract(cfg, backbone=backbone, progress=False).key
    return open_cache(cfg.cache_root, key)


def _token_bytes(cache) -> int:
    return 4 * cache.manifest["backbone"]["d_model"] * 2  # two states, float32


@pytest.mark.parametrize("budget", ["whole", "streamed"])
def test_each_example_once_per_epoch_with_its_stored_rows(cache, budget):
    n_tokens = int(cache.array("train/offsets")[-1])
    memory = n_tokens * _token_bytes(cache) * (2 if budget == "whole" else 0.2)
    loader = CacheLoader(
        cache, "train", {"enc": [0, 2]}, batch_size=7, shuffle=True, memory_budget=int(memory)
    )
    assert (loader._kept is not None) == (budget == "whole")
    if budget == "streamed":  # the buffer holds at most the budget (and at least two blocks)
        held = loader.buffer_blocks * loader.block_tokens * _token_bytes(cache)
        assert loader.buffer_blocks == 2 or held <= memory
        assert loader.buffer_blocks < len(loader.blocks)
    offsets = np.asarray(cache.array("train/offsets")[:])
    layer2 = np.asarray(cache.array("train/enc/layer_02")[:])
    seen = []
    for batch in loader.epoch(0):
        assert len(batch.index) <= 7
        for b, ex in enumerate(batch.index.tolist()):
            n = int(offsets[ex + 1] - offsets[ex])
            assert batch.masks["enc"][b].sum() == n
            np.testing.assert_array_equal(
                batch.states["enc"][2][b, :n], layer2[offsets[ex] : offsets[ex + 1]]
            )
            assert not batch.states["enc"][2][b, n:].any()  # padding is zero
        seen += batch.index.tolist()
    assert sorted(seen) == list(range(loader.n))


def test_order_depends_on_seed_and_epoch_only(cache):
    def order(seed, epoch, memory=1 << 20):
        loader = CacheLoader(
            cache,
            "train",
            {"enc": [1]},
            batch_size=5,
            shuffle=True,
            seed=seed,
            memory_budget=memory,
        )
        return np.concatenate([b.index for b in loader.epoch(epoch)]).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_length_buckets_cut_padding(cache):
    """Batches of similar lengths pad far less than the same batches drawn at random."""
    loader = CacheLoader(cache, "train", {"enc": [1]}, batch_size=6, shuffle=True)
    real = padded = 0
    for batch in loader.epoch(0):
        real += int(batch.masks["enc"].sum())
        padded += batch.masks["enc"].size
    offsets = np.asarray(cache.array("train/offsets")[:])
    lengths = np.diff(offsets)
    rng = np.random.default_rng(0)
    random_padded = sum(
        int(lengths[idx].max()) * len(idx)
        for idx in np.array_split(rng.permutation(len(lengths)), -(-len(lengths) // 6))
    )
    assert padded / real < 0.8 * random_padded / real


def test_without_states_the_batches_come_in_the_same_order(cache):
    """Online LST reads ids and masks only, in the order the cached run sees."""

    def batches(read_states):
        loader = CacheLoader(
            cache,
            "train",
            {"enc": [0, 1]},
            batch_size=5,
            shuffle=True,
            memory_budget=1 << 16,
            read_states=read_states,
        )
        return list(loader.epoch(3))

    with_states, ids_only = batches(True), batches(False)
    assert [b.index.tolist() for b in with_states] == [b.index.tolist() for b in ids_only]
    for a, b in zip(with_states, ids_only, strict=True):
        np.testing.assert_array_equal(a.input_ids["enc"], b.input_ids["enc"])
        assert set(a.states["enc"]) == {0, 1} and b.states["enc"] == {}


def test_to_torch_shares_the_numpy_memory_and_views_bfloat16_bits():
    import torch

    from cache_store.layout import decode_numpy, encode
    from cache_store.loader import NumpyBatch
    from stages.batches import to_torch

    x = np.random.default_rng(0).standard_normal((2 * 3, 4)).astype(np.float32)
    bits = encode(x, "bfloat16")[0].reshape(2, 3, 4)
    nb = NumpyBatch(
        index=np.array([5, 7]),
        labels=np.array([0, 1]),
        states={"enc": {1: bits}},
        masks={"enc": np.ones((2, 3), dtype=bool)},
        input_ids={"enc": np.zeros((2, 3), dtype=np.int64)},
        state_dtype="bfloat16",
    )
    b = to_torch(nb)
    s = b.states["enc"][1]
    assert s.dtype == torch.bfloat16 and s.shape == (2, 3, 4)
    assert s.data_ptr() == bits.ctypes.data  # no copy
    np.testing.assert_array_equal(
        s.float().numpy().reshape(6, 4), decode_numpy(bits, None, "bfloat16").reshape(6, 4)
    )
    assert b.index.data_ptr() == nb.index.ctypes.data and b.token_type_ids is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_widened_batches_are_the_stored_states_as_float32(
    dtype, tmp_path_factory, glue_dir, minilm_tokenizer
):
    """``widen``: the loader's thread turns float16/bfloat16 states into float32, bit for bit what
    the side network would widen them to, in the same batches."""
    import torch

    from stages.batches import to_torch

    tmp = tmp_path_factory.mktemp(f"widen-{dtype}")
    cfg = make_config(tmp, glue_dir, **{"cache.dtype": dtype, "task.limit": 30})
    key = extract(cfg, backbone=tiny_bert(minilm_tokenizer), progress=False).key
    narrow_cache = open_cache(cfg.cache_root, key)

    def batches(widen):
        loader = CacheLoader(
            narrow_cache, "train", {"enc": [0, 2]}, batch_size=8, shuffle=True, widen=widen
        )
        return [to_torch(b) for b in loader.epoch(3)]

    narrow, wide = batches(False), batches(True)
    assert len(narrow) == len(wide) > 1
    for a, b in zip(narrow, wide, strict=True):
        assert torch.equal(a.index, b.index)
        for n in (0, 2):
            x, y = a.states["enc"][n], b.states["enc"][n]
            assert x.dtype == getattr(torch, dtype) and y.dtype == torch.float32
            assert torch.equal(x.float(), y)
            assert y.abs().sum() > 0
