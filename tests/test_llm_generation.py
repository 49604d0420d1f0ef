"""Generation with decoder-only LLMs: the causal side network's frozen LM head, generation tasks
from JSONL files (prompt + answer), metrics from the cache, greedy decoding with both KV caches."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ladder.attention import SideKVCache
from ladder.generation import greedy_generate
from ladder.side import SideConfig, build_side_network
from stages.extract import extract
from tests.conftest import make_config, tiny_llama


@pytest.fixture(scope="module")
def llama_lm(minilm_tokenizer):
    """A tiny random LlamaForCausalLM (untied LM head). Its LM head rows are drawn at std 1, not
    the init's 0.02: a trained LM's logits have a scale its 32-dim random rows lack (at 0.02 the
    side network's up-projection needs hundreds of steps just to grow logits that pick a word)."""
    bb = tiny_llama(minilm_tokenizer, lm_head=True)
    with torch.no_grad():
        bb.lm_head.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    return bb


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
    # to 1e-5 of the logits' scale (they reach tens: float32 rounding is ~1e-6 of that)
    scale = full.abs().max()
    torch.testing.assert_close(torch.cat(steps, 1) / scale, full / scale, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat(steps, 1).argmax(-1), full.argmax(-1))
    # greedy generation: each chosen token is the argmax of a full recompute on the sequence so far
    prompt = ids[0, :5].tolist()
    got = greedy_generate(bb, net, prompt, max_new_tokens=6, eos_token_id=-1)
    seq = list(prompt)
    for _ in range(6):
        t = torch.tensor([seq])
        st = bb.states(t, torch.ones_like(t), layers=layers)["enc"]
        seq.append(int(net({n: st[n] for n in layers}, torch.ones_like(t))[0, -1].argmax()))
    assert got == seq[len(prompt) :]


# --- a generation task from JSONL files --------------------------------------------------------


def sst2_jsonl(folder, glue, sizes=(("train", 200), ("validation", 50), ("test", 50))):
    """Prompt/answer pairs from SST-2 sentences (the benchmark's fixture, written at test time)."""
    from bench.llm_generation import sst2_generation_jsonl

    return sst2_generation_jsonl(folder, glue, sizes)


def gen_config(tmp_path, glue, files, **overrides):
    from pipeline.config import apply_overrides

    cfg = make_config(
        tmp_path,
        glue,
        **{
            "task.name": "custom",
            "task.problem": "generation",
            "task.files": files,
            "task.limit": None,
            "cache.dtype": "float32",
            "backbone.name": "tiny-llama-lm",
            "backbone.max_length": 96,
            "train_side.run_dir": str(tmp_path / "runs"),
            "train_side.init": "random",
            "train_side.reduction_factors": [2],
        },
    )
    return apply_overrides(cfg, overrides)


@torch.no_grad()
def test_tokens_mask_the_prompt_and_the_loss_reads_the_answer_only(tmp_path, glue_dir, llama_lm):
    from stages.tasks import load_task_of
    from stages.tokens import template_id, tokenize_split

    cfg = gen_config(
        tmp_path, glue_dir, sst2_jsonl(tmp_path, glue_dir, (("train", 4), ("validation", 2)))
    )
    data = load_task_of(cfg.task)
    assert data.spec.generation and template_id(llama_lm, data.spec) == "prompt-answer-v1"
    enc = tokenize_split(llama_lm, data, "train", 96)["enc"]
    tok = llama_lm.tokenizer
    for ids, tg, ex in zip(enc.ids, enc.targets, data.splits["train"], strict=True):
        answer = tok(ex.answer, add_special_tokens=False)["input_ids"]
        n = len(answer) + 1  # + EOS
        assert ids[-n:] == [*answer, tok.sep_token_id] and tg[-n:] == ids[-n:]
        assert tg[:-n] == [-100] * (len(ids) - n)
        assert tok.decode(ids[:-n], skip_special_tokens=True).startswith("review :")
    # the loss: prompt positions carry nothing; changing prompt logits leaves it unchanged
    net = lm_net(llama_lm)
    ids = torch.tensor([enc.ids[0]])
    labels = torch.tensor([enc.targets[0]])
    states = llama_lm.states(
        ids, torch.ones_like(ids), layers=net.needed_layers(), for_training=True
    )["enc"]
    h = {n: states[n] for n in net.needed_layers()}
    logits = net(h, torch.ones_like(ids))
    loss = net.loss(logits, labels)
    n = int((labels != -100).sum())
    want = torch.nn.functional.cross_entropy(logits[0, -n - 1 : -1], labels[0, -n:])
    torch.testing.assert_close(loss, want)
    noisy = logits.clone()
    noisy[0, : -n - 1] += 5 * torch.randn_like(noisy[0, : -n - 1])
    torch.testing.assert_close(net.loss(noisy, labels), loss)
    torch.testing.assert_close(net.lm_loss(h, torch.ones_like(ids), labels), loss)


def test_frozen_lm_head_is_stored_in_frozen_and_never_trained(tmp_path, glue_dir, llama_lm):
    from cache_store import layout
    from cache_store.registry import open_cache
    from ladder.side import trainable_parameters
    from stages.train_side import train_side

    files = sst2_jsonl(tmp_path, glue_dir, (("train", 8), ("validation", 4), ("test", 4)))
    cfg = gen_config(
        tmp_path, glue_dir, files, **{"train_side.epochs": 1, "train_side.batch_size": 4}
    )
    result = extract(cfg, backbone=llama_lm, progress=False)
    cache = open_cache(cfg.cache_root, result.key)
    assert cache.manifest["frozen"] == ["lm_head"]
    assert cache.manifest["key_inputs"]["template"] == "prompt-answer-v1"
    stored = torch.from_numpy(cache.array(layout.frozen_path("lm_head"))[...])
    torch.testing.assert_close(stored, llama_lm.lm_head.float())
    run = train_side(cfg, progress=False, echo=False)
    net = lm_net(llama_lm)
    assert "lm_head" not in dict(net.named_parameters()) and "lm_head" not in net.state_dict()
    assert trainable_parameters(net) == sum(p.numel() for n, p in net.named_parameters())
    saved = load_file(str(run.folder / "r2-s0-lr0.003.best.safetensors"))
    assert "lm_head" not in saved and "up.weight" in saved
    ep = run.metrics["networks"]["r2-s0-lr0.003"]["epochs"][0]["validation"]
    assert set(ep) == {"exact_match", "answer_loss", "score"}
    assert torch.equal(torch.from_numpy(cache.array(layout.frozen_path("lm_head"))[...]), stored)


def test_cache_and_online_lst_follow_the_same_trajectory_with_the_lm_head(
    tmp_path, glue_dir, llama_lm
):
    """float32 cache vs the live backbone (dropout off): same losses, figures and weights."""
    from stages.train_side import train_side

    files = sst2_jsonl(tmp_path, glue_dir, (("train", 12), ("validation", 6), ("test", 6)))
    cfg = gen_config(
        tmp_path,
        glue_dir,
        files,
        **{"train_side.epochs": 2, "train_side.batch_size": 4, "train_side.warmup_steps": 2},
    )
    extract(cfg, backbone=llama_lm, progress=False)
    cached = train_side(cfg, run_name="cached", progress=False, echo=False)
    online = train_side(
        cfg, run_name="online", online=llama_lm, online_dropout=False, progress=False, echo=False
    )
    c = cached.metrics["networks"]["r2-s0-lr0.003"]
    o = online.metrics["networks"]["r2-s0-lr0.003"]
    c_loss = torch.tensor([h["train_loss"] for h in c["epochs"]])
    o_loss = torch.tensor([h["train_loss"] for h in o["epochs"]])
    torch.testing.assert_close(c_loss, o_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        torch.tensor(c["test"]["answer_loss"]),
        torch.tensor(o["test"]["answer_loss"]),
        rtol=1e-5,
        atol=0,
    )
    assert c["test"]["exact_match"] == o["test"]["exact_match"]
    pc = torch.load(cached.folder / "checkpoints" / "r2-s0-lr0.003.last.pt", weights_only=False)[
        "net"
    ]
    po = torch.load(online.folder / "checkpoints" / "r2-s0-lr0.003.last.pt", weights_only=False)[
        "net"
    ]
    assert pc.keys() == po.keys() and "lm_head" not in pc
    for k in pc:
        torch.testing.assert_close(pc[k], po[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"prompt": "Review: fine"}',
            ":3 has no 'answer'; allowed: JSON objects with string fields 'prompt' and 'answer'",
        ),
        ('{"answer": " positive"}', ":3 has no 'prompt'; allowed: JSON objects with string fields"),
        ('{"prompt": "x", "answer": 1}', ":3 has a non-string (int) 'answer'; allowed:"),
        ('{"prompt": "x"', ":3 is not valid JSON"),
    ],
)
def test_bad_jsonl_line_is_one_line_exit_2_and_nothing_committed(
    tmp_path, glue_dir, capsys, line, message
):
    import yaml

    from pipeline.cli import run_cli

    files = sst2_jsonl(tmp_path, glue_dir, (("train", 4), ("validation", 2)))
    with open(files["train"], "a", encoding="utf-8") as f:  # line 5; line 3 is made bad below
        f.write("\n")
    lines = open(files["train"], encoding="utf-8").read().splitlines()
    lines[2] = line
    open(files["train"], "w", encoding="utf-8").write("\n".join(lines) + "\n")
    config = tmp_path / "pipeline.yaml"
    task = {"name": "custom", "problem": "generation", "files": files}
    config.write_text(yaml.safe_dump({"task": task}))
    root = tmp_path / "cache"
    code = run_cli(
        [
            "run",
            "extract",
            "--config",
            str(config),
            "--cache-root",
            str(root),
            "--backbone",
            "minilm-l6",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and files["train"] in err[0], err
    assert message in err[0], err[0]
    assert not root.exists() or not any(p.name == "commit.json" for p in root.rglob("*"))


def test_generation_needs_a_causal_backbone(tmp_path, glue_dir, capsys):
    import yaml

    from pipeline.cli import run_cli

    files = sst2_jsonl(tmp_path, glue_dir, (("train", 4), ("validation", 2)))
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump({"task": {"name": "custom", "problem": "generation", "files": files}})
    )
    root = tmp_path / "cache"
    code = run_cli(["run", "extract", "--config", str(config), "--cache-root", str(root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert (
        "a generation task needs a decoder-only causal LM backbone; 'minilm-l6' is bert" in err[0]
    )
    assert "allowed: the Llama family" in err[0]
    assert not root.exists() or not any(p.name == "commit.json" for p in root.rglob("*"))
    with pytest.raises(Exception, match="side.head='lm' needs a decoder-only causal backbone"):
        from transformers import BertConfig

        build_side_network(BertConfig(hidden_size=32, num_attention_heads=4), SideConfig(head="lm"))


def test_trained_tiny_llama_generates_valid_answers(tmp_path, glue_dir, llama_lm, monkeypatch):
    """200 SST-2 prompt/answer pairs: a tiny random Llama's side network learns the answer format;
    greedy generation with both KV caches answers one of the two words on >= 95% of held-out
    prompts, and its exact match equals the one the cache measured (teacher-forced argmax)."""
    import stages.evaluate
    from stages.evaluate import Predictor, evaluate_split, generate_ids
    from stages.tasks import load_task_of
    from stages.train_side import train_side

    files = sst2_jsonl(tmp_path, glue_dir)
    cfg = gen_config(
        tmp_path,
        glue_dir,
        files,
        **{
            "train_side.epochs": 4,
            "train_side.batch_size": 10,
            "train_side.learning_rates": [1e-2],
            "train_side.warmup_steps": 5,
        },
    )
    extract(cfg, backbone=llama_lm, progress=False)
    run = train_side(cfg, progress=False, echo=False)
    net = run.metrics["networks"]["r2-s0-lr0.01"]
    monkeypatch.setattr(stages.evaluate, "load_backbone", lambda *a, **k: llama_lm)
    p = Predictor(run.folder)
    data = load_task_of(cfg.task)
    test = data.splits["test"]
    words = [llama_lm.tokenizer.decode(t) for t in generate_ids(p, test, max_new_tokens=4)]
    valid = sum(w in ("positive", "negative") for w in words) / len(words)
    assert valid >= 0.95, (valid, words[:10], net["epochs"][-1])
    em = evaluate_split(p, data, "test")["exact_match"]
    print(f"valid {valid:.0%}, exact match {em:.1f} (cache: {net['test']['exact_match']:.1f})")
    assert em == pytest.approx(net["test"]["exact_match"])
    rows = p.explain(test[:2])
    assert [r["prediction"] for r in rows] == words[:2]
