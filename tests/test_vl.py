"""Vision-and-language LST (easy-VQA): image features once per distinct image, text states that do
not depend on the images, no gradient into the frozen encoders, cache = online LST, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_store import layout
from cache_store.reader import open_cache, walk_arrays
from cache_store.registry import verify_cache
from pipeline.config import apply_overrides
from stages.errors import StageError
from stages.extract import extract
from stages.tasks import load_task_of
from stages.train_side import train_side
from stages.vqa import EASY_VQA_ANSWERS
from tests.conftest import assert_same_trajectories, make_config, tiny_bert

COLOURS = [(255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 0), (128, 128, 128)]


def write_vqa(folder: Path, n_train: int = 20, n_test: int = 4, per_image: int = 3) -> Path:
    """A tiny easy-VQA folder: answers.txt, {train,test}/questions.json and 64x64 PNGs."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "answers.txt").write_text("\n".join(EASY_VQA_ANSWERS) + "\n")
    shapes = ["circle", "rectangle", "triangle"]
    for split, n in (("train", n_train), ("test", n_test)):
        (folder / split / "images").mkdir(parents=True)
        rows = []
        for i in range(n):
            colour, shape = COLOURS[i % len(COLOURS)], shapes[i % 3]
            im = Image.new("RGB", (64, 64), (255, 255, 255))
            ImageDraw.Draw(im).rectangle([8 + i % 7, 8, 40 + i % 11, 48], fill=colour)
            im.save(folder / split / "images" / f"{i}.png")
            qs = [
                ("what shape is in the image?", shape),
                ("is there a red shape?", "yes" if colour == (255, 0, 0) else "no"),
                ("what color is the shape?", ["red", "green", "blue", "yellow", "gray"][i % 5]),
            ]
            rows += [[q, a, i] for q, a in qs[:per_image]]
        (folder / split / "questions.json").write_text(json.dumps(rows))
    return folder


