"""Captioning (``coco-caption``) with a T5 backbone and visual tokens: stage one stores one
training example per caption and one example per image (with its references) for validation and
test; train-side trains on the teacher-forced caption loss and validates on it; greedy generation
runs the live backbone's encoder once and its decoder with its KV cache; ``pipeline evaluate`` scores CIDEr.

A tiny random T5 (the MiniLM tokenizer: EOS is [SEP]) and a tiny random CLIP, on a small
Karpathy-format ``dataset_coco.json`` written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_store import layout
from cache_store.reader import open_cache
from ladder.errors import LadderError
from ladder.generation import beam_generate_t5, greedy_generate_t5
from ladder.vision import VisualT5SideNetwork
from pipeline.config import apply_overrides
from stages.errors import StageError
from stages.extract import extract
from stages.tasks import CAPTION_PROMPT, check_trainable, get_task, load_task_of
from stages.tokens import end_token_id, pad
from tests.conftest import tiny_bert, tiny_t5
from tests.test_vl import tiny_clip, vl_config
from tests.test_vl_data import dump, png

WORDS = ["red", "green", "blue", "square", "box", "small", "large", "on", "white", "a"]


def write_captions(folder: Path, n_train: int = 4, n_val: int = 2, n_test: int = 3) -> Path:
    """Karpathy's ``dataset_coco.json`` (train, restval, val, test images; 3 captions each,
    except the first test image: 2) and the images under ``images/<filepath>/``."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = ["train"] * (n_train - 1) + ["restval"] + ["val"] * n_val + ["test"] * n_test
    images = []
    for i, split in enumerate(splits):
        fp = "train2014" if split == "train" else "val2014"
        fn = f"COCO_{fp}_{i:012d}.jpg"
        png(folder / "images" / fp / fn, i)
        n_caps = 2 if i == n_train + n_val else 3
        sents = [
            {"raw": " ".join(WORDS[(i + k + j) % len(WORDS)] for j in range(3 + k)) + " .",
             "tokens": [], "imgid": i, "sentid": 10 * i + k}
            for k in range(n_caps)
        ]  # fmt: skip
        images.append({"filepath": fp, "filename": fn, "split": split, "cocoid": i, "imgid": i,
                       "sentences": sents, "sentids": [s["sentid"] for s in sents]})  # fmt: skip
    dump(folder / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return folder


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory, minilm_tokenizer):
    """A float32 coco-caption cache of a tiny T5 and a tiny CLIP, and a 2-epoch run on it."""
    from stages.train_side import train_side

    tmp = tmp_path_factory.mktemp("caption")
    coco = write_captions(tmp / "coco")
    backbone, vision = tiny_t5(minilm_tokenizer), tiny_clip()
    cfg = vl_config(
        tmp,
        coco,
        **{
            "task.name": "coco-caption",
            "backbone.name": "tiny-t5",
            "backbone.vision": "tiny-clip",
            "cache.dtype": "float32",
        },
    )
    cfg = apply_overrides(
        cfg,
        {
            "train_side.epochs": 2,
            "train_side.batch_size": 4,
            "train_side.warmup_steps": 1,
            "train_side.reduction_factors": [4],
            "train_side.learning_rates": [0.003],
            "train_side.init": "random",
        },
    )
    ext = extract(cfg, backbone=backbone, vision=vision, progress=False)
    res = train_side(cfg, run_name="cap", progress=False, echo=False)
    return cfg, backbone, vision, ext, res


@pytest.fixture
def predictor(caption_run, monkeypatch):
    """``Predictor`` on the run, with the tiny backbone and vision encoder (no download)."""
    import stages.evaluate
    from stages.evaluate import Predictor

    _, backbone, vision, _, res = caption_run
    monkeypatch.setattr(stages.evaluate, "load_backbone", lambda *a, **k: backbone)
    monkeypatch.setattr(stages.evaluate, "load_vision_encoder", lambda *a, **k: vision)
    return Predictor(res.folder)


