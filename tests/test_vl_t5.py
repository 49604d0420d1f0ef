"""Vision-and-language LST with a T5 backbone (the paper's CLIP-T5): the visual tokens go to the side
encoder only, before the text; the backbone's ladders reach the text positions only; the side
decoder cross-attends to both; no gradient reaches the frozen encoders; train-side's figures are
the checkpoint's on the cache; cache = online LST."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import T5Config

from ladder.attention import SideKVCache
from ladder.errors import LadderError
from ladder.side import SideConfig, T5SideNetwork
from ladder.vision import VisualT5SideNetwork, build_visual_side_network
from pipeline.config import apply_overrides
from stages.extract import extract
from stages.tasks import load_task_of
from stages.train_side import (
    Trial,
    backbone_config_of,
    build_trial,
    cached_outputs,
    cached_predictions,
    load_side_init,
    resolve_cache,
    task_spec_of,
    train_side,
)
from tests.conftest import tiny_t5
from tests.test_vl import tiny_clip, vl_config, write_vqa

D, V, DV = 32, 40, 24  # backbone width, vocabulary, vision width of the config-only networks


def _t5_cfg() -> T5Config:
    return T5Config(
        vocab_size=V, d_model=D, d_kv=8, num_heads=4, d_ff=64, num_layers=3, num_decoder_layers=2
    )


def _t5_net(visual_fusion: str = "ladder", fusion: str = "ladder", seed: int = 0):
    """A config-only VisualT5SideNetwork (3 encoder blocks, r = 4) and a batch for it: encoder
    states [2, 6, D] (the second example padded after 4 tokens), decoder states [2, 3, D],
    labels [2, 3] and 5 visual tokens [2, 5, DV]."""
    torch.manual_seed(seed)
    side = SideConfig(reduction_factor=4, fusion=fusion)
    net = build_visual_side_network(_t5_cfg(), side, DV, 1, visual_fusion, torch.randn(V, D))
    g = torch.Generator().manual_seed(1)
    enc = {n: torch.randn(2, 6, D, generator=g) for n in range(4)}
    dec = {n: torch.randn(2, 3, D, generator=g) for n in range(3)}
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    labels = torch.randint(0, V, (2, 3), generator=g)
    return net.eval(), enc, mask, dec, labels, torch.randn(2, 5, DV, generator=g)


def test_t5_visual_network_depends_on_the_image_and_no_gradient_reaches_the_encoders(
    tmp_path, minilm_tokenizer
):
    from PIL import Image

    vqa = write_vqa(tmp_path / "vqa", n_train=4, n_test=2, per_image=1)
    backbone, vision = tiny_t5(minilm_tokenizer), tiny_clip()
    data = load_task_of(vl_config(tmp_path, vqa).task)
    examples = data.splits["train"][:3]
    tok = backbone.tokenizer([ex.texts[0] for ex in examples], padding=True, return_tensors="pt")
    mask = tok["attention_mask"].bool()
    target = backbone.tokenizer(["3", "10", "7"], padding=True, return_tensors="pt")["input_ids"]
    start = torch.full((3, 1), backbone.config.decoder_start_token_id)
    dec_ids = torch.cat([start, target[:, :-1]], 1)  # shifted right
    states = backbone.states(
        tok["input_ids"], mask, decoder_inputs={"dec": dec_ids}, for_training=True
    )
    grid, _ = vision.features([Image.open(data.images[ex.image]) for ex in examples])
    lm_head = backbone.frozen_tensors()["lm_head"]
    torch.manual_seed(0)
    net = build_visual_side_network(
        backbone.config, SideConfig(reduction_factor=4), 32, lm_head=lm_head
    )
    assert isinstance(net, VisualT5SideNetwork)
    enc = {n: states["enc"][n] for n in net.needed_layers("enc")}
    dec = {n: states["dec"][n] for n in net.needed_layers("dec")}
    net.train()
    logits, loss = net(enc, mask, dec, None, target, visual=grid)
    assert logits.shape == (3, target.shape[1], backbone.config.vocab_size)
    loss.backward()
    for frozen in (backbone.model, vision.model):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    assert not grid.requires_grad and all(
        not h.requires_grad for h in [*enc.values(), *dec.values()]
    )
    assert not net.lm_head.requires_grad and net.lm_head.grad is None  # a buffer, from the cache
    assert net.visual_proj.weight.grad is not None and net.visual_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.enc.down.parameters())
    assert net.dec.block(0).ca.k.weight.grad.abs().sum() > 0
    # the image matters, in teacher forcing and in candidate scoring
    net.eval()
    labels = target[:, None].expand(3, 2, -1).clone()
    labels[:, 1] = target.flip(0)  # two candidates per example
    cand = {n: h[:, None].expand(3, 2, *h.shape[1:]) for n, h in dec.items()}
    with torch.no_grad():
        same, _ = net(enc, mask, dec, None, target, visual=grid)
        swapped, _ = net(enc, mask, dec, None, target, visual=grid.roll(1, 0))
        scores = net.score_candidates(enc, mask, cand, None, labels, visual=grid)
        other = net.score_candidates(enc, mask, cand, None, labels, visual=grid.roll(1, 0))
    # every example's outputs change with its image (the network is near its init: small changes)
    assert ((same - swapped).abs().amax((1, 2)) > 1e-6).all()
    assert ((scores - other).abs().amax(1) > 1e-6).all()
    # candidate 0 is the target: its score is the teacher-forced log-likelihood of the target
    logp = same.float().log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(scores[:, 0], logp.sum(-1))
    # without visual tokens (a text task of a multi-task run): the side network on the text alone
    with torch.no_grad():
        text_alone, _ = net(enc, mask, dec, None, target)
        plain, _ = T5SideNetwork.forward(net, enc, mask, dec, None, target)
    torch.testing.assert_close(text_alone, plain, rtol=0, atol=0)
    assert not torch.allclose(text_alone, same)
    with pytest.raises(LadderError, match=r"with visual tokens needs lm_head"):
        build_visual_side_network(backbone.config, SideConfig(reduction_factor=4), 32)


def _first_block_input(net, enc, mask, dec, visual):
    """The input of the side encoder's first block, its attention bias, and the side decoder's
    first block's encoder output and cross-attention bias."""
    seen = {}

    def enc_hook(module, args):
        seen["x"], seen["bias"] = args[0].clone(), args[1].clone()

    def dec_hook(module, args):
        seen["enc"], seen["ca_bias"] = args[2].clone(), args[3].clone()

    hooks = [
        net.enc.block(net.enc.kept[0]).register_forward_pre_hook(enc_hook),
        net.dec.block(net.dec.kept[0]).register_forward_pre_hook(dec_hook),
    ]
    with torch.no_grad():
        net(enc, mask, dec, visual=visual)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("fusion", ["ladder", "late"])