def tiny_clip(seed: int = 0):
    """A tiny random CLIPVisionModel with a CLIP image processor at 32x32."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from ladder.vision import vision_from_model

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return vision_from_model("tiny-clip", CLIPVisionModel(cfg), processor)


def vl_config(tmp_path: Path, vqa: Path, **overrides):
    base = {
        "task.name": "easy-vqa",
        "task.data_dir": str(vqa),
        "task.limit": None,
        "backbone.name": "tiny-bert",
        "cache.dtype": "float32",
        "train_side.run_dir": str(tmp_path / "runs"),
    }
    return make_config(tmp_path, vqa, **{**base, **overrides})


def vl_training_config(tmp_path: Path, vqa: Path, **train_side):
    """:func:`vl_config` with tiny-clip images on a float32 cache, and a short stage two (2
    epochs, batch 8, r = 4, random init) with ``train_side`` keys on top."""
    cfg = vl_config(tmp_path, vqa, **{"cache.dtype": "float32", "backbone.vision": "tiny-clip"})
    short = {"epochs": 2, "batch_size": 8, "warmup_steps": 2, "reduction_factors": [4]}
    over = {**short, "init": "random", **train_side}
    return apply_overrides(cfg, {f"train_side.{k}": v for k, v in over.items()})


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> Path:
    return write_vqa(tmp_path_factory.mktemp("vqa"))


@pytest.fixture(scope="module")
def encoders(minilm_tokenizer):
    return tiny_bert(minilm_tokenizer), tiny_clip()


def test_the_splits_hold_out_whole_training_images(vqa, tmp_path):
    data = load_task_of(vl_config(tmp_path, vqa).task)
    images = {s: {ex.image for ex in v} for s, v in data.splits.items()}
    assert len(data.splits["train"]) == 54 and len(data.splits["validation"]) == 6
    assert not images["train"] & images["validation"]  # no validation image seen in training
    assert images["test"] == {f"test/{i}" for i in range(4)}
    assert set(data.images) == set().union(*images.values())


def test_image_features_are_stored_once_per_distinct_image(vqa, tmp_path, encoders, monkeypatch):
    from PIL import Image

    import stages.images

    backbone, vision = encoders
    monkeypatch.setattr(stages.images, "BATCH", 5)  # written 5 images at a time: 5 batches
    cfg = vl_config(tmp_path, vqa, **{"cache.dtype": "int8"})
    res = extract(cfg, backbone=backbone, vision=vision, progress=False)
    cache = open_cache(cfg.cache_root, res.key)
    m = cache.manifest
    n_questions = sum(s["n_examples"] for s in m["splits"].values())
    info = m["images"]
    assert info["n_images"] == 24 and n_questions == 72  # 20 train + 4 test images
    assert info["n_tokens"] == 17 and info["d"] == 32  # 4x4 patches + the class token
    grid = cache.array(layout.image_arrays("int8")["grid"])
    assert grid.shape == (24 * 17, 32)
    stored = grid.nbytes + cache.array("images/grid_scale").nbytes
    assert stored * n_questions // info["n_images"] == 3 * stored  # per question: 3x the bytes
    # each example's row holds the features of its own image
    data = load_task_of(cfg.task)
    index = np.asarray(cache.array(layout.image_index_path("test"))[...])
    for n in (0, 5, 11):
        ex = data.splits["test"][n]
        want, _ = vision.features([Image.open(data.images[ex.image])])
        codes = grid[index[n] * 17 : (index[n] + 1) * 17]
        scale = cache.array("images/grid_scale")[index[n] * 17 : (index[n] + 1) * 17]
        got = layout.decode_numpy(codes, scale, "int8")
        np.testing.assert_allclose(got, want[0].numpy(), atol=float(scale.max()))
    # every batch at its rows: the whole table equals the features computed in one piece
    whole, pooled, _ = stages.images.encode_images(vision, data)
    scale = cache.array("images/grid_scale")[...]
    got = layout.decode_numpy(grid[...], scale, "int8").reshape(whole.shape)
    np.testing.assert_allclose(got, whole, atol=float(scale.max()))
    stored_pooled = layout.decode_numpy(
        cache.array("images/pooled")[...], cache.array("images/pooled_scale")[...], "int8"
    )
    np.testing.assert_allclose(stored_pooled, pooled, atol=0.05 * float(np.abs(pooled).max()))
    # the layout names every array, the commit inventories them, verify reads them all
    found = {p for p, _ in walk_arrays(cache.group)}
    assert found == layout.expected_arrays(m) | (layout.optional_arrays(m) & found)
    assert set(m["inventory"]) == found
    assert verify_cache(cfg.cache_root, res.key)["ok"]
    # the key names the vision encoder, its weights and its preprocessing
    v = m["key_inputs"]["vision"]
    assert v["name"] == "tiny-clip" and v["weights"] and v["preprocessing"].startswith("CLIP")


def test_text_states_are_bit_identical_with_and_without_images(vqa, tmp_path, encoders):
    backbone, vision = encoders
    cfg = vl_config(tmp_path, vqa, **{"cache.dtype": "float16"})
    text = extract(cfg, backbone=backbone, progress=False)
    both = extract(cfg, backbone=backbone, vision=vision, progress=False)
    assert text.key != both.key
    a, b = open_cache(cfg.cache_root, text.key), open_cache(cfg.cache_root, both.key)
    assert "images" not in a.manifest and b.manifest["images"]["n_images"] == 24
    text_arrays = {p for p, _ in walk_arrays(a.group)}
    assert {p for p, _ in walk_arrays(b.group)} - text_arrays == set(
        layout.image_arrays("float16").values()
    ) | {layout.image_index_path(s) for s in ("train", "validation", "test")}
    for path in text_arrays:
        x, y = np.asarray(a.array(path)[...]), np.asarray(b.array(path)[...])
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), path


def test_no_gradient_reaches_the_vision_encoder_or_the_backbone(vqa, tmp_path, encoders):
    from PIL import Image

    from ladder.side import SideConfig
    from ladder.vision import build_visual_side_network

    backbone, vision = encoders
    data = load_task_of(vl_config(tmp_path, vqa).task)
    examples = data.splits["train"][:4]
    tok = backbone.tokenizer([ex.texts[0] for ex in examples], padding=True, return_tensors="pt")
    mask = tok["attention_mask"].bool()
    states = backbone.states(tok["input_ids"], mask, for_training=True)["enc"]
    grid, _ = vision.features([Image.open(data.images[ex.image]) for ex in examples])
    torch.manual_seed(0)
    net = build_visual_side_network(
        backbone.config, SideConfig(reduction_factor=4, num_labels=13), 32
    )
    hiddens = {n: states[n] for n in net.needed_layers()}
    logits = net(hiddens, mask, visual=grid)
    net.loss(logits, torch.tensor([ex.label for ex in examples])).backward()
    for frozen in (backbone.model, vision.model):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    assert not grid.requires_grad and all(not h.requires_grad for h in hiddens.values())
    assert net.visual_proj.weight.grad is not None and net.visual_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.down.parameters())
    # the visual tokens matter; the head reads the first text token, not an image token
    with torch.no_grad():
        other = net(hiddens, mask, visual=grid.flip(0))
    assert not torch.allclose(logits.detach(), other)


def test_cache_and_online_vl_lst_follow_the_same_trajectory(vqa, tmp_path, encoders):
    """float32 cache vs the live text backbone (dropout off), visual tokens from the cache in both."""
    backbone, vision = encoders
    cfg = vl_training_config(tmp_path, vqa)
    extract(cfg, backbone=backbone, vision=vision, progress=False)
    cached = train_side(cfg, run_name="cached", progress=False)
    online = train_side(
        cfg, run_name="online", online=backbone, online_dropout=False, progress=False
    )
    c, o = cached.metrics["networks"]["r4-s0-lr0.003"], online.metrics["networks"]["r4-s0-lr0.003"]
    c_loss = [h["train_loss"] for h in c["epochs"]]
    o_loss = [h["train_loss"] for h in o["epochs"]]
    assert len(c_loss) == 2
    torch.testing.assert_close(torch.tensor(c_loss), torch.tensor(o_loss), rtol=1e-5, atol=0)
    assert c["test"] == o["test"]
    last = torch.load(cached.folder / "checkpoints" / "r4-s0-lr0.003.last.pt", weights_only=False)[
        "net"
    ]
    assert "visual_proj.weight" in last  # the visual side network was trained
    # without --vision-encoder, the same cache trains the side network on the text alone
    one = apply_overrides(cfg, {"train_side.epochs": 1})
    no_vision = one.model_copy(
        update={"backbone": one.backbone.model_copy(update={"vision": None})}
    )
    text = train_side(no_vision, run_name="text", progress=False)
    t_loss = [h["train_loss"] for h in text.metrics["networks"]["r4-s0-lr0.003"]["epochs"]]
    assert len(t_loss) == 1 and t_loss[0] != c_loss[0]


def _one_line_exit_2(capsys, args, message):
    from pipeline.cli import run_cli

    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def _nothing_committed(root: Path) -> None:
    assert not list(root.glob("*/commit.json")) if root.exists() else True


@pytest.mark.parametrize(
    ("damage", "extra", "message"),
    [
        ("no-file", [], "names image 7, which has no file"),
        ("unreadable", [], "cannot be read as an image"),
        ("none", ["--vision-encoder", "minilm-l6"], "is a 'bert' model, not a vision encoder"),
        ("none", ["--task", "rte", "--data-dir", "GLUE"], "task 'rte' has no images"),
    ],
)
def test_bad_vl_input_is_one_line_exit_2_and_nothing_committed(
    tmp_path, capsys, glue_dir, damage, extra, message
):
    vqa = write_vqa(tmp_path / "vqa", n_train=10, n_test=2, per_image=2)
    if damage == "no-file":
        (vqa / "train" / "images" / "7.png").unlink()
    if damage == "unreadable":
        (vqa / "test" / "images" / "1.png").write_bytes(b"not a png at all")
    root = tmp_path / "cache"
    args = ["run", "extract", "--task", "easy-vqa", "--data-dir", str(vqa), "--json"]
    args += ["--cache-root", str(root), "--vision-encoder", "random-vit"]
    args += ["--side-init", "magnitude", "--side-init-factors", "4"]
    extra = [str(glue_dir) if a == "GLUE" else a for a in extra]
    _one_line_exit_2(capsys, [*args, *extra], message)
    _nothing_committed(root)


def test_a_missing_image_file_is_one_line_and_nothing_committed(vqa, tmp_path, encoders):
    backbone, vision = encoders
    cfg = vl_config(tmp_path, vqa)
    data = load_task_of(cfg.task)
    data.images["test/2"] = str(tmp_path / "gone.png")
    with pytest.raises(StageError, match=r"gone.png \(image 'test/2'\) is missing"):
        extract(cfg, backbone=backbone, data=data, vision=vision, progress=False)
    _nothing_committed(Path(cfg.cache_root))


def test_a_vl_run_on_a_text_only_cache_is_one_line_exit_2(vqa, tmp_path, capsys, encoders):
    backbone, _ = encoders
    cfg = vl_config(tmp_path, vqa)
    key = extract(cfg, backbone=backbone, progress=False).key
    args = ["run", "train-side", "--task", "easy-vqa", "--backbone", "tiny-bert"]
    args += ["--cache-root", cfg.cache_root, "--run-dir", str(tmp_path / "runs"), "--epochs", "1"]
    args += ["--vision-encoder", "tiny-clip", "--init", "random"]
    _one_line_exit_2(capsys, [*args, "--cache-key", key], "has no image features")
    _one_line_exit_2(capsys, args, "differs in vision encoder (None, asked 'tiny-clip')")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*/checkpoints"))


# --- several images per example (NLVR2): the image-index embedding ---------------------------------


def _visual_net(n_images: int, visual_fusion: str = "ladder", visual_readout: str = "text"):
    from transformers import BertConfig

    from ladder.side import SideConfig
    from ladder.vision import build_visual_side_network

    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    side = SideConfig(reduction_factor=4, num_labels=5)
    net = build_visual_side_network(
        cfg, side, 24, n_images, visual_fusion, visual_readout=visual_readout
    )
    g = torch.Generator().manual_seed(1)
    hiddens = {n: torch.randn(2, 6, 32, generator=g) for n in range(4)}
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return net.eval(), hiddens, mask, torch.randn(2, 5 * n_images, 24, generator=g)


def test_two_images_are_told_apart_and_one_image_is_unchanged():
    net, hiddens, mask, visual = _visual_net(2)
    with torch.no_grad():
        both = net(hiddens, mask, visual=visual)
        swapped = net(hiddens, mask, visual=torch.cat([visual[:, 5:], visual[:, :5]], 1))
    assert net.image_embed.weight.shape == (2, 8)
    assert not torch.allclose(both, swapped, rtol=0, atol=1e-9)  # left/right matter
    with torch.no_grad():  # without the embedding the side network is blind to the order
        net.image_embed.weight.zero_()
        torch.testing.assert_close(
            net(hiddens, mask, visual=visual),
            net(hiddens, mask, visual=torch.cat([visual[:, 5:], visual[:, :5]], 1)),
        )
    one, hiddens, mask, visual = _visual_net(1)
    # one image: no image-index parameter, so single-image checkpoints load as before
    assert not hasattr(one, "image_embed") and not any("image_embed" in k for k in one.state_dict())
    with pytest.raises(Exception, match="7 visual tokens for 2 images per example"):
        net(hiddens, mask, visual=torch.zeros(2, 7, 24))


def test_a_two_image_network_reads_one_image_batches_by_their_token_count():
    """With ``set_tokens_per_image`` a two-image network takes batches of one image (a one-image
    task in a list with NLVR2): those tokens get image index 0, as the first of two images'
    tokens do; a count that is no whole number of images, or more than two, is one line."""
    net, hiddens, mask, visual = _visual_net(2)
    with pytest.raises(Exception, match="5 visual tokens for 2 images per example"):
        net(hiddens, mask, visual=visual[:, :5])  # the default: every batch holds 2 images
    net.set_tokens_per_image(5)
    with torch.no_grad():
        first = net.visual_tokens(visual[:, :5], net.drop)  # (2, 5, 8)
        both = net.visual_tokens(visual, net.drop)  # (2, 10, 8)
        second_only = net.visual_tokens(visual[:, 5:], net.drop)
    torch.testing.assert_close(first, both[:, :5], rtol=0, atol=0)  # image 0's index
    assert not torch.allclose(second_only, both[:, 5:])  # image 1's index differs from image 0's
    with torch.no_grad():
        one = net(hiddens, mask, visual=visual[:, :5])
        two = net(hiddens, mask, visual=visual)
    assert one.shape == two.shape == (2, 5) and not torch.allclose(one, two)
    for bad in (7, 15):
        with pytest.raises(Exception, match=f"{bad} visual tokens per example; allowed: 1 to 2 "):
            net(hiddens, mask, visual=torch.zeros(2, bad, 24))


def _block_inputs(net, hiddens, mask, visual) -> list[torch.Tensor]:
    """The visual positions of each side block's input, in block order."""
    seen: list[torch.Tensor] = []
    hooks = [
        net.layers[str(i)].register_forward_pre_hook(lambda m, a: seen.append(a[0][:, :5].clone()))
        for i in net.kept
    ]
    with torch.no_grad():
        net(hiddens, mask, visual=visual)
    for h in hooks:
        h.remove()
    return seen


