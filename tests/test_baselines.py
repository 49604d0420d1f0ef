"""The paper-comparison baselines: bad input fails in one line, and every method trains what it says."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import baselines as bl

D, L, FF, C, V = 32, 2, 64, 2, 120  # tiny BERT: width, blocks, FFN width, classes, vocabulary


def tiny_classifier(seed: int = 0, num_labels: int = C):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=4,
        intermediate_size=FF,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


def tiny_data(n: int = 12, regression: bool = False) -> dict[str, bl.Encoded]:
    rng = np.random.default_rng(0)
    out = {}
    for split in ("train", "validation", "test"):
        ids = [
            [101, *rng.integers(5, V, size=int(rng.integers(3, 9))).tolist(), 102] for _ in range(n)
        ]
        labels = rng.random(n).astype(np.float32) * 5 if regression else rng.integers(0, C, n)
        out[split] = bl.Encoded(ids, [[0] * len(x) for x in ids], labels)
    return out


HEAD = D * D + D + D * C + C  # pooler dense + classifier


def expected_trainable(method: str, model) -> int:
    if method == "full":
        return sum(p.numel() for p in model.parameters())
    if method == "bitfit":
        biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
        return biases + D * D + D * C  # every bias, and the head's weights
    if method == "lora":
        r = bl.HPARAMS["lora"]["rank"]
        return L * 2 * r * (D + D) + HEAD  # A (r x d) and B (d x r) on query and value
    if method == "prompt":
        return bl.HPARAMS["prompt"]["tokens"] * D + HEAD
    if method == "adapters":
        m = bl.HPARAMS["adapters"]["dim"]
        adapters = L * 2 * (D * m + m + m * D + D)  # two per block
        layer_norms = (2 * L + 1) * 2 * D  # two per block and the embeddings', weight and bias
        return adapters + layer_norms + HEAD
    raise AssertionError(method)


@pytest.mark.parametrize("method", bl.IN_BACKBONE)
def test_each_method_trains_exactly_its_parameters(method):
    model = bl.apply_method(method, tiny_classifier(), bl.HPARAMS[method])
    assert bl.trainable_parameters(model) == expected_trainable(method, tiny_classifier())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = bl.train_model(
        model,
        tiny_data(),
        bl_spec("rte"),
        lr=1e-2,
        epochs=1,
        batch_size=4,
        warmup=0,
        seed=0,
        pad_id=0,
        max_steps=2,
    )
    assert out["steps"] == 2 and np.isfinite(out["history"][0]["train_loss"])
    assert 0 <= out["test"]["score"] <= 100
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        if not p.requires_grad:
            assert not moved, f"{method}: frozen {n} changed"
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(
        not torch.equal(dict(model.named_parameters())[n].detach(), before[n]) for n in trained
    )
    if method != "full":  # the head is trainable in every method
        assert any("classifier" in n for n in trained) and any("pooler" in n for n in trained)


def bl_spec(name: str):
    from stages.tasks import get_task

    return get_task(name)


def test_regression_head_trains_with_mse():
    model = bl.apply_method("bitfit", tiny_classifier(num_labels=1), {})
    out = bl.train_model(
        model,
        tiny_data(regression=True),
        bl_spec("stsb"),
        lr=1e-2,
        epochs=1,
        batch_size=4,
        warmup=0,
        seed=0,
        pad_id=0,
        max_steps=2,
    )
    assert set(out["test"]) == {"pearson", "spearman", "score"}


def test_adapter_starts_near_identity():
    torch.manual_seed(0)
    a = bl.HoulsbyAdapter(D, 4)
    x = torch.randn(3, 5, D)
    assert (a(x) - x).abs().max() < 1e-2


def test_batches_cover_every_example_once():
    lengths = list(np.random.default_rng(1).integers(2, 60, 257))
    for shuffle in (True, False):
        batches = bl.plan_batches(lengths, 10, shuffle, seed=3, epoch=1)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(257)) and max(len(b) for b in batches) == 10
    assert bl.plan_batches(lengths, 10, True, 3, 1) != bl.plan_batches(lengths, 10, True, 3, 2)


def test_peak_memory_sees_an_allocation():
    meter = bl.PeakMemory()
    meter.start()
    x = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    x += 1
    del x
    m = meter.stop()
    assert m["peak_above_base"] >= 50 * 2**20
    assert m["abs_peak_rss"] >= m["train_peak_rss"] >= m["base_rss"]


# --- bad input: one line, exit status 2 ------------------------------------------------------------


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bl.main(argv)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    from transformers import T5Config

    out = tmp_path_factory.mktemp("t5")
    T5Config(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "qlora"], "error: unknown method 'qlora'; allowed: full, adapters, lora,"),
        (["--method", "lora", "--task", "imdb"], "error: unknown task 'imdb'; allowed: cola,"),
        (["--method", "full", "--backbone", "no/such-model-xyz"], "error: unknown backbone"),
        (["--method", "lst-cache", "--kept-layers", "9"], "error: side.kept_layers has [9]"),
        (["--method", "lst-cache", "--r", "4,8"], "error: --r='4,8' gives several networks"),
        (["--method", "bitfit", "--limit", "0"], "error: --limit=0; allowed: a positive integer"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(argv, message, capsys):
    code, err = run_main(argv, capsys)
    assert code == 2
    assert err.startswith(message), err
    assert "\n" not in err


@pytest.mark.parametrize("method", ["prompt", "lora", "adapters"])
def test_a_t5_backbone_is_refused_by_the_in_backbone_methods(method, t5_folder, capsys):
    code, err = run_main(["--method", method, "--backbone", str(t5_folder)], capsys)
    assert code == 2 and "\n" not in err
    assert err.startswith(f"error: method {method!r} supports BERT-family backbones"), err
    assert "'t5'" in err
    if method == "prompt":
        assert "refuses inputs_embeds" in err


def test_paper_compare_refuses_unknown_names(monkeypatch, capsys):
    from bench import paper_compare

    for argv, msg in [
        (["--tasks", "rte,imdb"], "error: unknown task 'imdb'"),
        (["--methods", "lora,qlora"], "error: unknown method 'qlora'"),
        (["--sweeps", "depth"], "error: unknown sweep 'depth'"),
        (["--jobs", "0"], "error: --jobs=0; allowed: an integer >= 1"),
    ]:
        monkeypatch.setattr(sys, "argv", ["paper_compare", *argv])
        with pytest.raises(SystemExit) as e:
            paper_compare.main()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(msg) and "\n" not in err, err


def _compare_args(**kw):
    from bench import paper_compare as pc

    base = dict(
        limit=50,
        limit_tasks={"all"},
        seeds="0,1,2",
        batch_size=32,
        epochs=3,
        warmup_steps=None,
        methods=["full", "lst-cache"],
        sweeps=[],
        memory_task="rte",
        memory_probes=True,
        layer_variants=pc.LAYER_VARIANTS,
        fusions=pc.FUSIONS,
        init_rs=pc.INIT_RS,
    )
    return argparse.Namespace(**{**base, **kw})


def test_paper_compare_probes_memory_on_the_memory_task_alone_with_freed_memory_returned():
    from bench import paper_compare as pc

    args = _compare_args()
    rte = {r.name: r for r in pc.plan_task("rte", args, "key-rte")}
    mrpc = {r.name: r for r in pc.plan_task("mrpc", args, "key-mrpc")}
    assert set(mrpc) == {"full", "lst-cache"} and all(r.env is None for r in mrpc.values())
    probes = {n: r for n, r in rte.items() if n.startswith("live-")}
    assert set(probes) == {"live-full", "live-lst-cache", "live-lst-cache-streamed"}
    for r in probes.values():
        assert r.env == pc.LIVE_MALLOC and r.where[0] == "memory_probes"
        a = r.args
        assert a[a.index("--batch-size") + 1] == "100" and a[a.index("--epochs") + 1] == "1"
        assert a[a.index("--seeds") + 1] == "0"
    runner = pc.Runner(Path("work"), ["--memory-mb", "4096", "--threads", "1"])
    streamed = runner.command(probes["live-lst-cache-streamed"].args, Path("out.json"))
    assert bl.parse_options(streamed[3:]).memory_mb == pc.STREAM_MB  # the probe's budget wins
    assert bl.parse_options(runner.command(rte["lst-cache"].args, Path("o"))[3:]).memory_mb == 4096
    assert "--cache-key" in streamed and "--cache-key" not in probes["live-full"].args
    main = rte["full"].args  # the accuracy runs keep the study's batch, epochs and seeds
    assert main[main.index("--batch-size") + 1] == "32" and "0,1,2" in main
    assert not any(
        r.name.startswith("live-")
        for r in pc.plan_task("rte", _compare_args(memory_probes=False), "k")
    )


def test_time_to_result_charges_one_runs_side_init_to_both_lst_arms():
    from bench import paper_compare as pc

    ex = {
        "side_init_s": 100.0,
        "fisher_s": 60.0,
        "extract_states_s": 30.0,
        "side_init": {"r4": ["fisher", "magnitude"], "r8": ["fisher", "magnitude"]},
    }
    assert pc.side_init_one_s(ex) == 70.0  # Fisher + a quarter of the four prunings
    assert pc.side_init_one_s({**ex, "fisher_s": None}) == 100.0
    epochs = {"epoch_s_first": 5.0, "epoch_s": 4.0}
    res = {
        "extract": ex,
        "methods": {
            "lst-cache": {**epochs},
            "lst-online": {"epoch_s_first": 20.0, "epoch_s": 20.0},
            "full": {"epoch_s_first": 40.0, "epoch_s": None},
        },
    }
    ttr = pc.time_to_result(res, [1, 10])
    assert ttr["lst-cache"] == {1: 30 + 70 + 5, 10: 30 + 70 + 5 + 9 * 4}
    assert ttr["lst-online"] == {1: 70 + 20, 10: 70 + 200}
    assert ttr["full"] == {1: 40, 10: 400}
