"""Greedy generation with a live causal backbone and a side network with the frozen LM head.

Each step feeds the new token(s) to the backbone with its own KV cache (``past_key_values``),
reads the states the side network needs at those positions (``Backbone.decode_states``), and runs
the side network on them alone against its own cache (``CausalSideNetwork.decode``: per kept
block the keys and values, rotary at the positions after the cached ones). The first step is the
whole prompt; every later one is the token just chosen. It stops at the end-of-sequence token or
after ``max_new_tokens``.

    tokens = greedy_generate(backbone, net, prompt_ids, max_new_tokens=16)

One sequence at a time: with no padding, every position is the one stage one saw in the cache
(right padding would put a prompt's answer at other positions than a longer prompt's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ladder.backbones import Backbone
from ladder.causal import CausalSideNetwork, SideKVCache
from ladder.errors import LadderError


@torch.inference_mode()
def greedy_generate(
    backbone: Backbone,
    net: CausalSideNetwork,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[int]:
    """The greedy continuation of ``prompt_ids`` (the tokens chosen, EOS excluded)."""
    if not getattr(net, "lm", False):
        raise LadderError("greedy_generate needs a side network with head 'lm'")
    if not prompt_ids:
        raise LadderError("greedy_generate got an empty prompt; allowed: at least one token")
    eos = backbone.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    net.eval()
    layers = net.needed_layers()
    device = backbone.device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # [1, T]
    past, cache, out = None, SideKVCache(), []
    for _ in range(max_new_tokens):
        states, past = backbone.decode_states(ids, past, layers)
        logits = net.decode(states, cache)  # [1, T_new, V]
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        ids = torch.tensor([[nxt]], dtype=torch.long, device=device)
    return out
