"""GLUE classification scored by the LM (``train_side.head: lm``, a verbaliser): the answer-prompt
template, the label words' first tokens, logits from the frozen LM head, cache vs online, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from cache_store.registry import open_cache
from ladder.side import SideConfig, build_side_network
from stages.extract import extract
from tests.conftest import make_config
from tests.test_llm_generation import llama_lm  # noqa: F401  (the fixture)

R = "r2-s0-lr0.003"


def verb_config(tmp_path, glue, **overrides):
    return make_config(
        tmp_path,
        glue,
        **{
            "task.name": "sst2",
            "task.limit": 12,
            "cache.dtype": "float32",
            "backbone.name": "tiny-llama-lm",
            "backbone.max_length": 64,
            "train_side.head": "lm",
            "train_side.run_dir": str(tmp_path / "runs"),
            "train_side.init": "random",
            "train_side.reduction_factors": [2],
            "train_side.epochs": 2,
            "train_side.batch_size": 4,
            "train_side.warmup_steps": 2,
            **overrides,
        },
    )


@torch.no_grad()
def test_logits_are_the_lm_logits_of_the_label_words_first_tokens(llama_lm):  # noqa: F811
    """(B, num_labels) = the full LM logits (up + frozen head) at the last real token, gathered
    at the label words' first tokens; padding does not matter."""
    from stages.tasks import get_task
    from stages.tokens import label_token_ids

    tok = llama_lm.tokenizer
    ids = label_token_ids(tok, get_task("sst2"))
    assert tok.convert_ids_to_tokens(ids) == ["negative", "positive"]
    lm_head = llama_lm.frozen_tensors(lm_head=True)["lm_head"]
    verb = build_side_network(
        llama_lm.config,
        SideConfig(reduction_factor=2, head="lm", label_tokens=tuple(ids), dropout=0.0),
        lm_head,
    ).eval()
    for p in verb.parameters():  # not the near-zero init
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else None
    gen = build_side_network(
        llama_lm.config, SideConfig(reduction_factor=2, head="lm", dropout=0.0), lm_head
    ).eval()
    gen.load_state_dict(verb.state_dict())
    torch.manual_seed(1)
    x = torch.randint(1000, 2000, (2, 7))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 4:] = False  # the second example has 4 real tokens
    layers = verb.needed_layers()
    st = llama_lm.states(x, mask, layers=layers)["enc"]
    h = {n: st[n] for n in layers}
    got = verb(h, mask)
    full = gen(h, mask)  # (2, 7, V)
    want = torch.stack([full[0, 6, ids], full[1, 3, ids]])
    assert got.shape == (2, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "lm_head" not in verb.state_dict()
    loss = verb.loss(got, torch.tensor([0, 1]))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(got, torch.tensor([0, 1])))