def test_extraction_one_training_example_per_caption_references_per_image(caption_run):
    cfg, backbone, _, ext, _ = caption_run
    data = load_task_of(cfg.task)
    # train: 4 images x 3 captions; validation, test: one example per image
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [12, 2, 3]
    ref = json.loads((Path(cfg.task.data_dir) / "dataset_coco.json").read_text())["images"]
    test = data.splits["test"]
    assert [ex.references for ex in test] == [
        tuple(s["raw"] for s in im["sentences"]) for im in ref[6:9]
    ]
    assert len(test[0].references) == 2 and test[0].answer == test[0].references[0]
    assert [ex.answer for ex in data.splits["train"][:3]] == [s["raw"] for s in ref[0]["sentences"]]
    assert all(ex.references == () and ex.texts == () for ex in data.splits["train"])

    m = ext.manifest
    assert m["key_inputs"]["template"] == "t5-caption-v1"
    assert m["key_inputs"]["task"]["prompt"] == CAPTION_PROMPT
    assert m["task"]["candidates"] is None and "lm_head" in m["frozen"]
    assert {s: m["splits"][s]["n_examples"] for s in m["splits"]} == {
        "train": 12,
        "validation": 2,
        "test": 3,
    }
    cache = open_cache(cfg.cache.resolved_root, ext.key)
    tok = backbone.tokenizer
    for split in ("train", "test"):
        assert set(m["splits"][split]["streams"]) == {"enc", "dec"}  # no candidate streams
        offsets = np.asarray(cache.array(layout.offsets_path(split, "dec"))[...])
        targets = np.asarray(cache.array(layout.target_ids_path(split, "dec"))[...])
        enc_ids = np.asarray(cache.array(layout.input_ids_path(split, "enc"))[...])
        prompt = tok(CAPTION_PROMPT)["input_ids"]
        assert enc_ids.tolist() == prompt * len(data.splits[split])  # the prompt alone
        for n, ex in enumerate(data.splits[split]):
            # the decoder's target: the caption (test: the image's first reference), with EOS
            got = targets[offsets[n] : offsets[n + 1]].tolist()
            assert got == tok(ex.answer)["input_ids"] and got[-1] == end_token_id(tok)
        # the decoder states are the backbone decoder's under teacher forcing on that caption
        ex = data.splits[split][1]
        dec_in = torch.tensor([[backbone.config.decoder_start_token_id, *got_of(tok, ex)[:-1]]])
        ids = torch.tensor([prompt])
        live = backbone.states(ids, torch.ones_like(ids, dtype=torch.bool), decoder_inputs={
            "dec": dec_in})["dec"][2][0]  # fmt: skip
        stored = np.asarray(cache.array(layout.state_path(split, "dec", 2))[...])
        torch.testing.assert_close(torch.from_numpy(stored[offsets[1] : offsets[2]]), live)


def got_of(tok, ex) -> list[int]:
    return tok(ex.answer)["input_ids"]


def test_captioning_needs_t5_and_images():
    spec = get_task("coco-caption")
    assert spec.captioning and not spec.is_regression
    check_trainable(spec, "t5", True)
    with pytest.raises(StageError, match=r"captioning \('coco-caption'\) needs a T5 backbone"):
        check_trainable(spec, "bert", True)
    with pytest.raises(StageError, match="needs image features"):
        check_trainable(spec, "t5", False)


def test_train_side_refuses_a_caption_cache_of_the_old_template(caption_run, monkeypatch):
    import copy

    import stages.train_side
    from stages.train_side import resolve_cache, train_side

    cfg, _, _, ext, _ = caption_run
    cache = copy.copy(resolve_cache(cfg, ext.key))
    cache.manifest = copy.deepcopy(cache.manifest)
    cache.manifest["key_inputs"]["template"] = "t5-prefix-v1"  # the caption was the input
    monkeypatch.setattr(stages.train_side, "resolve_cache", lambda *a, **k: cache)
    with pytest.raises(StageError, match="template t5-prefix-v1 .* run `pipeline run extract`"):
        train_side(cfg, run_name="old", progress=False, echo=False)