def test_the_t5_side_decoder_on_its_kv_cache_is_teacher_forcing(fusion):
    """The side decoder fed one or two new positions at a time against its KV cache gives the
    logits that teacher forcing on the whole prefix gives at those positions; after its rows are
    reordered (beam search), those of the reordered prefix; a cache with padding is one line."""
    net, enc, mask, dec, _, visual = _t5_net(fusion=fusion)
    g = torch.Generator().manual_seed(2)
    dec = {n: torch.randn(2, 5, D, generator=g) for n in dec}  # 5 decoder positions

    def part(states: dict, a: int, b: int) -> dict:
        return {n: x[:, a:b] for n, x in states.items()}

    with torch.no_grad():
        side_enc, side_mask = net.encode_visual(enc, mask, visual)
        full, _ = net.decode(side_enc, side_mask, dec)  # (2, 5, V)
        cache, got = SideKVCache(), []
        for a, b in ((0, 2), (2, 3), (3, 4)):
            logits, _ = net.decode(side_enc, side_mask, part(dec, a, b), cache=cache)
            got.append(logits)
        torch.testing.assert_close(torch.cat(got, 1), full[:, :4], rtol=0, atol=1e-5)
        assert cache.length == 4
        rows = torch.tensor([1, 0])
        cache.reorder(rows)
        swapped = {n: x[rows] for n, x in dec.items()}
        last, _ = net.decode(side_enc[rows], side_mask[rows], part(swapped, 4, 5), cache=cache)
        whole, _ = net.decode(side_enc[rows], side_mask[rows], swapped)
        torch.testing.assert_close(last[:, 0], whole[:, 4], rtol=0, atol=1e-5)
        pad = torch.ones(2, 1, dtype=torch.bool)
        with pytest.raises(LadderError, match="a side KV cache is for the decoder without padding"):
            net.decode(side_enc, side_mask, part(dec, 0, 1), pad, cache=SideKVCache())