def test_cache_and_online_lst_follow_the_same_trajectory_with_the_verbaliser(
    tmp_path,
    glue_dir,
    llama_lm,  # noqa: F811
):
    """float32 cache vs the live backbone (dropout off): same losses, figures and weights; the
    cache has the answer-prompt template, the frozen LM head and the label tokens."""
    from cache_store import layout
    from stages.train_side import train_side

    cfg = verb_config(tmp_path, glue_dir)
    result = extract(cfg, backbone=llama_lm, progress=False)
    cache = open_cache(cfg.cache_root, result.key)
    m = cache.manifest
    assert m["key_inputs"]["template"] == "fields-answer-v1" and m["frozen"] == ["lm_head"]
    assert m["verbaliser"]["words"] == ["negative", "positive"]
    stored = torch.from_numpy(cache.array(layout.frozen_path("lm_head"))[...])
    torch.testing.assert_close(stored, llama_lm.lm_head.float())
    ids = cache.array(layout.input_ids_path("train", "enc"))[:]
    offsets = cache.array(layout.offsets_path("train", "enc"))[:]
    first = llama_lm.tokenizer.decode(ids[offsets[0] : offsets[1]], skip_special_tokens=True)
    assert first.startswith("sentence : ") and first.endswith(" answer :"), first
    cached = train_side(cfg, run_name="cached", progress=False, echo=False)
    online = train_side(
        cfg, run_name="online", online=llama_lm, online_dropout=False, progress=False, echo=False
    )
    c, o = cached.metrics["networks"][R], online.metrics["networks"][R]
    c_loss = torch.tensor([h["train_loss"] for h in c["epochs"]])
    o_loss = torch.tensor([h["train_loss"] for h in o["epochs"]])
    torch.testing.assert_close(c_loss, o_loss, rtol=1e-5, atol=0)
    assert c["test"]["accuracy"] == o["test"]["accuracy"]
    saved = json.loads((cached.folder / f"{R}.config.json").read_text())["side"]
    assert saved["head"] == "lm" and saved["label_tokens"] == m["verbaliser"]["label_tokens"]
    ck = cached.folder / "checkpoints" / f"{R}.last.pt"
    pc = torch.load(ck, weights_only=False)["net"]
    po = torch.load(online.folder / "checkpoints" / f"{R}.last.pt", weights_only=False)["net"]
    assert pc.keys() == po.keys() and "lm_head" not in pc and "head_out.weight" not in pc
    for k in pc:
        torch.testing.assert_close(pc[k], po[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def llama_lm_folder(tmp_path_factory, llama_lm):  # noqa: F811
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-lm")
    # the LlamaForCausalLM with its LM head (the Backbone keeps the decoder as its model; saved
    # alone, a reload would draw a new random LM head)
    full = LlamaForCausalLM(llama_lm.config)
    full.model = llama_lm.model
    full.lm_head.weight = torch.nn.Parameter(llama_lm.lm_head.detach().clone())
    full.save_pretrained(folder)
    llama_lm.tokenizer.save_pretrained(folder)
    return folder


def llama_lm_folder_head(folder) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))["lm_head.weight"].float()


