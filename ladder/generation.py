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

Captioning with a T5 backbone (:func:`greedy_generate_t5`): the side network is a
``VisualT5SideNetwork`` (visual tokens in its encoder, frozen LM head). The backbone's encoder and
the side encoder run once. Each step feeds the token just chosen to the backbone's decoder with
its own KV cache (``Backbone.t5_decode_states``), appends the states at that position to the
prefix's (a causal decoder's earlier states do not change), runs the side decoder over the
prefix's states, and takes the argmax of the LM head at the last position alone: what teacher
forcing on the generated prefix computes. Only the side decoder, 1/r of the backbone's width, is
re-run over the prefix. A batch decodes in lockstep: every row's prefix has the same length, so
there is no padding; a row that has emitted EOS is done, the rest go on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ladder.backbones import Backbone
from ladder.causal import CausalSideNetwork, SideKVCache
from ladder.errors import LadderError
from ladder.vision import VisualT5SideNetwork


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


@torch.inference_mode()
def greedy_generate_t5(
    backbone: Backbone,
    net: VisualT5SideNetwork,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
) -> list[list[int]]:
    """Greedy captions of a batch (the tokens chosen per row, EOS excluded, at most
    ``max_new_tokens``). input_ids, attention_mask: the backbone encoder's input [B, T] (long,
    bool); visual: the visual tokens [B, T_v, d_v]."""
    if not isinstance(net, VisualT5SideNetwork):
        raise LadderError(
            f"greedy_generate_t5 needs a VisualT5SideNetwork; got {type(net).__name__}"
        )
    if not backbone.encoder_decoder:
        raise LadderError(
            f"greedy_generate_t5 needs a T5 backbone; {backbone.name!r} is {backbone.family}"
        )
    if max_new_tokens < 1:
        raise LadderError(f"max_new_tokens is {max_new_tokens}; allowed: at least 1")
    net.eval()
    device = backbone.device
    enc_layers, dec_layers = net.needed_layers("enc"), net.needed_layers("dec")
    ids, mask = input_ids.to(device), attention_mask.to(device)
    B = ids.shape[0]
    start = backbone.config.decoder_start_token_id or 0
    step = torch.full((B, 1), start, dtype=torch.long, device=device)  # [B, 1]: the new token
    enc, enc_hidden = backbone.t5_encode(ids, mask, enc_layers)  # once
    side_enc, side_mask = net.encode_visual(enc, mask, visual.to(device))  # once
    past, prefix = None, {n: [] for n in dec_layers}  # the decoder's states, step by step
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for _ in range(max_new_tokens):
        new, past = backbone.t5_decode_states(step, enc_hidden, mask, past, dec_layers)
        for n in dec_layers:
            prefix[n].append(new[n])
        dec = {n: torch.cat(prefix[n], 1) for n in dec_layers}  # [B, t, d] each
        logits, _ = net.decode(side_enc, side_mask, dec, last_only=True)  # [B, 1, V]
        nxt = logits[:, -1].argmax(-1)  # [B]
        for b, tok in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if tok == eos_token_id:
                done[b] = True
            else:
                out[b].append(tok)
        if bool(done.all()):
            break
        step = nxt[:, None]
    return out