def test_t5_visual_positions_are_not_laddered_and_the_decoder_reads_them():
    net, enc, mask, dec, _, visual = _t5_net()
    seen = _first_block_input(net, enc, mask, dec, visual)
    with torch.no_grad():
        projected = net.visual_tokens(visual, net.enc.drop)  # (2, 5, 8)
        s = net.enc
        laddered = s.before_block(s.side_input(enc), s.kept[0], enc)  # (2, 6, 8)
    assert seen["x"].shape == (2, 5 + 6, 8)
    torch.testing.assert_close(seen["x"][:, :5], projected, rtol=0, atol=0)  # the tokens alone
    torch.testing.assert_close(seen["x"][:, 5:], laddered, rtol=0, atol=0)  # text: laddered
    # one relative position bias over the 11 positions; every visual position is attended
    neg = torch.finfo(torch.float32).min
    assert seen["bias"].shape == (2, 4, 11, 11)
    torch.testing.assert_close(seen["bias"][0], s.position_bias(11, torch.device("cpu"))[0])
    assert (seen["bias"][1, :, :, 9:] == neg).all() and (seen["bias"][1, :, :, :9] > neg).all()
    # the side decoder cross-attends to the whole side encoder output: visual positions allowed
    assert seen["enc"].shape == (2, 11, 8)
    assert (seen["ca_bias"][1, ..., :9] == 0).all() and (seen["ca_bias"][1, ..., 9:] == neg).all()


def _enc_block_visual_inputs(net, enc, mask, dec, visual):
    seen = []
    hooks = [
        net.enc.block(i).register_forward_pre_hook(lambda m, a: seen.append(a[0][:, :5].clone()))
        for i in net.enc.kept
    ]
    with torch.no_grad():
        net(enc, mask, dec, visual=visual)
    for h in hooks:
        h.remove()
    return seen


def test_t5_visual_ladder_feeds_the_tokens_into_every_encoder_block():
    net, enc, mask, dec, labels, visual = _t5_net()
    assert net.visual_gates.shape == (2,)  # one per side encoder block after the first
    assert isinstance(net.visual_ln, type(net.enc.final_ln))  # the family's RMSNorm
    projected = _enc_block_visual_inputs(net, enc, mask, dec, visual)[0]
    with torch.no_grad():
        net.visual_gates.fill_(-100.0)  # g = 0: each block's visual positions are the tokens
    for later in _enc_block_visual_inputs(net, enc, mask, dec, visual)[1:]:
        torch.testing.assert_close(later, projected)
    # g = 1: the authors' once-at-the-input network (same seed: same weights, same logits)
    plain, *_ = _t5_net("input")
    assert plain.visual_gates is None
    with torch.no_grad():
        net.visual_gates.fill_(100.0)
        torch.testing.assert_close(
            net(enc, mask, dec, visual=visual)[0], plain(enc, mask, dec, visual=visual)[0]
        )
        net.visual_gates.zero_()
    net.train()
    net(enc, mask, dec, None, labels, visual=visual)[1].backward()
    assert net.visual_gates.grad is not None and net.visual_gates.grad.abs().min() > 0
    # the T5 part is T5SideNetwork's: a seed gives it the same weights, side init loads into it
    from ladder.side import T5SideNetwork

    torch.manual_seed(0)
    text = T5SideNetwork(_t5_cfg(), net.side, torch.randn(V, D))
    own = net.state_dict()
    assert all(torch.equal(own[k], w) for k, w in text.state_dict().items())
    net.load_side_init({"enc.0.sa.q.weight": torch.zeros_like(own["enc.0.sa.q.weight"])})
    assert net.enc.block(0).sa.q.weight.abs().sum() == 0