def cli(args, capsys):
    from pipeline.cli import run_cli

    code = run_cli([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def test_cli_train_side_with_head_lm_and_predict_agree(tmp_path, glue_dir, llama_lm_folder, capsys):
    """`run all --head lm` on a small SST-2 subset writes metrics; `pipeline predict` on the run
    gives the predictions train-side's test evaluation computed from the cache."""
    from stages.tasks import load_task
    from stages.train_side import cached_predictions

    root, runs = tmp_path / "cache", tmp_path / "runs"
    base = ["--task", "sst2", "--data-dir", glue_dir, "--limit", 16, "--cache-root", root]
    base += ["--backbone", llama_lm_folder, "--head", "lm", "--max-length", 48]
    train = ["--init", "random", "--reduction-factors", 2, "--epochs", 2, "--batch-size", 8]
    train += ["--run-dir", runs, "--warmup-steps", 1, "--learning-rates", "1e-2"]
    code, _, err = cli(
        ["run", "all", *base, *train, "--side-init", "", "--dtype", "float32"], capsys
    )
    assert code == 0, err
    folder = next(p for p in runs.iterdir() if p.is_dir())
    # class weights are for a classification head: one line, nothing written
    weighed = ["run", "train-side", *base, *train[:8], "--run-dir", tmp_path / "weighed"]
    code, _, err = cli([*weighed, "--class-weight", "balanced"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "label words scored by the LM head, --head lm); allowed: 'none'" in err[0]
    assert not (tmp_path / "weighed").exists()
    key = json.loads((folder / "r2-s0-lr0.01.config.json").read_text())["cache"]
    stored = open_cache(str(root), key).array("frozen/lm_head")[...]
    torch.testing.assert_close(torch.from_numpy(stored), llama_lm_folder_head(llama_lm_folder))
    metrics = json.loads((folder / "metrics.json").read_text())
    net = metrics["networks"]["r2-s0-lr0.01"]
    assert "accuracy" in net["test"] and len(net["epochs"]) == 2
    config = json.loads((folder / "config.json").read_text())
    assert config["train_side"]["head"] == "lm"
    from pipeline.config import Config

    cfg = Config.model_validate(config)
    want = cached_predictions(cfg, folder, "r2-s0-lr0.01")
    data = load_task("sst2", data_dir=str(glue_dir), limit=16)
    test = data.splits["test"][:5]
    path = tmp_path / "inputs.jsonl"
    path.write_text("".join(json.dumps({"sentence": ex.texts[0]}) + "\n" for ex in test))
    code, out, err = cli(["predict", "--run", folder, "--input", path, "--json"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prediction"] for r in rows] == [data.spec.labels[int(p)] for p in want[:5]]
    # the logits too: the live backbone on the answer-prompt template sees what stage one saw
    from stages.evaluate import Predictor
    from stages.train_side import cached_outputs

    live = Predictor(folder).outputs(data.splits["test"])
    stored = cached_outputs(cfg, folder, "r2-s0-lr0.01")[0]
    assert live.shape == stored.shape == (len(data.splits["test"]), 2)
    torch.testing.assert_close(live, stored, rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_one_line_exit_2(
    tmp_path,
    glue_dir,
    llama_lm,  # noqa: F811
    llama_lm_folder,
    capsys,
):
    root = tmp_path / "cache"
    base = ["--data-dir", glue_dir, "--limit", 8, "--cache-root", root]
    base += ["--backbone", llama_lm_folder, "--side-init", ""]
    # a regression task
    code, _, err = cli(["run", "extract", "--task", "stsb", *base, "--head", "lm"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "task 'stsb' is a regression task; allowed: --head cls" in err[0]
    # an encoder-only backbone; a multi-task run
    args = [
        "run",
        "extract",
        "--task",
        "sst2",
        *base[:6],
        "--backbone",
        "minilm-l6",
        "--head",
        "lm",
    ]
    code, _, err = cli(args, capsys)
    assert code == 2 and len(err) == 1, err
    assert "--head lm needs a decoder-only causal LM backbone" in err[0] and "is bert" in err[0]
    args = ["run", "train-side", "--task", "rte,mrpc", *base[:6], "--head", "lm"]
    code, _, err = cli(args, capsys)
    assert code == 2 and len(err) == 1, err
    assert "--head lm is not built for multi-task training" in err[0]
    # a bare decoder's checkpoint: no LM head (transformers would make up a random one)
    bare = tmp_path / "bare"
    llama_lm.model.save_pretrained(bare)
    llama_lm.tokenizer.save_pretrained(bare)
    capsys.readouterr()  # the save's progress bars
    args = ["run", "extract", "--task", "sst2", *base[:6], "--backbone", bare, "--head", "lm"]
    args += ["--side-init", ""]
    code, _, err = cli(args, capsys)
    assert code == 2 and len(err) == 1, err
    assert "has no LM head (a bare decoder without lm_head.weight" in err[0]
    # two labels whose words start with the same token
    rows = ["text,label"] + [f"row {i},{('very_good', 'very_bad')[i % 2]}" for i in range(8)]
    files = {}
    for split in ("train", "validation", "test"):
        files[split] = str(tmp_path / f"{split}.csv")
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    import yaml

    conf = tmp_path / "pipeline.yaml"
    task = {"name": "custom", "files": files, "text_columns": ["text"]}
    conf.write_text(yaml.safe_dump({"task": task}))
    code, _, err = cli(["run", "extract", "--config", conf, *base[4:], "--head", "lm"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "labels 'very_bad' and 'very_good' of task 'custom' start with the same token" in err[0]
    assert not root.exists() or not any(p.name == "commit.json" for p in root.rglob("*"))
    # a cache of the other template: extracted for head cls, trained with head lm (and back)
    code, _, err = cli(["run", "extract", "--task", "sst2", *base, "--dtype", "float32"], capsys)
    assert code == 0, err
    key = next(p.name for p in root.iterdir() if p.is_dir())
    train = ["run", "train-side", "--task", "sst2", *base[:8], "--run-dir", tmp_path / "runs"]
    train += ["--init", "random", "--reduction-factors", 2, "--epochs", 1]
    code, _, err = cli([*train, "--head", "lm", "--cache-key", key], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"cache {key} does not fit --head lm: it differs in template (fields-v1;" in err[0]
    code, _, err = cli([*train, "--head", "lm"], capsys)
    assert code == 2 and len(err) == 1 and "differs in template (fields-v1;" in err[0], err