def test_the_visual_ladder_feeds_the_projected_tokens_into_every_block():
    net, hiddens, mask, visual = _visual_net(1)  # visual_fusion "ladder", the default
    assert net.visual_gates.shape == (len(net.kept) - 1,)  # one per block after the first
    projected = _block_inputs(net, hiddens, mask, visual)[0]  # block 0 reads the tokens as input
    with torch.no_grad():
        net.visual_gates.fill_(-100.0)  # g = 0: each block's visual positions are the tokens
    for later in _block_inputs(net, hiddens, mask, visual)[1:]:
        torch.testing.assert_close(later, projected)
    # g = 1: nothing fed in again, which is the authors' network (same seed, same weights)
    plain, *_ = _visual_net(1, "input")
    assert plain.visual_gates is None and not any("visual_gates" in k for k in plain.state_dict())
    with torch.no_grad():
        net.visual_gates.fill_(100.0)
        torch.testing.assert_close(
            net(hiddens, mask, visual=visual), plain(hiddens, mask, visual=visual)
        )
        net.visual_gates.zero_()  # the init: half the tokens, half the stream
    net.train()
    net(hiddens, mask, visual=visual).sum().backward()
    assert net.visual_gates.grad is not None and net.visual_gates.grad.abs().min() > 0
    with pytest.raises(Exception, match="visual fusion 'late'; allowed: 'ladder', 'input'"):
        _visual_net(1, "late")


