"""Greedy T5 captioning: the KV-cached decoding against re-running the decoders over the prefix.

    python -m bench.t5_generation --json bench/results/t5_generation.json

``ladder.generation.greedy_generate_t5`` (the backbone's encoder and the side encoder once, the
backbone's decoder and the side decoder each on its KV cache, the LM head at the new position)
is timed side by side with the loops it replaced, built here from the product's calls:
``backbone_kv``, the backbone's decoder on its KV cache but the side decoder re-run over the
whole prefix's states every step (what greedy_generate_t5 did before the side decoder had a
cache); ``recompute``, every step ``Backbone.states`` over the whole decoder prefix (encoder and
decoder again) and the side network's ``decode`` over it with the LM head on every position.
All three must choose the same tokens. No pretrained T5 works offline, so the backbone is
t5-small's shape (d 512, 6 + 6 blocks, 8 heads, d_ff 2048) with random weights and the MiniLM
tokenizer, the side network r = 8 with 17 visual tokens of width 192 (easy-VQA's 4x4-pooled
random-vit); one thread, batch 8, the captioning prompt, no EOS (every caption runs to the token
budget).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import parser, table, write_json


def uncached_generate(
    backbone: Any,
    net: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    visual: torch.Tensor,
    max_new_tokens: int,
    backbone_kv: bool,
) -> list[list[int]]:
    """Greedy decoding (no EOS) with the side decoder re-run over the whole prefix each step and
    the LM head read at its last position. ``backbone_kv``: the backbone's encoder and the side
    encoder once, the backbone decoder on its KV cache, the new position's states appended to
    the prefix's; else every step teacher-forces the backbone (encoder and decoder) and the
    side network on the whole prefix."""
    enc_layers, dec_layers = net.needed_layers("enc"), net.needed_layers("dec")
    start = backbone.config.decoder_start_token_id or 0
    prefix = torch.full((ids.shape[0], 1), start, dtype=torch.long)
    with torch.inference_mode():
        if backbone_kv:
            enc, hidden = backbone.t5_encode(ids, mask, enc_layers)
            side_enc, side_mask = net.encode_visual(enc, mask, visual)
            past, states = None, {n: [] for n in dec_layers}
        for _ in range(max_new_tokens):
            if backbone_kv:
                new, past = backbone.t5_decode_states(
                    prefix[:, -1:], hidden, mask, past, dec_layers
                )
                for n in dec_layers:
                    states[n].append(new[n])
                dec = {n: torch.cat(states[n], 1) for n in dec_layers}
            else:
                layers = sorted(set(enc_layers) | set(dec_layers))
                full = backbone.states(ids, mask, decoder_inputs={"dec": prefix}, layers=layers)
                enc = {n: full["enc"][n] for n in enc_layers}
                side_enc, side_mask = net.encode_visual(enc, mask, visual)
                dec = {n: full["dec"][n] for n in dec_layers}
            # the LM head: at the last position (as the product before), else on every one
            logits, _ = net.decode(side_enc, side_mask, dec, last_only=backbone_kv)
            prefix = torch.cat([prefix, logits[:, -1].argmax(-1)[:, None]], 1)
    return prefix[:, 1:].tolist()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", default="10,20,40", help="caption lengths (tokens), comma-separated")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (the fastest kept)")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.repeats = "10,20", 1

    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from ladder.backbones import from_model, packaged_minilm
    from ladder.generation import greedy_generate_t5
    from ladder.side import SideConfig
    from ladder.vision import build_visual_side_network
    from stages.tasks import CAPTION_PROMPT

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(packaged_minilm())
    cfg = T5Config(
        vocab_size=tok.vocab_size,
        d_model=512,
        d_kv=64,
        num_heads=8,
        d_ff=2048,
        num_layers=6,
        num_decoder_layers=6,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
    )
    backbone = from_model("t5-small-shape", "", T5ForConditionalGeneration(cfg).eval(), tok)
    lm_head = backbone.frozen_tensors(lm_head=True)["lm_head"]
    net = build_visual_side_network(cfg, SideConfig(reduction_factor=8), 192, lm_head=lm_head)
    net.eval()
    B = args.batch_size
    ids = torch.tensor([tok(CAPTION_PROMPT)["input_ids"]] * B)
    mask = torch.ones_like(ids, dtype=torch.bool)
    visual = torch.randn(B, 17, 192)

    def cached(n: int) -> list[list[int]]:
        return greedy_generate_t5(backbone, net, ids, mask, visual, n, eos_token_id=-1)

    def recomputed(n: int) -> list[list[int]]:
        return uncached_generate(backbone, net, ids, mask, visual, n, backbone_kv=False)

    def backbone_kv(n: int) -> list[list[int]]:
        return uncached_generate(backbone, net, ids, mask, visual, n, backbone_kv=True)

    rows = []
    arms = (("kv_cache", cached), ("backbone_kv", backbone_kv), ("recompute", recomputed))
    for n in (int(t) for t in args.tokens.split(",")):
        seconds, outputs = {}, {}
        for name, fn in arms:
            fn(2)  # warm
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                outputs[name] = fn(n)
                times.append(time.perf_counter() - t0)
            seconds[name] = min(times)
        if not outputs["kv_cache"] == outputs["backbone_kv"] == outputs["recompute"]:
            raise SystemExit(f"{n} tokens: the decodings chose different tokens")
        rows.append(
            {
                "tokens": n,
                "batch": B,
                "kv_cache_s": seconds["kv_cache"],
                "backbone_kv_s": seconds["backbone_kv"],
                "recompute_s": seconds["recompute"],
                "speedup": seconds["recompute"] / seconds["kv_cache"],
                "speedup_over_backbone_kv": seconds["backbone_kv"] / seconds["kv_cache"],
                "same_tokens": True,
            }
        )
    print(
        table(
            [
                "caption tokens",
                "batch",
                "both KV caches s",
                "backbone KV only s",
                "recompute s",
                "backbone KV only / both",
                "recompute / both",
            ],
            [
                [
                    r["tokens"],
                    r["batch"],
                    f"{r['kv_cache_s']:.2f}",
                    f"{r['backbone_kv_s']:.2f}",
                    f"{r['recompute_s']:.2f}",
                    f"{r['speedup_over_backbone_kv']:.2f}x",
                    f"{r['speedup']:.1f}x",
                ]
                for r in rows
            ],
        )  # fmt: skip
    )
    print("same tokens chosen by all three: yes")
    write_json(
        args.json, "t5_generation", {"model": "t5-small shape, random weights", "rows": rows}
    )


if __name__ == "__main__":
    main()
