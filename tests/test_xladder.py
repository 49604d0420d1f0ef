"""Fusion "xladder" (depth-extended ladder) on a tiny random Llama: structure, states read,
gradients, cache vs online LST, bad depth, and train-side from the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from cache_store.registry import open_cache
from ladder.errors import LadderError
from ladder.side import SideConfig, build_side_network
from pipeline.config import apply_overrides
from stages.extract import extract
from stages.train_side import train_side
from tests.conftest import make_config, tiny_llama

L = 4  # backbone blocks


@pytest.fixture(scope="module")
def llama(minilm_tokenizer):
    return tiny_llama(minilm_tokenizer, layers=L)


@pytest.mark.parametrize(("depth", "delta"), [(None, 2), (1, 1), (3, 3), (4, 4)])
def test_two_delta_blocks_delta_ladders_and_only_the_top_states(llama, depth, delta):
    side = SideConfig(reduction_factor=2, fusion="xladder", xladder_depth=depth)
    net = build_side_network(llama.config, side)
    assert len(net.layers) == 2 * delta and len(net.down) == delta
    top = list(range(L - delta, L))
    assert net.kept == top and list(net.down) == [str(i) for i in top]
    assert list(net.layers) == [str(i) for i in range(L - delta, L + delta)]  # then free blocks
    assert net.needed_layers() == list(range(L - delta, L + 1))  # states L - delta .. L
    states = {k: torch.randn(2, 5, 32) for k in net.needed_layers()}
    assert net(states, torch.ones(2, 5, dtype=torch.bool)).shape == (2, 2)
    with pytest.raises(LadderError, match=rf"hidden state {L - delta} is missing"):
        net({k: h for k, h in states.items() if k != L - delta}, torch.ones(2, 5))


def test_gradients_reach_the_free_blocks_and_never_the_backbone(llama):
    torch.manual_seed(0)
    side = SideConfig(reduction_factor=2, fusion="xladder", num_labels=3)
    net = build_side_network(llama.config, side)
    ids = torch.tensor([[101, 2054, 2003, 1037, 102], [101, 2129, 102, 0, 0]])
    mask = ids != 0
    states = llama.states(ids, mask, for_training=True)["enc"]  # what online LST feeds
    assert not any(h.requires_grad for h in states)
    logits = net({k: states[k] for k in net.needed_layers()}, mask)
    net.loss(logits, torch.tensor([0, 2])).backward()
    for i in net.free:  # the free blocks L .. L + delta - 1 learn
        grads = [p.grad for p in net.layers[str(i)].parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), i
    assert all(p.grad is None for p in llama.model.parameters())  # the frozen backbone
    gate_grad = net.gates.grad  # one alpha per backbone block; only the top delta are used
    assert torch.all(gate_grad[: L - 2] == 0) and torch.all(gate_grad[L - 2 :] != 0)


def test_magnitude_init_loads_the_top_blocks_and_leaves_the_free_ones_random(llama):
    from ladder.pruning import prune_backbone

    weights, _ = prune_backbone("llama", llama.model.state_dict(), None, 2, llama.config)
    torch.manual_seed(0)
    net = build_side_network(llama.config, SideConfig(reduction_factor=2, fusion="xladder"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_side_init(weights)
    own = net.state_dict()
    for i in (2, 3):  # the connected blocks are the backbone's top blocks, pruned
        key = f"layers.{i}.attn.q.weight"
        torch.testing.assert_close(own[key], weights[key])
    for k in own:
        if k.startswith(("layers.4.", "layers.5.")):  # the free blocks keep their init
            assert torch.equal(own[k], before[k]), k


def _cfg(tmp_path, glue_dir, llama, **over):
    cfg = make_config(tmp_path, glue_dir, **{"cache.dtype": "float32", "task.limit": 12})
    return apply_overrides(
        cfg,
        {
            "train_side.epochs": 2,
            "train_side.batch_size": 4,
            "train_side.warmup_steps": 2,
            "train_side.reduction_factors": [2],
            "train_side.fusion": "xladder",
            "train_side.init": "magnitude",
            "extract.side_init": ["magnitude"],
            "extract.reduction_factors": [2],
            "backbone.name": llama.name,
            "train_side.run_dir": str(tmp_path / "runs"),
            **over,
        },
    )


def test_cache_of_the_top_states_and_online_lst_follow_the_same_trajectory(
    tmp_path, glue_dir, llama
):
    """float32 cache of states L - delta .. L only vs the live backbone (dropout off): same
    losses and weights, 2 epochs."""
    cfg = _cfg(tmp_path, glue_dir, llama, **{"extract.layers": [2, 3, 4]})
    key = extract(cfg, backbone=llama, progress=False).key
    assert open_cache(cfg.cache_root, key).manifest["layers_stored"] == {"enc": [2, 3, 4]}
    cached = train_side(cfg, run_name="cached", progress=False, echo=False)
    online = train_side(
        cfg, run_name="online", online=llama, online_dropout=False, progress=False, echo=False
    )
    (name,) = cached.metrics["networks"]
    c, o = cached.metrics["networks"][name], online.metrics["networks"][name]
    c_loss = [h["train_loss"] for h in c["epochs"]]
    o_loss = [h["train_loss"] for h in o["epochs"]]
    assert len(c_loss) == 2
    torch.testing.assert_close(torch.tensor(c_loss), torch.tensor(o_loss), rtol=1e-5, atol=0)
    assert c["test"] == o["test"]
    pc = torch.load(cached.folder / "checkpoints" / f"{name}.last.pt", weights_only=False)
    po = torch.load(online.folder / "checkpoints" / f"{name}.last.pt", weights_only=False)
    assert {k for k in pc["net"] if k.startswith("layers.")} >= {"layers.5.down.weight"}
    for k in pc["net"]:
        torch.testing.assert_close(pc["net"][k], po["net"][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"xladder_depth": 5}, r"^side\.xladder_depth=5 exceeds the backbone's 4 blocks; allowed: 1\.\.4$"),
        ({"xladder_depth": 0}, r"^side\.xladder_depth=0; allowed: None .* in 1\.\.L"),
        ({"xladder_depth": True}, r"^side\.xladder_depth=True; allowed:"),
        ({"fusion": "ladder", "xladder_depth": 2}, r"only with fusion 'xladder'$"),
        ({"kept_layers": (1, 3)}, r"^side\.kept_layers=\[1, 3\] with side\.fusion='xladder'"),
    ],
)  # fmt: skip
def test_bad_depth_is_one_line(llama, kw, match):
    with pytest.raises(LadderError, match=match) as e:
        SideConfig(**{"reduction_factor": 2, "fusion": "xladder", **kw}).validate(llama.config)
    assert "\n" not in str(e.value)


def test_t5_refuses_xladder_in_one_line(minilm_tokenizer):
    from tests.conftest import tiny_t5

    t5 = tiny_t5(minilm_tokenizer)
    with pytest.raises(LadderError, match=r"^side\.fusion='xladder' with model_type='t5'") as e:
        SideConfig(reduction_factor=2, fusion="xladder").validate(t5.config)
    assert "\n" not in str(e.value)


def test_train_side_from_the_cli_on_an_extraction_of_the_top_states(
    tmp_path, glue_dir, llama, capsys
):
    from pipeline.cli import run_cli

    folder = tmp_path / "tiny-llama"
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    root, runs = tmp_path / "cache", tmp_path / "runs"
    common = ["--task", "rte", "--data-dir", str(glue_dir), "--limit", "8"]
    common += ["--cache-root", str(root), "--backbone", str(folder)]
    extract_args = ["run", "extract", *common, "--dtype", "float32", "--layers", "3,4"]
    extract_args += ["--side-init", "magnitude", "--side-init-factors", "2"]
    assert run_cli(extract_args) == 0
    key = next(p.name for p in root.iterdir() if p.is_dir())
    train = ["run", "train-side", *common, "--cache-key", key, "--reduction-factors", "2"]
    train += ["--epochs", "1", "--batch-size", "4", "--warmup-steps", "1"]
    train += ["--run-dir", str(runs), "--fusion", "xladder", "--init", "magnitude"]
    capsys.readouterr()
    assert run_cli([*train, "--xladder-depth", "5"]) == 2  # checked before any work
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allowed: 1..4" in err[0]
    assert run_cli([*train, "--xladder-depth", "1"]) == 0  # states 3, 4: what the cache holds
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    metrics = json.loads((run / "metrics.json").read_text())
    (net,) = metrics["networks"].values()
    assert len(net["epochs"]) == 1 and "test" in net
    saved = json.loads((run / "config.json").read_text())
    assert saved["train_side"]["fusion"] == "xladder" and saved["train_side"]["xladder_depth"] == 1
    capsys.readouterr()
    assert run_cli(train) == 2  # the default delta = 2 needs state 2, which the cache lacks
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "lacks layer state 2" in err[0]


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_gpt2_and_the_encoder_only_network_get_xladder_from_the_same_ladders(
    minilm_tokenizer, family
):
    """GPT-2 (the causal network) and BERT (the encoder-only one): 3 blocks, default delta 1."""
    from tests.conftest import tiny_bert, tiny_gpt2

    backbone = (
        tiny_gpt2(minilm_tokenizer, layers=3) if family == "gpt2" else tiny_bert(minilm_tokenizer)
    )
    side = SideConfig(reduction_factor=2, fusion="xladder")
    net = build_side_network(backbone.config, side)
    assert list(net.layers) == ["2", "3"] and list(net.down) == ["2"]
    assert net.needed_layers() == [2, 3]
    ids = torch.tensor([[101, 2054, 2003, 1037, 102], [101, 2129, 102, 0, 0]])
    mask = ids != 0
    states = backbone.states(ids, mask, for_training=True)["enc"]
    logits = net({k: states[k] for k in net.needed_layers()}, mask)
    net.loss(logits, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in net.layers["3"].parameters())