# --- the text+visual readout: the head reads the visual positions too ----------------------------


def test_the_zero_initialised_readout_starts_as_the_text_readout():
    net, hiddens, mask, visual = _visual_net(1, visual_readout="text+visual")
    text = _visual_net(1)[0]
    extra = {k for k in net.state_dict() if k not in text.state_dict()}
    assert extra == {f"readout_{m}.{p}" for m in ("token", "out") for p in ("weight", "bias")}
    for k, v in text.state_dict().items():  # same seed: every other weight is the same
        assert torch.equal(net.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(
            net(hiddens, mask, visual=visual), text(hiddens, mask, visual=visual), rtol=0, atol=0
        )


def test_the_readout_gets_gradients():
    net, hiddens, mask, visual = _visual_net(1, visual_readout="text+visual")
    net.train()
    net(hiddens, mask, visual=visual).logsumexp(-1).sum().backward()
    assert net.readout_out.weight.grad.abs().sum() > 0  # the zero linear learns first ...
    net.zero_grad()
    with torch.no_grad():
        net.readout_out.weight.normal_(0, 0.1)  # ... then the token-wise linear behind it
    net(hiddens, mask, visual=visual).logsumexp(-1).sum().backward()
    assert net.readout_token.weight.grad.abs().sum() > 0
    assert net.readout_out.weight.grad.abs().sum() > 0


def test_a_visual_tokens_features_change_the_logits_through_the_readout():
    net, hiddens, mask, visual = _visual_net(1, visual_readout="text+visual")
    text = _visual_net(1)[0]
    with torch.no_grad():
        net.readout_out.weight.normal_(0, 0.1)
        moved = visual.clone()
        moved[:, 3] += 2.0 * torch.randn(24, generator=torch.Generator().manual_seed(2))

        def readout(v: torch.Tensor) -> torch.Tensor:  # (B, d/r): what the readout adds
            return net.pooled(hiddens, mask, visual=v) - text.pooled(hiddens, mask, visual=v)

        before, after = readout(visual), readout(moved)
        assert before.abs().max() > 0 and (after - before).abs().max() > 1e-3
        assert not torch.allclose(
            net(hiddens, mask, visual=moved), net(hiddens, mask, visual=visual)
        )
    with pytest.raises(
        Exception, match="visual readout 'visual'; allowed: 'text', 'text\\+visual'"
    ):
        _visual_net(1, visual_readout="visual")


def test_evaluate_rebuilds_the_saved_readout(vqa, tmp_path, encoders, monkeypatch, capsys):
    from ladder.vision import saved_visual_readout
    from pipeline.cli import run_cli
    from stages.train_side import cached_outputs

    cfg, res = train_vl_run(vqa, tmp_path, encoders, monkeypatch, visual_readout="text+visual")
    (name,) = res.metrics["networks"]
    saved = json.loads((res.folder / f"{name}.config.json").read_text())
    assert saved["visual"]["readout"] == "text+visual"
    outputs, _, _ = cached_outputs(cfg, res.folder, name, "test")
    # rebuilt as saved, not as asked
    ts = cfg.train_side.model_copy(update={"visual_readout": "text"})
    assert torch.equal(
        cached_outputs(cfg.model_copy(update={"train_side": ts}), res.folder, name, "test")[0],
        outputs,
    )
    want = res.metrics["networks"][name]["test"]["accuracy"]
    assert run_cli(["evaluate", "--run", str(res.folder), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == want
    # a config saved before the option (no "readout") rebuilds a "text" network: these weights
    # do not fit it
    assert saved_visual_readout({"d": 32, "n_images": 1}) == "text"
    del saved["visual"]["readout"]
    (res.folder / f"{name}.config.json").write_text(json.dumps(saved))
    with pytest.raises(StageError, match=r"does not fit .*unexpected readout_"):
        cached_outputs(cfg, res.folder, name, "test")


# --- evaluate and predict with the live encoders --------------------------------------------------


def train_vl_run(vqa, tmp_path, encoders, monkeypatch, **train_side_overrides):
    """Train a VL run (tiny BERT, tiny CLIP, float32 cache, 2 epochs); evaluate/predict load
    the same tiny encoders (they have no hub name)."""
    import stages.evaluate

    backbone, vision = encoders
    cfg = vl_config(tmp_path, vqa, **{"cache.dtype": "float32", "backbone.vision": "tiny-clip"})
    cfg = apply_overrides(
        cfg,
        {
            "train_side.epochs": 2,
            "train_side.batch_size": 6,
            "train_side.warmup_steps": 2,
            "train_side.reduction_factors": [4],
            "train_side.init": "random",
            "train_side.learning_rates": [0.01],
            **{f"train_side.{k}": v for k, v in train_side_overrides.items()},
        },
    )
    extract(cfg, backbone=backbone, vision=vision, progress=False)
    res = train_side(cfg, run_name="vl", progress=False, echo=False)
    monkeypatch.setattr(stages.evaluate, "load_backbone", lambda *a, **k: backbone)
    monkeypatch.setattr(stages.evaluate, "load_vision_encoder", lambda *a, **k: vision)
    return cfg, res


@pytest.fixture
def vl_run(vqa, tmp_path, encoders, monkeypatch):
    """A trained VL run (see :func:`train_vl_run`)."""
    return train_vl_run(vqa, tmp_path, encoders, monkeypatch)


def test_vl_evaluate_and_predict_equal_train_sides_evaluation(vl_run, vqa, tmp_path, capsys):
    import stages.evaluate
    from pipeline.cli import run_cli
    from stages.evaluate import Predictor, read_inputs
    from stages.train_side import cached_outputs

    cfg, res = vl_run
    (name,) = res.metrics["networks"]
    folder = str(res.folder)
    want = res.metrics["networks"][name]["test"]
    outputs, spec, _ = cached_outputs(cfg, res.folder, name, "test")
    saved = json.loads((res.folder / f"{name}.config.json").read_text())
    assert saved["visual"]["fusion"] == "ladder"  # the default, rebuilt as saved, not as asked:
    other = cfg.model_copy(
        update={"train_side": cfg.train_side.model_copy(update={"visual_fusion": "input"})}
    )
    assert torch.equal(cached_outputs(other, res.folder, name, "test")[0], outputs)
    # evaluate: the cache's image features (the vision encoder does not run) ...
    encoded = []
    real = stages.evaluate.encode_images
    stages.evaluate.encode_images = lambda *a: encoded.append(1) or real(*a)
    try:
        assert run_cli(["evaluate", "--run", folder, "--split", "test", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["accuracy"] == want["accuracy"]
        assert not encoded
        # ... and without the cache, the live vision encoder on the image files
        Path(cfg.cache_root).rename(tmp_path / "cache-moved")
        assert run_cli(["evaluate", "--run", folder, "--split", "test", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["accuracy"] == want["accuracy"]
        assert encoded == [1]
        (tmp_path / "cache-moved").rename(cfg.cache_root)
    finally:
        stages.evaluate.encode_images = real
    # predict on the user's own questions and image files: train-side's predictions
    data = load_task_of(cfg.task)
    test = data.splits["test"][:7]
    rows = [{"question": ex.texts[0], "image": data.images[ex.image]} for ex in test]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli(["predict", "--run", folder, "--input", str(path), "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [g["prediction"] for g in got] == [spec.labels[int(k)] for k in outputs[:7].argmax(-1)]
    probs = torch.softmax(outputs[:7], -1)
    for g, p in zip(got, probs, strict=True):
        assert [g["probabilities"][n] for n in spec.labels] == pytest.approx(p.tolist(), abs=1e-5)
    assert run_cli(["predict", "--run", folder, "--input", str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 8 and table[1].split()[1] == got[0]["prediction"]
    # two epochs on 54 questions give every question nearly the same answer distribution: the
    # logits' differences between questions are compared (the live backbone and vision encoder
    # against the cache's states and features), to 1/100 of their spread (they differ by ~1e-8)
    p = Predictor(folder)
    live = p.outputs(read_inputs(str(path), p.spec))
    spread = (outputs[:7] - outputs[:7].mean(0)).abs().max()
    assert spread > 0
    torch.testing.assert_close(
        live - live.mean(0), outputs[:7] - outputs[:7].mean(0), rtol=0, atol=float(spread) / 100
    )
    # weights that do not fit the network their config rebuilds are one line, not a partial load
    saved["visual"]["fusion"] = "input"  # a network without visual gates
    (res.folder / f"{name}.config.json").write_text(json.dumps(saved))
    with pytest.raises(StageError, match=r"does not fit .*unexpected visual_gates") as e:
        cached_outputs(cfg, res.folder, name, "test")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no-image", "questions.jsonl: row 2 has no 'image' (a file path); task 'easy-vqa' reads"),
        ("missing", "gone.png (image "),
        ("unreadable", "cannot be read as an image"),
        ("text", "task 'easy-vqa' reads images: give --input FILE"),
    ],
)
def test_bad_vl_predict_input_is_one_line_exit_2(vl_run, vqa, tmp_path, capsys, damage, message):
    folder = str(vl_run[1].folder)
    rows = [{"question": "what shape is in the image?", "image": str(vqa / "test/images/0.png")}]
    rows.append(dict(rows[0]))
    if damage == "no-image":
        del rows[1]["image"]
    if damage == "missing":
        rows[1]["image"] = str(tmp_path / "gone.png")
    if damage == "unreadable":
        (tmp_path / "bad.png").write_bytes(b"not a png")
        rows[1]["image"] = str(tmp_path / "bad.png")
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    args = ["predict", "--run", folder]
    args += ["what shape is in the image?"] if damage == "text" else ["--input", str(path)]
    _one_line_exit_2(capsys, args, message)


# --- pooled visual tokens (backbone.vision_pool) and the loader's data path -------------------------


def test_pool_grid_averages_patch_blocks_and_keeps_the_class_token():
    from ladder.errors import LadderError
    from ladder.vision import parse_pool, pool_grid

    grid = torch.randn(2, 1 + 8 * 8, 5)
    out = pool_grid(grid, 4)
    assert out.shape == (2, 1 + 16, 5)
    assert torch.equal(out[:, 0], grid[:, 0])  # the class token, as it was
    patches = grid[:, 1:].reshape(2, 8, 8, 5)
    want = patches[:, 2:4, 4:6].mean((1, 2))  # pooled row 1, column 2 (row-major)
    torch.testing.assert_close(out[:, 1 + 1 * 4 + 2], want)
    assert pool_grid(torch.randn(1, 49, 3), 7).shape == (1, 49, 3)  # SigLIP-like: no class token
    assert parse_pool(None) is None and parse_pool("4x4") == 4
    for bad in ("4x2", "x4", "0x0", "four"):
        with pytest.raises(LadderError, match="allowed: KxK"):
            parse_pool(bad)
    with pytest.raises(LadderError, match="cannot pool 65 visual tokens to a 9x9 grid"):
        pool_grid(torch.randn(1, 65, 3), 9)


def test_vision_pool_is_stored_keyed_and_checked_by_train_side(vqa, tmp_path, encoders, capsys):
    from PIL import Image

    backbone, vision = encoders
    cfg = vl_config(tmp_path, vqa)
    pooled_cfg = vl_config(tmp_path, vqa, **{"backbone.vision_pool": "2x2"})
    full = extract(cfg, backbone=backbone, vision=vision, progress=False)
    pooled = extract(pooled_cfg, backbone=backbone, vision=vision, progress=False)
    assert full.key != pooled.key  # pooling changes the stored features: part of the key
    m = open_cache(cfg.cache_root, pooled.key).manifest
    assert m["images"]["n_tokens"] == 1 + 2 * 2 and m["images"]["encoder"]["pool"] == "2x2"
    assert "pool" not in open_cache(cfg.cache_root, full.key).manifest["images"]["encoder"]
    # the stored rows are the encoder's grid pooled, the class token first
    data = load_task_of(cfg.task)
    ex = data.splits["test"][0]
    grid, _ = vision.features([Image.open(data.images[ex.image])])
    cache = open_cache(cfg.cache_root, pooled.key)
    row = int(np.asarray(cache.array(layout.image_index_path("test"))[...])[0])
    got = np.asarray(cache.array(layout.image_arrays("float32")["grid"])[row * 5 : row * 5 + 5])
    patches = grid[0, 1:].reshape(4, 4, -1)
    np.testing.assert_allclose(got[0], grid[0, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(got[4], patches[2:, 2:].mean((0, 1)).numpy(), atol=1e-5)
    # a run asking for another pooling than the cache's is one line
    args = ["run", "train-side", "--task", "easy-vqa", "--backbone", "tiny-bert"]
    args += ["--cache-root", cfg.cache_root, "--run-dir", str(tmp_path / "runs"), "--epochs", "1"]
    args += ["--vision-encoder", "tiny-clip", "--init", "random", "--cache-key", pooled.key]
    _one_line_exit_2(capsys, args, "pooled 2x2, but vision_pool none was asked for")
    with pytest.raises(Exception, match="vision_pool"):
        vl_config(tmp_path, vqa, **{"backbone.vision_pool": "big"})


def test_the_loader_hands_each_question_its_own_images_features(vqa, tmp_path, encoders):
    """The data path: for shuffled training batches, the visual tokens of every question equal
    the vision encoder's output on that question's image file (and the labels are its own)."""
    from PIL import Image

    from cache_store.images import ImageTable
    from cache_store.loader import CacheLoader

    backbone, vision = encoders
    cfg = vl_config(tmp_path, vqa)
    res = extract(cfg, backbone=backbone, vision=vision, progress=False)
    cache = open_cache(cfg.cache_root, res.key)
    data = load_task_of(cfg.task)
    loader = CacheLoader(
        cache, "train", {"enc": [0]}, batch_size=8, shuffle=True, seed=1, images=ImageTable(cache)
    )
    seen = 0
    for batch in loader.epoch(0):
        assert batch.visual is not None
        for row, n in enumerate(batch.index):
            ex = data.splits["train"][int(n)]
            want, _ = vision.features([Image.open(data.images[ex.image])])
            np.testing.assert_allclose(batch.visual[row], want[0].numpy(), atol=1e-5)
            assert batch.labels[row] == ex.label
            seen += 1
    assert seen == len(data.splits["train"])


def test_visual_tokens_are_standardised_with_the_training_images_stats(vl_run):
    """The side network standardises each visual feature with the training images' mean and std
    (buffers saved with its weights): a constant offset shared by every image is removed."""
    from safetensors.torch import load_file

    from cache_store.images import ImageTable
    from ladder.vision import visual_stats

    net, hiddens, mask, visual = _visual_net(1)
    with torch.no_grad():
        plain = net(hiddens, mask, visual=visual)  # stats 0 and 1 until set: identity
        shift, scale = torch.randn(24), torch.rand(24) + 0.5
        net.set_visual_stats(shift, scale)
        torch.testing.assert_close(net(hiddens, mask, visual=visual * scale + shift), plain)
    mean, std = visual_stats(np.array([[[1.0, 2.0]], [[3.0, 2.0]]]))
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(std, torch.tensor([1.0, 1e-6]))  # a constant feature: clamped
    with pytest.raises(Exception, match=r"allowed: \(24,\) each, std > 0"):
        net.set_visual_stats(torch.zeros(3), torch.ones(3))
    # train-side sets them from the training split's images, and the checkpoint keeps them
    cfg, res = vl_run
    table = ImageTable(open_cache(cfg.cache_root, res.metrics["cache"]))
    want_mean, want_std = visual_stats(table.grid[np.unique(table.index["train"])])
    name = next(iter(res.metrics["networks"]))
    saved = load_file(str(Path(res.folder) / f"{name}.best.safetensors"))
    torch.testing.assert_close(saved["visual_mean"], want_mean)
    torch.testing.assert_close(saved["visual_std"], want_std)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_streamed_image_features_equal_the_in_memory_table(vqa, tmp_path, encoders, dtype):
    """Over the memory budget the table reads each batch's distinct images from the store; the
    features are the ones the in-memory table gives, repeats and order included, and the
    standardisation summed over blocks of images is the one over the whole table."""
    from cache_store.images import ImageTable
    from ladder.vision import visual_stats

    backbone, vision = encoders
    cfg = vl_config(tmp_path, vqa, **{"cache.dtype": dtype, "cache.chunk_mb": 0.001})
    cache = open_cache(cfg.cache_root, extract(cfg, backbone=backbone, vision=vision,
                                               progress=False).key)  # fmt: skip
    whole, streamed = ImageTable(cache), ImageTable(cache, memory_budget=1024)
    assert not whole.streamed and streamed.streamed and streamed.grid is None
    rows = np.random.default_rng(0).integers(0, len(whole.index["train"]), 17)
    rows[3] = rows[9]  # one question twice in a batch
    got = streamed.gather("train", rows)
    assert got.dtype == whole.gather("train", rows).dtype
    np.testing.assert_array_equal(got, whole.gather("train", rows))
    assert ImageTable(cache, memory_budget=1 << 30).grid is not None  # it fits: in RAM
    images = np.unique(whole.index["train"])
    mean, std = visual_stats(streamed.blocks(images, per_block=3))  # 7 blocks
    want_mean, want_std = visual_stats(whole.grid[images])
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(std, want_std)


@pytest.mark.parametrize(("readout", "n_seeds"), [("text", 3), ("text+visual", 2)])
def test_stacked_vl_networks_match_training_each_alone(
    vqa, tmp_path, encoders, monkeypatch, readout, n_seeds
):
    """Seeds of a VL side network (visual ladders; the backbone's dropout 0.1, ladder dropout
    0.2, balanced class weights) trained as one stacked model (``train_side.batched``) follow
    the trajectories they follow one by one: the same losses and final weights to 1e-5, the same
    test figures; with the readout of the visual positions too."""
    from ladder.stacked import StackedVisualSide

    backbone, vision = encoders
    cfg = vl_training_config(
        tmp_path,
        vqa,
        seeds=list(range(n_seeds)),
        ladder_dropout=0.2,
        class_weight="balanced",
        visual_readout=readout,
    )
    extract(cfg, backbone=backbone, vision=vision, progress=False)
    stacked_steps = []
    forward = StackedVisualSide.forward

    def counted(self, *args, **kwargs):
        stacked_steps.append(self.K)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(StackedVisualSide, "forward", counted)
    alone = train_side(
        apply_overrides(cfg, {"train_side.batched": "off"}), run_name="alone", progress=False
    )
    assert stacked_steps == []
    stacked = train_side(
        apply_overrides(cfg, {"train_side.batched": "on"}), run_name="stacked", progress=False
    )
    assert stacked_steps and set(stacked_steps) == {n_seeds}  # every step, all seeds at once
    assert len(alone.metrics["networks"]) == n_seeds
    last = torch.load(alone.folder / "checkpoints" / "r4-s0-lr0.003.last.pt", weights_only=False)
    assert "visual_gates" in last["net"]
    assert_same_trajectories(alone, stacked)


@pytest.mark.parametrize(
    ("n_images", "fusion", "readout"),
    [(2, "ladder", "text"), (1, "input", "text+visual"), (2, "ladder", "text+visual")],
)
def test_stacked_vl_logits_are_each_networks_own(n_images, fusion, readout):
    """Networks of other weights stacked: each slice of the logits is that network's own (two
    images per example with the image-index embedding, fusion "input", the visual readout)."""
    from ladder.stacked import stack_networks

    nets, (hiddens, mask, visual) = [], (None, None, None)
    for k in range(3):
        net, hiddens, mask, visual = _visual_net(n_images, fusion, readout)
        with torch.no_grad():
            for w in net.parameters():  # other weights per network (all of them non-zero)
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(k)) * 0.1)
        nets.append(net)
    with torch.no_grad():
        got = stack_networks(nets).forward(hiddens, mask, None, visual=visual)  # (K, B, labels)
        for k, net in enumerate(nets):
            torch.testing.assert_close(got[k], net(hiddens, mask, visual=visual), rtol=0, atol=1e-5)
    assert not torch.allclose(got[0], got[1])