def test_t5_late_fusion_reaches_text_positions_only():
    net, enc, mask, dec, _, visual = _t5_net(fusion="late")
    with torch.no_grad():
        out, full = net.encode_visual(enc, mask, visual)
        enc2 = {**enc, 3: enc[3] * 2.0}  # state L: what late fusion reads
        out2, _ = net.encode_visual(enc2, mask, visual)
    assert full.shape == (2, 11) and full[:, :5].all()
    assert torch.equal(out[:, :5], out2[:, :5])  # the visual positions never see state L
    assert not torch.allclose(out[:, 5:], out2[:, 5:])


# --- train-side, evaluate, online LST --------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_vl(tmp_path_factory, minilm_tokenizer):
    """A float32 easy-VQA cache of a tiny T5 and a tiny CLIP (with magnitude side init at r = 4),
    and a 2-epoch cached run on it from that init."""
    tmp = tmp_path_factory.mktemp("t5vl")
    vqa = write_vqa(tmp / "vqa", n_train=10, n_test=3, per_image=3)
    backbone, vision = tiny_t5(minilm_tokenizer), tiny_clip()
    cfg = vl_config(
        tmp,
        vqa,
        **{
            "backbone.name": "tiny-t5",
            "backbone.vision": "tiny-clip",
            "cache.dtype": "float32",
            "extract.side_init": ["magnitude"],
            "extract.reduction_factors": [4],
        },
    )
    cfg = apply_overrides(
        cfg,
        {
            "train_side.epochs": 2,
            "train_side.batch_size": 8,
            "train_side.warmup_steps": 2,
            "train_side.reduction_factors": [4],
            "train_side.learning_rates": [0.003],
            "train_side.init": "magnitude",
        },
    )
    extract(cfg, backbone=backbone, vision=vision, progress=False)
    cached = train_side(cfg, run_name="cached", progress=False, echo=False)
    return cfg, backbone, vision, cached


def test_t5_vl_train_side_figures_are_the_checkpoints_on_the_cache(t5_vl):
    import numpy as np

    from stages.tasks import compute_metrics

    cfg, _, _, res = t5_vl
    (name,) = res.metrics["networks"]
    m = res.metrics["networks"][name]
    assert len(m["epochs"]) == 2
    saved = json.loads((res.folder / f"{name}.config.json").read_text())
    assert saved["visual"] == {"d": 32, "n_images": 1, "fusion": "ladder", "readout": "text"}
    weights = torch.load(res.folder / "checkpoints" / f"{name}.last.pt", weights_only=False)["net"]
    assert "visual_proj.weight" in weights and "enc.0.sa.q.weight" in weights
    assert "lm_head" not in weights  # frozen, from the cache
    # the T5 part started from the cache's pruned weights (the visual part from random)
    cache = resolve_cache(cfg, res.metrics["cache"])
    init = load_side_init(cache, 4, "magnitude")
    ts = build_trial(
        cfg, cache, backbone_config_of(cache), task_spec_of(cache), Trial(**saved["trial"]), 1
    )
    assert isinstance(ts.net, VisualT5SideNetwork)
    own = ts.net.state_dict()
    assert init and all(torch.equal(own[k], w) for k, w in init.items())
    outputs, spec, candidates = cached_outputs(cfg, res.folder, name, "test")
    assert candidates is not None and outputs.shape == (9, len(candidates))  # 13 answers
    preds = cached_predictions(cfg, res.folder, name, "test")
    y = np.asarray([ex.label for ex in load_task_of(cfg.task).splits["test"]])
    assert compute_metrics(spec, preds, y)["accuracy"] == m["test"]["accuracy"]