def test_train_side_records_the_validation_caption_loss(caption_run, predictor):
    from stages.tasks import TaskData
    from stages.tokens import tokenize_split

    cfg, backbone, _, _, res = caption_run
    assert res.metrics["metric"] == "cider" and res.metrics["score"] == "-caption_loss"
    (name,) = res.metrics["networks"]
    net = res.metrics["networks"][name]
    losses = [h["validation"]["caption_loss"] for h in net["epochs"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(h["validation"]["score"] == -h["validation"]["caption_loss"] for h in net["epochs"])
    assert net["best_epoch"] == 1 + int(np.argmin(losses))  # lower loss is better
    assert np.isfinite(net["test"]["caption_loss"])
    # the kept checkpoint's validation loss, recomputed with the live backbone: mean token
    # cross-entropy on each image's first reference
    p = predictor
    assert isinstance(p.net, VisualT5SideNetwork)
    data = load_task_of(cfg.task)
    examples = data.splits["validation"]
    streams = tokenize_split(backbone, TaskData(data.spec, {"v": examples}, ""), "v", 64)
    enc_ids, enc_mask = pad(streams["enc"].ids, 0)
    dec_ids, _ = pad(streams["dec"].ids, 0)
    labels, _ = pad(streams["dec"].targets, -100)
    from stages.evaluate import split_tokens

    visual = torch.from_numpy(split_tokens(p, data, "validation")(np.arange(len(examples))))
    states = backbone.states(enc_ids, enc_mask, decoder_inputs={"dec": dec_ids})
    logits = _caption_logits(p.net, states, enc_mask, visual)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert float(want) == pytest.approx(losses[net["best_epoch"] - 1], rel=1e-5)


def test_caption_cache_and_online_follow_the_same_trajectory(caption_run, capsys):
    """Online LST (the live backbone's encoder and decoder states on the batch's ids) trains
    and validates as the cache does."""
    from stages.train_side import train_side

    cfg, backbone, _, _, cached = caption_run
    online = train_side(
        cfg, run_name="online", online=backbone, online_dropout=False, progress=False, echo=True
    )
    lines = capsys.readouterr().err.splitlines()  # the epoch lines show the caption loss
    assert len(lines) == 2 and all("val caption loss" in x and "(best" in x for x in lines)
    (name,) = cached.metrics["networks"]
    c, o = cached.metrics["networks"][name], online.metrics["networks"][name]
    for key in ("train_loss", "validation"):
        want = [h[key] if key == "train_loss" else h[key]["caption_loss"] for h in c["epochs"]]
        got = [h[key] if key == "train_loss" else h[key]["caption_loss"] for h in o["epochs"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)


@torch.no_grad()
def _caption_logits(net, states, mask, visual) -> torch.Tensor:
    """The side network's caption logits under teacher forcing on the backbone's ``states``."""
    logits, _ = net(
        {n: states["enc"][n] for n in net.needed_layers("enc")},
        mask,
        {n: states["dec"][n] for n in net.needed_layers("dec")},
        visual=visual,
    )
    return logits


def _prompt_batch(backbone, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([backbone.tokenizer(CAPTION_PROMPT)["input_ids"]] * n)
    return ids, torch.ones_like(ids, dtype=torch.bool)


def test_greedy_generation_is_the_argmax_of_teacher_forcing_on_its_own_output(
    caption_run, predictor
):
    from stages.evaluate import split_tokens

    cfg, backbone, _, _, _ = caption_run
    p = predictor
    data = load_task_of(cfg.task)
    visual = torch.from_numpy(split_tokens(p, data, "test")(np.arange(3)))
    ids, mask = _prompt_batch(backbone, 3)
    free = greedy_generate_t5(backbone, p.net, ids, mask, visual, 6, eos_token_id=-1)
    assert [len(g) for g in free] == [6, 6, 6]  # never EOS: max_new_tokens
    # teacher forcing on its own output: the argmax at every position is the token it chose
    start = backbone.config.decoder_start_token_id
    dec_in = torch.tensor([[start, *g[:-1]] for g in free])
    states = backbone.states(ids, mask, decoder_inputs={"dec": dec_in})
    logits = _caption_logits(p.net, states, mask, visual)
    assert logits.argmax(-1).tolist() == free
    # the image matters: other images, other scores for the same captions (a tiny network may
    # still pick the same words for every image, so the logits are compared, not the argmax)
    other = _caption_logits(p.net, states, mask, visual.roll(1, 0))
    assert (other - logits).abs().amax(-1).min() > 1e-4
    # EOS: a token it emits at step 3 of row 0, as EOS, ends each row before its first use
    eos = free[0][2]
    stopped = greedy_generate_t5(backbone, p.net, ids, mask, visual, 6, eos_token_id=eos)
    assert stopped == [g[: g.index(eos)] if eos in g else g for g in free]
    assert len(stopped[0]) <= 2
    # one row alone decodes as in the batch (lockstep: no padding)
    one = greedy_generate_t5(backbone, p.net, ids[1:2], mask[1:2], visual[1:2], 6, -1)
    assert one == free[1:2]


def _teacher_forced_score(backbone, net, ids, mask, visual, tokens, eos, max_new) -> float:
    """One row's summed log-probability of ``tokens`` (and EOS, when it ended before
    ``max_new``) under teacher forcing, over its length: what beam search ranks."""
    full = tokens + [eos] if len(tokens) < max_new else tokens
    dec_in = torch.tensor([[backbone.config.decoder_start_token_id, *full[:-1]]])
    states = backbone.states(ids, mask, decoder_inputs={"dec": dec_in})
    logp = torch.log_softmax(_caption_logits(net, states, mask, visual).float(), -1)[0]
    return float(logp[torch.arange(len(full)), torch.tensor(full)].sum()) / len(full)


def test_beam_search_ranks_teacher_forced_scores_and_one_beam_is_greedy(caption_run, predictor):
    """Beam search on the KV cache: every returned caption's score is its teacher-forced
    log-probability over its length (the cache and the prefix's states followed the beams),
    one beam is greedy decoding, more beams never score below it here, with and without EOS."""
    from stages.evaluate import split_tokens

    cfg, backbone, _, _, _ = caption_run
    p = predictor
    visual = torch.from_numpy(split_tokens(p, load_task_of(cfg.task), "test")(np.arange(3)))
    ids, mask = _prompt_batch(backbone, 3)
    free = greedy_generate_t5(backbone, p.net, ids, mask, visual, 6, eos_token_id=-1)
    for eos in (-1, free[0][2]):
        greedy = greedy_generate_t5(backbone, p.net, ids, mask, visual, 6, eos)
        one = beam_generate_t5(backbone, p.net, ids, mask, visual, 6, eos, num_beams=1)
        assert [t for t, _ in one] == greedy
        beams = beam_generate_t5(backbone, p.net, ids, mask, visual, 6, eos, num_beams=4)
        for got in (one, beams):
            for b, (tokens, score) in enumerate(got):
                row = slice(b, b + 1)
                want = _teacher_forced_score(
                    backbone, p.net, ids[row], mask[row], visual[row], tokens, eos, 6
                )
                assert score == pytest.approx(want, abs=1e-5)
        assert all(s4 >= s1 - 1e-6 for (_, s4), (_, s1) in zip(beams, one, strict=True))
    with pytest.raises(LadderError, match="num_beams is 0; allowed: an int >= 1"):
        beam_generate_t5(backbone, p.net, ids, mask, visual, 6, -1, num_beams=0)


def test_evaluate_and_predict_decode_captions_with_beams(caption_run, predictor, capsys):
    """``--num-beams N``: ``pipeline evaluate`` scores (and ``caption_texts`` returns) the
    captions ``beam_generate_t5`` chooses; a count below 1 is one line, exit 2."""
    from pipeline.cli import run_cli
    from stages.evaluate import CAPTION_MAX_NEW_TOKENS, Predictor, caption_texts, split_tokens
    from stages.vl_metrics import cider

    cfg, backbone, _, _, res = caption_run
    data = load_task_of(cfg.task)
    examples = data.splits["test"]
    tokens = split_tokens(predictor, data, "test")
    tok, eos, n = backbone.tokenizer, end_token_id(backbone.tokenizer), CAPTION_MAX_NEW_TOKENS
    ids, mask = _prompt_batch(backbone, len(examples))
    visual = torch.from_numpy(tokens(np.arange(len(examples))))

    def beam_texts(net) -> list[str]:
        beams = beam_generate_t5(backbone, net, ids, mask, visual, n, eos, num_beams=3)
        return [tok.decode(t, skip_special_tokens=True).strip() for t, _ in beams]

    # the tiny trained network is so sure of its words that beams find its greedy captions:
    # seeded noise on its weights makes the two differ, so the beams are seen to be used
    p = Predictor(res.folder, num_beams=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in p.net.parameters():
            if w.numel() > 1:
                w.add_(torch.randn(w.shape, generator=g) * float(w.std()) * 3)
    want = beam_texts(p.net)
    greedy = greedy_generate_t5(backbone, p.net, ids, mask, visual, n, eos)
    assert want != [tok.decode(t, skip_special_tokens=True).strip() for t in greedy]
    assert caption_texts(p, examples, tokens) == want
    args = ["evaluate", "--run", str(res.folder), "--split", "test", "--json"]
    assert run_cli([*args, "--num-beams", "3"]) == 0  # the trained network's beams
    got = json.loads(capsys.readouterr().out)
    refs = {ex.image: list(ex.references) for ex in examples}
    captions = dict(zip([ex.image for ex in examples], beam_texts(predictor.net), strict=True))
    assert got["cider"] == pytest.approx(cider(refs, captions)["cider"], abs=1e-9)
    assert run_cli([*args, "--num-beams", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--num-beams 0; allowed: an int >= 1" in err


def test_incremental_t5_decoder_states_are_the_teacher_forced_ones(minilm_tokenizer):
    """``t5_decode_states``, one decoder token at a time on the decoder's KV cache after
    ``t5_encode``, gives every layer's states that teacher forcing on the whole decoder input
    gives (left-padded encoder rows included); a non-T5 backbone is one line."""
    backbone = tiny_t5(minilm_tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (3, 7), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False
    dec_in = torch.randint(1000, 2000, (3, 5), generator=g)
    layers = list(range(backbone.n_dec_layers + 1))
    full = backbone.states(ids, mask, decoder_inputs={"dec": dec_in}, layers=layers)
    enc, hidden = backbone.t5_encode(ids, mask, layers)
    for n in layers:
        torch.testing.assert_close(enc[n], full["enc"][n], rtol=0, atol=0)
    past, steps = None, []
    for t in range(dec_in.shape[1]):
        new, past = backbone.t5_decode_states(dec_in[:, t : t + 1], hidden, mask, past, layers)
        steps.append(new)
    for n in layers:
        got = torch.cat([s[n] for s in steps], 1)
        torch.testing.assert_close(got, full["dec"][n], rtol=0, atol=1e-5, msg=f"layer {n}")
    with pytest.raises(LadderError, match=r"t5_encode needs a T5 backbone; .* is bert$"):
        tiny_bert(minilm_tokenizer).t5_encode(ids, mask, [0])


def test_pipeline_evaluate_returns_cider_of_the_generated_captions(
    caption_run, predictor, capsys, tmp_path
):
    import shutil

    from pipeline.cli import run_cli
    from stages.evaluate import CAPTION_MAX_NEW_TOKENS, evaluate_split, split_tokens
    from stages.vl_metrics import cider

    cfg, backbone, _, _, res = caption_run
    # the captions generated here one image at a time (EOS or the token bound)
    p = predictor
    data = load_task_of(cfg.task)
    examples = data.splits["test"]
    tokens = split_tokens(p, data, "test")
    tok = backbone.tokenizer
    captions = {}
    for n, ex in enumerate(examples):
        ids, mask = _prompt_batch(backbone, 1)
        visual = torch.from_numpy(tokens(np.asarray([n])))
        (g,) = greedy_generate_t5(
            backbone, p.net, ids, mask, visual, CAPTION_MAX_NEW_TOKENS, end_token_id(tok)
        )
        assert len(g) <= CAPTION_MAX_NEW_TOKENS
        captions[ex.image] = tok.decode(g, skip_special_tokens=True).strip()
    # a copy of the data whose first test image also has its generated caption as a reference,
    # so that the figure is not 0 (a tiny network's captions match no real reference)
    copy = Path(shutil.copytree(cfg.task.data_dir, tmp_path / "coco"))
    ds = json.loads((copy / "dataset_coco.json").read_text())
    first = next(im for im in ds["images"] if im["split"] == "test")
    first["sentences"].append({"raw": captions[examples[0].image], "tokens": [], "imgid": 0})
    dump(copy / "dataset_coco.json", ds)
    args = ["evaluate", "--run", str(res.folder), "--split", "test", "--json"]
    assert run_cli([*args, "--data-dir", str(copy)]) == 0
    got = json.loads(capsys.readouterr().out)
    references = {ex.image: list(ex.references) for ex in examples}
    references[examples[0].image].append(captions[examples[0].image])
    want = cider(references, captions)
    assert got["split"] == "test" and got["cider"] > 0
    assert got["cider"] == pytest.approx(want["cider"], abs=1e-9)
    assert got["score"] == got["cider"]
    # on the run's own data: the same captions, scored against the original references
    assert run_cli(args) == 0
    want = cider({ex.image: list(ex.references) for ex in examples}, captions)
    assert json.loads(capsys.readouterr().out)["cider"] == pytest.approx(want["cider"], abs=1e-9)
    with pytest.raises(StageError, match="without reference captions"):
        evaluate_split(p, data, "train")
    # pipeline predict captions image files (the live vision encoder): the same captions
    path = tmp_path / "images.jsonl"
    path.write_text("".join(json.dumps({"image": data.images[ex.image]}) + "\n" for ex in examples))
    assert run_cli(["predict", "--run", str(res.folder), "--input", str(path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prediction"] for r in rows] == [captions[ex.image] for ex in examples]
