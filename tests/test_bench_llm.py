"""bench.llm and the causal path of bench.baselines on a tiny random Llama: LoRA trains only its
adapters and the head, and every figure the bench prints comes from the run it made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench import baselines as bl
from bench import llm
from bench.paper_compare import Runner

D, L, FF, H, KV, C, V = 32, 2, 64, 4, 2, 2, 120  # width, blocks, MLP, heads, KV heads, classes


def tiny_llama_classifier(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=KV,
        max_position_embeddings=64,
        num_labels=C,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(cfg)


def tiny_data(n: int = 12) -> dict[str, bl.Encoded]:
    rng = np.random.default_rng(0)
    return {
        split: bl.Encoded(
            [rng.integers(5, V, size=int(rng.integers(3, 9))).tolist() for _ in range(n)],
            None,
            rng.integers(0, C, n),
        )
        for split in ("train", "validation", "test")
    }


def test_lora_on_a_causal_lm_trains_only_its_adapters_and_the_head():
    from stages.tasks import get_task

    r = bl.HPARAMS["lora"]["rank"]
    model = bl.apply_method("lora", tiny_llama_classifier(), bl.HPARAMS["lora"])
    kv = KV * D // H
    # A (r x d_in) and B (d_out x r) on q_proj (d -> d) and v_proj (d -> kv), the score head (no bias)
    assert bl.trainable_parameters(model) == L * (r * (D + D) + r * (D + kv)) + D * C
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".score." in n for n in trained)
    assert any("q_proj.lora_A" in n for n in trained) and any("v_proj.lora_B" in n for n in trained)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = bl.train_model(
        model,
        tiny_data(),
        get_task("sst2"),
        lr=1e-2,
        epochs=1,
        batch_size=4,
        warmup=0,
        seed=0,
        pad_id=0,
        max_steps=3,
    )
    assert out["steps"] == 3 and out["history"][0]["epoch_s"] > 0
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= trained  # nothing frozen changed
    assert any("lora_B" in n for n in moved)  # B starts at zero: it moved, so LoRA trained


def test_other_in_backbone_methods_refuse_a_causal_lm_in_one_line():
    cfg = tiny_llama_classifier().config
    bl.check_backbone("lora", cfg)
    bl.check_backbone("full", cfg)
    with pytest.raises(bl.BenchError, match="'bitfit' supports BERT-family backbones") as e:
        bl.check_backbone("bitfit", cfg)
    assert "\n" not in str(e.value)


class InProcess(Runner):
    """The children of ``bench.llm`` run in this process (a process each takes too long here)."""

    def __call__(
        self, name: str, task: str, args: list[str], env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        out = self.work / task / f"{name}.json"
        opt = bl.parse_options([*self.common, *args, "--json", str(out)])
        fig = bl.figures_of(opt, bl.run(opt))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(fig, default=str))
        return fig


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, minilm_tokenizer) -> Path:
    from tests.conftest import tiny_llama

    llama = tiny_llama(minilm_tokenizer)
    folder = tmp_path_factory.mktemp("tiny-llama")
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    return folder


def test_the_bench_runs_on_a_tiny_llama_and_reports_its_own_figures(
    tmp_path, glue_dir, llama_folder, capsys
):
    argv = ["--backbone", str(llama_folder), "--data-dir", str(glue_dir), "--quick"]
    argv += ["--limit", "24", "--r", "4", "--lora-r", "2", "--layer-step", "1"]
    argv += ["--batch-size", "8", "--fisher-samples", "8", "--size-samples", "8"]
    s = llm.settings_of(llm.build_parser().parse_args(argv))
    assert s["kept_layers"] == [0, 1] and s["layers"] == [0, 1, 2]
    res = llm.run_children(s, glue_dir, tmp_path / "work", runner=InProcess)
    assert all("error" not in res[k] for k in res), res
    assert res["extract"]["dtype"] == "int8" and res["extract"]["cache_bytes"] > 0
    for key in ("lst-cache", "lst-cache-1", "lst-streamed", "lora"):
        fig = res[key]
        assert fig["n_train"] == 24
        assert fig["memory"]["abs_peak_rss"] > 0 and fig["epoch_s"] > 0
        assert fig["trainable_parameters"] > 0
    assert len(res["lst-cache"]["test"]) == 3  # three seeds in one pass
    assert len(llm.first_epoch_validation(res["lst-cache"])) == 3
    assert llm.first_epoch_validation(res["lora"]) == [
        res["lora"]["seeds"][0]["history"][0]["validation"]["score"]
    ]
    assert len(res["lst-cache-1"]["epoch_s_all"][0]) == 2
    lora = res["lora"]
    # LoRA r = 2 on q_proj (32 -> 32) and v_proj (32 -> 16): its adapters and the score head
    assert lora["trainable_parameters"] == 2 * (2 * (32 + 32) + 2 * (32 + 16)) + 32 * 2
    res["online"] = llm.online_vs_cached(
        s, tmp_path / "work" / "cache", res["extract"]["cache_key"], 24
    )
    online = res["online"]
    assert online["batches_per_epoch"] == 3 and online["online_batches_timed"] == 2
    assert online["scaled"] and online["online_epoch_s"] > 0 and online["cached_epoch_s"] > 0
    rat = llm.ratios(res)
    assert rat["memory_abs"] == pytest.approx(
        res["lst-cache-1"]["memory"]["abs_peak_rss"] / lora["memory"]["abs_peak_rss"]
    )
    assert rat["online_over_cached_epoch"] == pytest.approx(
        online["online_epoch_s"] / online["cached_epoch_s"]
    )
    summary = {"settings": s, "results": res, "ratios": rat}
    summary["cache_size"] = llm.cache_sizes(s, glue_dir)
    sizes = summary["cache_size"]["bytes_per_token_per_state"]
    assert set(sizes) == {"float16", "int8"} and sizes["int8"] < sizes["float16"]
    text = llm.tables(summary)
    assert f"{100 * rat['memory_abs']:.0f} %" in text
    assert f"{rat['online_over_cached_epoch']:.1f}x" in text
    png = llm.plot(summary, tmp_path / "llm.png")
    assert png is not None and png.stat().st_size > 0