def test_t5_vl_cache_and_online_follow_the_same_trajectory(t5_vl):
    cfg, backbone, _, cached = t5_vl
    online = train_side(
        cfg, run_name="online", online=backbone, online_dropout=False, progress=False, echo=False
    )
    (name,) = cached.metrics["networks"]
    c, o = cached.metrics["networks"][name], online.metrics["networks"][name]
    c_loss = [h["train_loss"] for h in c["epochs"]]
    o_loss = [h["train_loss"] for h in o["epochs"]]
    torch.testing.assert_close(torch.tensor(c_loss), torch.tensor(o_loss), rtol=1e-5, atol=0)
    assert c["test"] == o["test"]


def test_t5_vl_evaluate_equals_train_sides_evaluation(t5_vl, capsys, monkeypatch):
    import stages.evaluate
    from pipeline.cli import run_cli

    cfg, backbone, vision, res = t5_vl
    monkeypatch.setattr(stages.evaluate, "load_backbone", lambda *a, **k: backbone)
    monkeypatch.setattr(stages.evaluate, "load_vision_encoder", lambda *a, **k: vision)
    (name,) = res.metrics["networks"]
    want = res.metrics["networks"][name]["test"]["accuracy"]
    assert run_cli(["evaluate", "--run", str(res.folder), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == want
    # predict on questions and image files: the best-scored candidate of train-side's scores
    outputs, spec, candidates = cached_outputs(cfg, res.folder, name, "test")
    data = load_task_of(cfg.task)
    rows = [{"question": ex.texts[0], "image": data.images[ex.image]} for ex in data.splits["test"]]
    path = res.folder.parent / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli(["predict", "--run", str(res.folder), "--input", str(path), "--json"]) == 0
    got = [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]
    assert got == [spec.labels[int(candidates[k])] for k in outputs.argmax(-1)]


def test_t5_two_images_are_told_apart():
    """NLVR2's two images per example: the shared image-index embedding works for T5 too."""
    torch.manual_seed(0)
    net = build_visual_side_network(
        _t5_cfg(), SideConfig(reduction_factor=4), DV, 2, "ladder", torch.randn(V, D)
    ).eval()
    _, enc, mask, dec, _, visual = _t5_net()  # 5 tokens per image, two images
    visual = torch.cat([visual, visual.roll(1, 0)], 1)  # (2, 10, DV)

    def swap(x):  # (2, 10, ...) -> the right image's 5 tokens first
        return torch.cat([x[:, 5:], x[:, :5]], 1)

    swapped = swap(visual)
    assert net.image_embed.weight.shape == (2, 8)
    with torch.no_grad():
        both, _ = net(enc, mask, dec, visual=visual)
        other, _ = net(enc, mask, dec, visual=swapped)
        assert not torch.allclose(both, other, rtol=0, atol=1e-9)  # left/right matter
        # the image-index embedding marks each image's tokens (T5's relative position bias
        # tells the two blocks apart too, by distance only)
        tokens = net.visual_tokens(visual, net.enc.drop)
        assert not torch.allclose(net.visual_tokens(swapped, net.enc.drop), swap(tokens))
        net.image_embed.weight.zero_()
        tokens = net.visual_tokens(visual, net.enc.drop)
        torch.testing.assert_close(net.visual_tokens(swapped, net.enc.drop), swap(tokens))
    with pytest.raises(LadderError, match="7 visual tokens for 2 images per example"):
        net(enc, mask, dec, visual=torch.zeros(2, 7, DV))


def test_a_t5_backbone_refuses_the_visual_readout():
    with pytest.raises(LadderError, match="^visual readout 'text\\+visual' with a T5 backbone"):
        build_visual_side_network(
            _t5_cfg(), SideConfig(reduction_factor=4), DV, 1, "ladder", torch.randn(V, D),
            visual_readout="text+visual",
        )  # fmt: skip


def test_t5_label_scoring_refuses_class_weights(t5_vl, tmp_path):
    from stages.errors import StageError

    cfg = apply_overrides(
        t5_vl[0],
        {"train_side.class_weight": "balanced", "train_side.run_dir": str(tmp_path / "runs")},
    )
    with pytest.raises(StageError, match="label strings scored by T5\\); allowed: 'none'"):
        train_side(cfg, run_name="weighed", progress=False, echo=False)
    assert not (tmp_path / "runs").exists()
