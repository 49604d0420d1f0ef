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
its own KV cache (``Backbone.t5_decode_states``), and the states at that position to the side
decoder with its own (``T5SideNetwork.decode(..., cache=)``: per kept block the self-attention's
keys and values of the prefix, and the cross-attention's over the side encoder's output,
computed at the first step), and takes the argmax of the LM head at that position: what teacher
forcing on the generated prefix computes, since a causal decoder's earlier positions do not
change. A batch decodes in lockstep: every row's prefix has the same length, so there is no
padding; a row that has emitted EOS is done, the rest go on.

Beam search (:func:`beam_generate_t5`, as VL-T5 evaluates captions): the same steps on
``num_beams`` rows per example, the backbone's and the side decoder's KV caches reordered to the
beams kept each step, and hypotheses ranked by their summed log-probability over the tokens
chosen (EOS included) divided by their number to the power ``length_penalty`` (transformers'
convention, its ``early_stopping=False`` stop). One beam is greedy decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ladder.attention import SideKVCache
from ladder.backbones import Backbone
from ladder.causal import CausalSideNetwork
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
    _check_t5(backbone, net, max_new_tokens)
    mask, enc_hidden, side_enc, side_mask = _encode_t5(
        backbone, net, input_ids, attention_mask, visual
    )
    dec_layers, B = net.needed_layers("dec"), mask.shape[0]
    step = _start_tokens(backbone, B)  # [B, 1]: the new token
    past, cache = None, SideKVCache()  # the backbone decoder's and the side decoder's
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for _ in range(max_new_tokens):
        new, past = backbone.t5_decode_states(step, enc_hidden, mask, past, dec_layers)
        logits, _ = net.decode(side_enc, side_mask, new, cache=cache)  # [B, 1, V]
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


def _encode_t5(
    backbone: Backbone,
    net: VisualT5SideNetwork,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every decoding step reads, computed once (``net`` set to eval): the encoder mask on
    the backbone's device, the backbone encoder's output, the side encoder's output and mask."""
    net.eval()
    device = backbone.device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    enc, enc_hidden = backbone.t5_encode(ids, mask, net.needed_layers("enc"))
    side_enc, side_mask = net.encode_visual(enc, mask, visual.to(device))
    return mask, enc_hidden, side_enc, side_mask


def _start_tokens(backbone: Backbone, rows: int) -> torch.Tensor:
    """The decoder's first input: its start token in each of ``rows`` rows, [rows, 1]."""
    start = backbone.config.decoder_start_token_id or 0
    return torch.full((rows, 1), start, dtype=torch.long, device=backbone.device)


def _check_t5(backbone: Backbone, net: VisualT5SideNetwork, max_new_tokens: int) -> None:
    if not isinstance(net, VisualT5SideNetwork):
        raise LadderError(f"T5 captioning needs a VisualT5SideNetwork; got {type(net).__name__}")
    if not backbone.encoder_decoder:
        raise LadderError(
            f"T5 captioning needs a T5 backbone; {backbone.name!r} is {backbone.family}"
        )
    if max_new_tokens < 1:
        raise LadderError(f"max_new_tokens is {max_new_tokens}; allowed: at least 1")


@torch.inference_mode()
def beam_generate_t5(
    backbone: Backbone,
    net: VisualT5SideNetwork,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    num_beams: int,
    length_penalty: float = 1.0,
) -> list[tuple[list[int], float]]:
    """Beam-searched captions of a batch: per row the best hypothesis (the tokens chosen, EOS
    excluded) and its score (summed log-probability, EOS included, over length **
    ``length_penalty``). Inputs as :func:`greedy_generate_t5`'s."""
    _check_t5(backbone, net, max_new_tokens)
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise LadderError(f"num_beams is {num_beams!r}; allowed: an int >= 1")
    K, device = num_beams, backbone.device
    encoded = _encode_t5(backbone, net, input_ids, attention_mask, visual)
    dec_layers, B = net.needed_layers("dec"), encoded[0].shape[0]
    # every example's K beams are K rows in a row: [B * K, ...]
    mask_k, enc_hidden, side_enc, side_mask = (x.repeat_interleave(K, 0) for x in encoded)
    step = _start_tokens(backbone, B * K)
    chosen = torch.zeros((B * K, 0), dtype=torch.long, device=device)  # each beam's tokens
    scores = torch.full((B, K), -math.inf, device=device)
    scores[:, 0] = 0.0  # the K beams start as one: the first step expands beam 0 alone
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    past, cache = None, SideKVCache()  # the backbone decoder's and the side decoder's
    for t in range(max_new_tokens):
        new, past = backbone.t5_decode_states(step, enc_hidden, mask_k, past, dec_layers)
        logits, _ = net.decode(side_enc, side_mask, new, cache=cache)  # [B*K, 1, V]
        logp = torch.log_softmax(logits[:, -1].float(), -1)  # [B*K, V]
        V = logp.shape[-1]
        top, flat = (scores.reshape(-1, 1) + logp).reshape(B, K * V).topk(2 * K, dim=1)
        keep_beam = torch.zeros((B, K), dtype=torch.long, device=device)
        keep_tok = torch.zeros((B, K), dtype=torch.long, device=device)
        kept = torch.full((B, K), -math.inf, device=device)
        for b in range(B):
            if done[b]:
                continue
            j = 0
            for s, f in zip(top[b].tolist(), flat[b].tolist(), strict=True):
                beam, tok = divmod(f, V)
                if tok == eos_token_id:  # a finished hypothesis: t + 1 tokens, EOS included
                    finished[b].append(
                        (s / (t + 1) ** length_penalty, chosen[b * K + beam].tolist())
                    )
                    continue
                keep_beam[b, j], keep_tok[b, j], kept[b, j] = beam, tok, s
                j += 1
                if j == K:
                    break
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
            # transformers' stop: K hypotheses, and the best running beam cannot beat the worst
            best_running = kept[b, 0].item() / (t + 1) ** length_penalty
            done[b] = len(finished[b]) == K and best_running <= finished[b][-1][0]
        if all(done):
            break
        rows = (torch.arange(B, device=device)[:, None] * K + keep_beam).reshape(-1)
        past.reorder_cache(rows)
        cache.reorder(rows)
        chosen = torch.cat([chosen[rows], keep_tok.reshape(-1, 1)], 1)
        scores, step = kept, keep_tok.reshape(-1, 1)
    out = []
    for b in range(B):
        if not done[b]:  # out of tokens: the running beams (max_new_tokens each) count too
            for k in range(K):
                if scores[b, k] > -math.inf:
                    score = scores[b, k].item() / max_new_tokens**length_penalty
                    finished[b].append((score, chosen[b * K + k].tolist()))
        score, tokens = max(finished[b], key=lambda h: h[0])
        out.append((tokens, score))
    return out
