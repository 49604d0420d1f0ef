"""Generation with decoder-only LLMs: the causal side network's frozen LM head, generation tasks
from JSONL files (prompt + answer), metrics from the cache, greedy decoding with both KV caches."""

from __future__ import annotations

import pytest
import torch

from ladder.causal import SideKVCache
from ladder.generation import greedy_generate
from ladder.side import SideConfig, build_side_network
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def llama_lm(minilm_tokenizer):
    return tiny_llama(minilm_tokenizer, lm_head=True)


def lm_net(backbone, r: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    side = SideConfig(reduction_factor=r, head="lm", dropout=0.0, **kw)
    return build_side_network(
        backbone.config, side, backbone.frozen_tensors(lm_head=True)["lm_head"]
    )


@torch.no_grad()
def test_incremental_decoding_equals_full_recompute(llama_lm):
    """Backbone KV cache + side KV cache, one token at a time, give the logits of a full pass."""
    bb = llama_lm
    net = lm_net(bb, kept_layers=(0, 1)).eval()
    for p in net.parameters():  # not the near-zero init: make every block matter
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else None
    torch.manual_seed(3)
    ids = torch.randint(1000, 2000, (1, 9))
    layers = net.needed_layers()
    full_states = bb.states(ids, torch.ones_like(ids), layers=layers)["enc"]
    full = net({n: full_states[n] for n in layers}, torch.ones_like(ids))  # (1, 9, V)
    past, cache, steps = None, SideKVCache(), []
    for chunk in (ids[:, :4], ids[:, 4:5], ids[:, 5:6], ids[:, 6:9]):
        states, past = bb.decode_states(chunk, past, layers)
        steps.append(net.decode(states, cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    # greedy generation: each chosen token is the argmax of a full recompute on the sequence so far
    prompt = ids[0, :5].tolist()
    got = greedy_generate(bb, net, prompt, max_new_tokens=6, eos_token_id=-1)
    seq = list(prompt)
    for _ in range(6):
        t = torch.tensor([seq])
        st = bb.states(t, torch.ones_like(t), layers=layers)["enc"]
        seq.append(int(net({n: st[n] for n in layers}, torch.ones_like(t))[0, -1].argmax()))
    assert got == seq[len(prompt) :]
