"""One method of the paper's comparison (Table 1) on one task, trained in a process of its own.

    python -m bench.baselines --method lora --task rte --json /tmp/lora-rte.json
    python -m bench.baselines --method lst-cache --task rte --quick
    python -m bench.baselines --method extract --task rte --cache-root /tmp/lst-cache

Methods, all on the same backbone (default: the packaged all-MiniLM-L6-v2), the same data and
paper splits, tokenizer and max length 128, and the task's metric (``pipeline.tasks``):

  full        full fine-tuning: ``AutoModelForSequenceClassification``, every weight trained
  adapters    Houlsby bottleneck adapters after the attention output and after the feed-forward
              (our own module, ``HoulsbyAdapter``: the ``adapters`` library needs transformers 4.x),
              trained with every LayerNorm and the head
  lora        peft ``LoraConfig`` on query and value, plus the head (``modules_to_save``)
  bitfit      every bias term plus the head
  prompt      peft ``PromptTuningConfig``: virtual tokens initialised from sampled vocabulary
              embeddings (as the paper), plus the head
  lst-online  LST with the backbone live and its dropout on (``train_side(online=...)``)
  lst-cache   LST from the activation cache (``extract`` once, then ``train_side``)
  extract     not a method: stage one alone, its time, cache size and memory

"The head" of the in-backbone methods is the BERT classification head: the pooler (dense + tanh)
and the classifier, both trained, as the LST side network trains its own dense + tanh head.

Every seed trains a fresh model; per seed the process measures its RSS once the model and the
data are in memory, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), trains, and
reads the peak back: the figure is the peak above that base (and the process's absolute peak
beside it). Epoch times are wall seconds of the training loop alone (evaluation excluded).
``--json OUT`` writes the figures with the command, machine and versions.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401 - sets OMP_WAIT_POLICY, which must precede torch's import

# isort: split
import numpy as np
import torch
from torch import nn

from bench.common import DEFAULT_GLUE, REPO, parser, table, write_json
from cache_store.loader import bucketed_batches
from ladder.families import FAMILY
from ladder.side import trainable_parameters
from stages.tasks import paper_epochs
from stages.tokens import pad, tokenize_causal, tokenize_texts
from stages.train_side import linear_schedule

METHODS = ("full", "adapters", "lora", "bitfit", "prompt", "lst-online", "lst-cache")
IN_BACKBONE = ("full", "adapters", "lora", "bitfit", "prompt")
LST_METHODS = ("lst-online", "lst-cache")
BERT_TYPES = ("bert", "roberta", "xlm-roberta", "electra")  # what the in-backbone methods support
# decoder-only causal LMs (``*ForSequenceClassification``: the last real token's state, a linear
# "score" head): full fine-tuning and LoRA are implemented for them
LLAMA_TYPES = tuple(mt for mt, fam in FAMILY.items() if fam == "llama")  # llama, mistral, qwen2
CAUSAL_METHODS = ("full", "lora")
LORA_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}

# Learning rates and method settings (batch 100, AdamW, linear warm-up and decay, clip 1.0 for all).
HPARAMS: dict[str, dict[str, Any]] = {
    "full": {"lr": 3e-5, "source": "BERT's standard fine-tuning rate (Devlin et al.: 2e-5..5e-5)"},
    "adapters": {"lr": 3e-4, "dim": 24, "source": "paper Table 5 (lr 3e-4, dim 48 at d=768: d/16)"},
    "lora": {"lr": 3e-4, "rank": 8, "alpha": 16, "source": "paper Table 5 lr; rank 8 on q,v"},
    "bitfit": {"lr": 3e-4, "source": "paper Table 5"},
    "prompt": {
        "lr": 3e-3,
        "tokens": 20,
        "source": "paper's 3e-1 is for T5; MiniLM's embeddings have std 0.056 (untuned)",
    },
    "lst-online": {"lr": 3e-3, "r": 8, "source": "paper Table 5 / LST_REFERENCE §6"},
    "lst-cache": {"lr": 3e-3, "r": 8, "source": "paper Table 5 / LST_REFERENCE §6"},
}
EXTRACT_RS = [4, 8, 16, 32]  # side_init computed once for every reduction factor of the sweeps


class BenchError(Exception):
    """Bad input: printed as one ``error: ...`` line, exit status 2."""


# --- peak memory ---------------------------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    rss = _status_bytes("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss
    return rss


class PeakMemory:
    """Peak RSS of a phase above the RSS at its start.

    On Linux the kernel's high-water mark is reset at ``start`` (``clear_refs`` 5), so ``stop``
    reads the true peak of the phase; elsewhere a thread samples RSS every 5 ms.
    """

    def __init__(self) -> None:
        self.base = 0
        self.load_peak = 0
        self.how = ""
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        gc.collect()
        self.base = rss_bytes()
        self.load_peak = _status_bytes("VmHWM") or self.base
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "kernel peak RSS (VmHWM) reset at the start of training"
        except OSError:
            self.how = "RSS sampled every 5 ms"
            self._stop.clear()
            self._samples = [self.base]
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._samples.append(rss_bytes())

    def stop(self) -> dict[str, Any]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            peak = max(self._samples)
        else:
            peak = _status_bytes("VmHWM") or rss_bytes()
        return {
            "base_rss": self.base,
            "train_peak_rss": peak,
            "peak_above_base": peak - self.base,
            "abs_peak_rss": max(peak, self.load_peak),
            "how": self.how,
        }


def merge_memory(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst seed: the largest peak above base, and the largest absolute peak."""
    worst = max(per_seed, key=lambda m: m["peak_above_base"])
    return {
        **worst,
        "abs_peak_rss": max(m["abs_peak_rss"] for m in per_seed),
        "per_seed_above_base": [m["peak_above_base"] for m in per_seed],
    }


# --- data: the extract stage's tokenisation, the cache loader's batching --------------------------


@dataclass
class Encoded:
    """One tokenised split: per-example ids (and BERT token types), labels."""

    ids: list[list[int]]
    types: list[list[int]] | None
    labels: np.ndarray

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def encode_split(
    tokenizer: Any,
    examples: Sequence[Any],
    max_length: int,
    causal_fields: Sequence[str] | None = None,
) -> Encoded:
    """The split as stage one tokenises it: ``tokenize_texts`` for encoder-only backbones, or,
    given the task's field names, ``tokenize_causal`` for a decoder-only one."""
    if causal_fields is not None:
        stream = tokenize_causal(tokenizer, causal_fields, examples, max_length)
        return Encoded(stream.ids, None, np.asarray([ex.label for ex in examples]))
    enc = tokenize_texts(tokenizer, examples, max_length)
    labels = np.asarray([ex.label for ex in examples])
    return Encoded(enc.ids, enc.token_types, labels)


# the cache loader's default ``bucket_batches``: length groups of 50 batches
LOADER_BUCKET_BATCHES = 50


def plan_batches(
    lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int, epoch: int
) -> list[list[int]]:
    """The cache loader's batch plan (``cache_store.loader.bucketed_batches``): shuffle, sort
    groups of 50 batches by length, shuffle the batches; evaluation (``shuffle=False``) sorts
    everything by length.

    Deliberately the loader's function rather than stage one's ``plan_batches``: for a fair
    comparison the in-backbone methods batch as the side network trains (fixed batch size,
    little padding), so they pay for no more padding than LST. The random stream is seeded as
    the loader's, per (seed, epoch); the loader holding a split in RAM also shuffles its blocks
    first, so the batches are planned alike but do not hold the same examples.
    """
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    return bucketed_batches(list(lengths), batch_size, LOADER_BUCKET_BATCHES, rng)


def collate(enc: Encoded, idx: Sequence[int], pad_id: int) -> dict[str, Any]:
    """Model inputs for the examples ``idx``, padded by stage one's ``pad``."""
    ids, mask = pad([enc.ids[i] for i in idx], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask.long()}
    if enc.types is not None:
        batch["token_type_ids"] = pad([enc.types[i] for i in idx], 0)[0]
    return batch


# --- the methods inside the backbone --------------------------------------------------------------


class HoulsbyAdapter(nn.Module):
    """Bottleneck adapter (Houlsby et al. 2019): ``x + up(gelu(down(x)))``, near-identity init."""

    def __init__(self, d: int, dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, dim)  # (.., d) -> (.., dim)
        self.up = nn.Linear(dim, d)
        self.act = nn.GELU()
        for lin in (self.down, self.up):  # Houlsby: weights ~ N(0, 1e-2), zero biases
            nn.init.normal_(lin.weight, std=1e-2)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class AdaptedOutput(nn.Module):
    """A BERT ``*SelfOutput`` / ``*Output`` with an adapter after its projection and dropout,
    before the residual sum and LayerNorm (the Houlsby placement)."""

    def __init__(self, inner: nn.Module, adapter: HoulsbyAdapter) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.inner.dropout(self.inner.dense(hidden_states))
        return self.inner.LayerNorm(self.adapter(h) + input_tensor)


def is_head(name: str) -> bool:
    """Parameters of the BERT classification head: the pooler and the classifier."""
    return name.startswith("classifier.") or ".pooler." in name


def is_causal(config: Any) -> bool:
    """A decoder-only (Llama-family) backbone config."""
    return config.model_type in LLAMA_TYPES


def check_backbone(method: str, config: Any) -> None:
    """Refuse, on the config alone, a backbone the method is not implemented for."""
    if method not in IN_BACKBONE or config.model_type in BERT_TYPES:
        return
    if is_causal(config) and method in CAUSAL_METHODS:
        return
    extra = ""
    if method == "prompt" and config.model_type in ("t5", "mt5"):
        extra = " (transformers' T5ForSequenceClassification also refuses inputs_embeds)"
    llama = f" and the Llama family ({', '.join(LLAMA_TYPES)})" if method in CAUSAL_METHODS else ""
    raise BenchError(
        f"method {method!r} supports BERT-family backbones ({', '.join(BERT_TYPES)}){llama}; "
        f"the backbone is {config.model_type!r}{extra}; the LST methods take any backbone"
    )


def apply_method(method: str, model: Any, hp: dict[str, Any]) -> Any:
    """Turn a ``*ForSequenceClassification`` model into what ``method`` trains (in place or
    wrapped); only the method's parameters keep ``requires_grad``."""
    check_backbone(method, model.config)
    has_pooler = getattr(model.base_model, "pooler", None) is not None
    if method == "full":
        model.requires_grad_(True)
        return model
    if method in ("lora", "prompt"):
        from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        to_save = ["pooler"] if has_pooler else None  # the classifier is added by peft itself
        if method == "lora":
            cfg = LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=hp["rank"],
                lora_alpha=hp["alpha"],
                lora_dropout=0.1,
                target_modules=LORA_TARGETS["llama" if is_causal(model.config) else "bert"],
                modules_to_save=to_save,
            )
        else:
            cfg = PromptTuningConfig(
                task_type=TaskType.SEQ_CLS,
                num_virtual_tokens=hp["tokens"],
                prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
                modules_to_save=to_save,
            )
        return get_peft_model(model, cfg)
    model.requires_grad_(False)
    if method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias") or is_head(name))
        return model
    if method == "adapters":
        d = model.config.hidden_size
        for layer in model.base_model.encoder.layer:
            layer.attention.output = AdaptedOutput(
                layer.attention.output, HoulsbyAdapter(d, hp["dim"])
            )
            layer.output = AdaptedOutput(layer.output, HoulsbyAdapter(d, hp["dim"]))
        for name, p in model.named_parameters():
            p.requires_grad_(".adapter." in name or "LayerNorm" in name or is_head(name))
        return model
    raise BenchError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def backbone_parameters(config: Any) -> int:
    """Parameters of the bare backbone (``AutoModel``, pooler included), counted on the meta device."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def load_classifier(path: str, num_labels: int, seed: int, pad_token_id: int | None = None) -> Any:
    """The pretrained backbone with a fresh classification head, initialised under ``seed``.

    ``pad_token_id`` goes to the config where it has none: a causal LM's head reads the last
    token that is not padding (``LlamaForSequenceClassification``), so it must know the pad id.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier.weight MISSING" report is expected
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


# --- one training run of an in-backbone method ---------------------------------------------------


def predict(model: Any, enc: Encoded, spec: Any, batch_size: int, pad_id: int) -> np.ndarray:
    """Class ids (or regression scores) of a split, in length-sorted batches."""
    model.eval()
    order = plan_batches([len(x) for x in enc.ids], batch_size, False, 0, 0)
    out = np.zeros(len(enc.ids), dtype=np.float32 if spec.is_regression else np.int64)
    with torch.no_grad():
        for idx in order:
            logits = model(**collate(enc, idx, pad_id)).logits
            out[idx] = (
                logits.squeeze(-1).float().numpy()
                if spec.is_regression
                else logits.argmax(-1).numpy()
            )
    return out


def evaluate(model: Any, enc: Encoded, spec: Any, batch_size: int, pad_id: int) -> dict:
    from stages.tasks import compute_metrics

    return compute_metrics(spec, predict(model, enc, spec, batch_size, pad_id), enc.labels)


def loss_of(logits: Any, labels: Any, regression: bool) -> Any:
    import torch.nn.functional as F

    if regression:  # as the side network: MSE on the single output
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def train_model(
    model: Any,
    data: dict[str, Encoded],
    spec: Any,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    warmup: int,
    seed: int,
    pad_id: int,
    max_grad_norm: float = 1.0,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``model``'s trainable parameters; best-validation checkpoint scored on test.

    AdamW (weight decay 0, eps 1e-8), linear warm-up and decay, gradient clipping: the settings
    ``stages.train_side`` uses for the side networks. ``max_steps`` stops early (tests).
    """
    train = data["train"]
    lengths = [len(x) for x in train.ids]
    steps_per_epoch = -(-len(train.ids) // batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, linear_schedule(warmup, epochs * steps_per_epoch)
    )
    labels = torch.from_numpy(train.labels)
    history: list[dict[str, Any]] = []
    best_score, best_epoch = -math.inf, 0  # epochs numbered from 1, as in train-side's metrics
    # the best checkpoint goes to disk, as train_side's does: no second copy of the weights in RAM
    best_file = Path(tempfile.mkdtemp(prefix="baseline-best-")) / "best.pt"
    steps = 0
    for epoch in range(epochs):
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        losses = []
        for idx in plan_batches(lengths, batch_size, True, seed, epoch):
            logits = model(**collate(train, idx, pad_id)).logits
            loss = loss_of(logits, labels[idx], spec.is_regression)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        epoch_s, epoch_cpu = time.perf_counter() - t0, time.process_time() - c0
        val = evaluate(model, data["validation"], spec, batch_size * 2, pad_id)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "validation": val,
                "epoch_s": epoch_s,
                "epoch_cpu_s": epoch_cpu,
            }
        )
        if val["score"] > best_score:
            best_score, best_epoch = val["score"], epoch + 1
            trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
            torch.save(trained, best_file)
        if max_steps is not None and steps >= max_steps:
            break
    if best_file.exists():
        best = torch.load(best_file)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best:
                    p.copy_(best[n])
        del best
    shutil.rmtree(best_file.parent, ignore_errors=True)
    test = evaluate(model, data["test"], spec, batch_size * 2, pad_id)
    return {
        "history": history,
        "best_epoch": best_epoch,
        "best_validation": best_score,
        "test": test,
        "steps": steps,
    }


# --- options ---------------------------------------------------------------------------------------


@dataclass
class Options:
    """A validated configuration of one process."""

    method: str
    task: str
    backbone: str
    data_dir: Path
    limit: int | None
    epochs: int
    seeds: list[int]
    batch_size: int
    warmup_steps: int | None  # None: min(500, a tenth of the run)
    max_length: int
    lr: float
    threads: int | None
    hp: dict[str, Any]
    rs: list[int]
    kept_layers: list[int] | None
    fusion: str
    init: str
    one_pass: bool
    cache_root: Path | None
    cache_key: str | None
    tmp: Path | None
    quick: bool
    json: Path | None = None
    memory_mb: int = 4096  # LST: the loader's budget (train_side.memory_mb)
    # extraction: storage dtype, stored states (None: all), side_init factors, Fisher examples
    dtype: str = "float16"
    layers: list[int] | None = None
    extract_rs: list[int] = field(default_factory=lambda: list(EXTRACT_RS))
    fisher_samples: int = 1024

    def warmup(self, n_train: int) -> int:
        total = self.epochs * -(-n_train // self.batch_size)
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(500, total // 10)


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{what}={text!r}; allowed: comma-separated integers") from None


def build_parser() -> Any:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--method", required=True, help=", ".join((*METHODS, "extract")))
    p.add_argument("--task", default=None, help="a GLUE task (default: rte)")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--limit", type=int, default=None, help="first N examples of every split")
    p.add_argument("--epochs", type=int, default=None, help="default: 20 small tasks, 10 others")
    p.add_argument("--seeds", default=None, help="default: 0,1,2 (--quick: 0)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="default: the authors' 500, capped at a tenth of the run's steps",
    )
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default: the method's (HPARAMS)")
    p.add_argument("--threads", type=int, default=None, help="default: 2, lst-cache 1 + loader")
    p.add_argument("--lora-r", type=int, default=HPARAMS["lora"]["rank"])
    p.add_argument("--lora-alpha", type=int, default=HPARAMS["lora"]["alpha"])
    p.add_argument("--adapter-dim", type=int, default=HPARAMS["adapters"]["dim"])
    p.add_argument("--prompt-tokens", type=int, default=HPARAMS["prompt"]["tokens"])
    p.add_argument("--r", default="8", help="LST reduction factor(s); several need --one-pass")
    p.add_argument("--kept-layers", default=None, help="LST: kept backbone blocks, e.g. 1,3,5")
    p.add_argument("--fusion", default="ladder", help="LST: ladder, late or none")
    p.add_argument("--init", default="fisher", help="LST: random, magnitude or fisher")
    p.add_argument(
        "--one-pass",
        action="store_true",
        help="LST: every (r, seed) network in one train_side pass (memory then holds them all)",
    )
    p.add_argument(
        "--memory-mb",
        type=int,
        default=4096,
        help="LST from the cache: RAM for a split's states (kept whole if they fit, else streamed)",
    )
    p.add_argument("--cache-root", type=Path, default=None, help="LST/extract: cache root")
    p.add_argument("--dtype", default="float16", help="extract: storage dtype (float16, int8, ...)")
    p.add_argument("--layers", default=None, help="extract: stored state numbers (default all)")
    p.add_argument(
        "--extract-rs",
        default=",".join(map(str, EXTRACT_RS)),
        help="extract: reduction factors side_init prunes for",
    )
    p.add_argument("--fisher-samples", type=int, default=1024, help="extract: Fisher examples")
    p.add_argument("--cache-key", default=None, help="LST: a committed cache (else: extract)")
    p.add_argument("--tmp", type=Path, default=None, help="where run folders go")
    return p


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Parse and validate; every bad value raises ``BenchError`` naming it and what is allowed."""
    args = build_parser().parse_args(argv)
    method = args.method
    if method not in (*METHODS, "extract"):
        raise BenchError(f"unknown method {method!r}; allowed: {', '.join((*METHODS, 'extract'))}")
    if args.quick:  # a smoke run: what is not given explicitly gets a small value
        args.limit = args.limit or 100
        args.seeds = args.seeds or "0"
        args.epochs = args.epochs or 1
    args.task = args.task or "rte"
    args.seeds = args.seeds or "0,1,2"
    from pipeline.errors import USER_ERRORS
    from stages.tasks import get_task

    try:
        get_task(args.task)
    except USER_ERRORS as e:
        raise BenchError(str(e)) from None
    if args.fusion not in ("ladder", "late", "none"):
        raise BenchError(f"--fusion={args.fusion!r}; allowed: ladder, late, none")
    if args.init not in ("random", "magnitude", "fisher"):
        raise BenchError(f"--init={args.init!r}; allowed: random, magnitude, fisher")
    if args.memory_mb < 16:
        raise BenchError(f"--memory-mb={args.memory_mb}; allowed: an integer >= 16")
    from cache_store.layout import DTYPES

    if args.dtype not in DTYPES:
        raise BenchError(f"--dtype={args.dtype!r}; allowed: {', '.join(DTYPES)}")
    for name in ("limit", "epochs", "batch_size", "threads", "fisher_samples"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise BenchError(f"--{name.replace('_', '-')}={v}; allowed: a positive integer")
    seeds = _ints(args.seeds, "--seeds") or []
    rs = _ints(args.r, "--r") or []
    if not seeds or not rs:
        raise BenchError("--seeds and --r need at least one value")
    if len(rs) > 1 and not args.one_pass:
        raise BenchError(f"--r={args.r!r} gives several networks; add --one-pass")
    if args.tmp is not None:
        args.tmp.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir if args.data_dir is not None else DEFAULT_GLUE
    if not data_dir.is_dir():
        raise BenchError(f"GLUE data folder {data_dir} does not exist; pass --data-dir")
    config = check_backbone_name(method, args.backbone)
    kept_layers = _ints(args.kept_layers, "--kept-layers")
    if method in LST_METHODS:
        check_side(config, rs, kept_layers, args.fusion)
    hp = dict(HPARAMS.get(method, {}))
    hp.update(
        {
            "lora": {"rank": args.lora_r, "alpha": args.lora_alpha},
            "adapters": {"dim": args.adapter_dim},
            "prompt": {"tokens": args.prompt_tokens},
        }.get(method, {})
    )
    lr = args.lr if args.lr is not None else hp.get("lr", 3e-3)
    hp["lr"] = lr
    epochs = args.epochs or paper_epochs(args.task)
    return Options(
        method=method,
        task=args.task,
        backbone=args.backbone,
        data_dir=data_dir,
        limit=args.limit,
        epochs=epochs,
        seeds=seeds,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        max_length=args.max_length,
        lr=lr,
        threads=args.threads,
        memory_mb=args.memory_mb,
        hp=hp,
        rs=rs,
        kept_layers=kept_layers,
        fusion=args.fusion,
        init=args.init,
        one_pass=args.one_pass,
        cache_root=args.cache_root,
        cache_key=args.cache_key,
        tmp=args.tmp,
        quick=args.quick,
        json=args.json,
        dtype=args.dtype,
        layers=_ints(args.layers, "--layers"),
        extract_rs=_ints(args.extract_rs, "--extract-rs") or list(EXTRACT_RS),
        fisher_samples=args.fisher_samples,
    )


def check_backbone_name(method: str, name: str) -> Any:
    """Unknown backbones and unsupported families fail here, on the config, before any weights;
    returns the backbone's config."""
    from ladder.backbones import family_of, load_config_only
    from pipeline.errors import USER_ERRORS

    try:
        config = load_config_only(name)
        family_of(config)
    except USER_ERRORS as e:
        raise BenchError(str(e)) from None
    if method in IN_BACKBONE:
        check_backbone(method, config)
    return config


def check_side(config: Any, rs: list[int], kept: list[int] | None, fusion: str) -> None:
    """Reduction factors and kept layers against the backbone, before any extraction."""
    from ladder.side import SideConfig
    from pipeline.errors import USER_ERRORS

    try:
        for r in rs:
            side = SideConfig(
                reduction_factor=r,
                kept_layers=None if kept is None else tuple(kept),
                fusion=fusion,
            )
            side.validate(config)
    except USER_ERRORS as e:
        raise BenchError(str(e)) from None


# --- runs ------------------------------------------------------------------------------------------


def _summary(tests: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(tests),
        "std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
    }


def _epoch_times(histories: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """First epoch (it also reads a cache into memory) and the median of the later ones."""
    first = [h[0]["epoch_s"] for h in histories if h]
    later = [e["epoch_s"] for h in histories for e in h[1:]]
    return {
        "epoch_s_first": statistics.median(first) if first else None,
        "epoch_s": statistics.median(later or first) if first else None,
        "epoch_s_all": [[e["epoch_s"] for e in h] for h in histories],
    }


def run_in_backbone(opt: Options) -> dict[str, Any]:
    """Full fine-tuning or a PETL method inside the backbone: one fresh model per seed."""
    from transformers import AutoTokenizer

    from ladder.backbones import family_of, load_config_only, pad_causal, resolve_backbone
    from stages.tasks import load_task

    torch.set_num_threads(opt.threads or 2)
    path = resolve_backbone(opt.backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = load_config_only(opt.backbone)
    causal = is_causal(config)
    pad_causal(tokenizer, family_of(config))  # as the product's backbones do
    task = load_task(opt.task, data_dir=opt.data_dir, limit=opt.limit)
    spec = task.spec
    fields = spec.text_fields if causal else None
    data = {s: encode_split(tokenizer, ex, opt.max_length, fields) for s, ex in task.splits.items()}
    warmup = opt.warmup(len(data["train"].ids))
    pad_id = tokenizer.pad_token_id or 0
    seeds, memory = [], []
    trainable = 0
    for seed in opt.seeds:
        model = load_classifier(path, spec.num_labels, seed, tokenizer.pad_token_id)
        model = apply_method(opt.method, model, opt.hp)
        trainable = trainable_parameters(model)
        meter = PeakMemory()
        meter.start()
        c0, t0 = time.process_time(), time.perf_counter()
        out = train_model(
            model,
            data,
            spec,
            lr=opt.lr,
            epochs=opt.epochs,
            batch_size=opt.batch_size,
            warmup=warmup,
            seed=seed,
            pad_id=pad_id,
        )
        out["cpu_s"] = time.process_time() - c0
        out["run_s"] = time.perf_counter() - t0  # training and every evaluation
        memory.append(meter.stop())
        out["seed"] = seed
        seeds.append(out)
        print(
            f"{opt.method} {opt.task} seed {seed}: test {out['test']['score']:.2f}, "
            f"epoch {statistics.median(h['epoch_s'] for h in out['history']):.1f} s, "
            f"peak +{memory[-1]['peak_above_base'] / 2**20:.0f} MB",
            flush=True,
        )
        del model
        gc.collect()
    tests = [s["test"]["score"] for s in seeds]
    return {
        "trainable_parameters": trainable,
        "backbone_parameters": backbone_parameters(config),
        "memory": merge_memory(memory),
        **_epoch_times([s["history"] for s in seeds]),
        "cpu_s_per_seed": statistics.mean(s["cpu_s"] for s in seeds),
        "run_s_per_seed": statistics.mean(s["run_s"] for s in seeds),
        "test": tests,
        **_summary(tests),
        "train_tokens": data["train"].n_tokens,
        "eval_tokens": {s: data[s].n_tokens for s in ("validation", "test")},
        "n_train": len(data["train"].ids),
        "warmup_steps": warmup,
        "threads": torch.get_num_threads(),
        "seeds": seeds,
    }


def _lst_config(opt: Options, runs: Path) -> Any:
    from pipeline.config import Config, apply_overrides

    root = opt.cache_root or Path(tempfile.mkdtemp(prefix="lst-cache-", dir=opt.tmp))
    return apply_overrides(
        Config(),
        {
            "task.name": opt.task,
            "task.data_dir": str(opt.data_dir),
            "task.limit": opt.limit,
            "backbone.name": opt.backbone,
            "backbone.max_length": opt.max_length,
            "cache.root": str(root),
            "extract.device": "cpu",
            "extract.side_init": ["magnitude", "fisher"],
            "extract.reduction_factors": opt.extract_rs,
            "extract.fisher_samples": opt.fisher_samples,
            "extract.layers": opt.layers,
            "cache.dtype": opt.dtype,
            "train_side.reduction_factors": opt.rs,
            "train_side.seeds": opt.seeds,
            "train_side.learning_rates": [opt.lr],
            "train_side.batch_size": opt.batch_size,
            "train_side.epochs": opt.epochs,
            "train_side.kept_layers": opt.kept_layers,
            "train_side.fusion": opt.fusion,
            "train_side.init": opt.init,
            "train_side.run_dir": str(runs),
            "train_side.memory_mb": opt.memory_mb,
        },
    )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_extract(opt: Options) -> dict[str, Any]:
    """Stage one once: its wall time (side_init apart), the cache's size on disk, peak memory."""
    from stages.extract import extract

    cfg = _lst_config(opt, Path("runs"))  # extract writes no run folder
    meter = PeakMemory()
    meter.start()
    t0 = time.perf_counter()
    res = extract(cfg, progress=False)
    wall = time.perf_counter() - t0
    mem = meter.stop()
    timings = res.manifest.get("timings", {})
    side_init = timings.get("side_init_s", 0.0)
    total = timings.get("total_s", wall)
    return {
        "cache_key": res.key,
        "cache_root": cfg.cache_root,
        "reused": res.reused,
        "extract_total_s": total,
        "side_init_s": side_init,
        "fisher_s": timings.get("fisher_s"),  # the Fisher pass alone, shared by every r
        "extract_states_s": total - side_init,
        "wall_s": wall,
        "cache_bytes": dir_bytes(Path(cfg.cache_root) / res.key),
        "train_tokens": res.manifest["splits"]["train"]["streams"]["enc"]["n_tokens"],
        "all_tokens": sum(s["streams"]["enc"]["n_tokens"] for s in res.manifest["splits"].values()),
        "dtype": cfg.cache.dtype,
        "codec": cfg.cache.codec,
        "side_init": res.manifest.get("side_init", {}),
        "memory": mem,
    }


def extract_in_child(opt: Options) -> dict[str, Any]:
    """Stage one in a process of its own, so that this process's memory stays its own."""
    out = Path(tempfile.mkdtemp(prefix="lst-extract-", dir=opt.tmp)) / "extract.json"
    root = opt.cache_root or Path(tempfile.mkdtemp(prefix="lst-cache-", dir=opt.tmp))
    cmd = [
        sys.executable,
        "-m",
        "bench.baselines",
        "--method",
        "extract",
        "--task",
        opt.task,
        "--backbone",
        opt.backbone,
        "--data-dir",
        str(opt.data_dir),
        "--max-length",
        str(opt.max_length),
        "--cache-root",
        str(root),
        "--json",
        str(out),
    ]
    cmd += ["--dtype", opt.dtype, "--fisher-samples", str(opt.fisher_samples)]
    cmd += ["--extract-rs", ",".join(map(str, opt.extract_rs))]
    if opt.layers is not None:
        cmd += ["--layers", ",".join(map(str, opt.layers))]
    if opt.limit is not None:
        cmd += ["--limit", str(opt.limit)]
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise BenchError(f"extraction of {opt.task!r} failed (see the lines above)")
    figures = json.loads(out.read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    return figures


def loader_bytes(cache: Any, layers: list[int], budget: int = 4 << 30) -> int:
    """Bytes of cached states the train-side loaders keep in RAM (splits under the 4 GiB budget)."""
    m = cache.manifest
    from cache_store.layout import stored_numpy_dtype

    itemsize = stored_numpy_dtype(m["dtype"]).itemsize
    total = 0
    for split in ("train", "validation", "test"):
        n_tokens = m["splits"][split]["streams"]["enc"]["n_tokens"]
        n = n_tokens * len(layers) * m["backbone"]["d_model"] * itemsize
        total += n if n <= budget else 0
    return total


def run_lst(opt: Options) -> dict[str, Any]:
    """LST through ``stages.train_side``: from the cache, or online (backbone live, dropout on)."""
    from ladder.backbones import load_backbone
    from ladder.side import build_side_network
    from pipeline.config import apply_overrides
    from stages.train_side import backbone_config_of, resolve_cache, side_config, task_spec_of
    from stages.train_side import train_side as train_side_fn

    online = opt.method == "lst-online"
    runs = Path(tempfile.mkdtemp(prefix="lst-runs-", dir=opt.tmp))
    own_root = opt.cache_root is None  # a cache made for this run alone is removed after it
    extraction = None
    if opt.cache_key is None:
        extraction = extract_in_child(opt)
        opt.cache_key, opt.cache_root = extraction["cache_key"], Path(extraction["cache_root"])
    cfg = _lst_config(opt, runs)
    threads = opt.threads or (2 if online else None)  # the live backbone gets both cores
    cfg = apply_overrides(cfg, {"train_side.threads": threads})
    cache = resolve_cache(cfg, opt.cache_key)
    spec, bcfg = task_spec_of(cache), backbone_config_of(cache)
    n_train = cache.manifest["splits"]["train"]["n_examples"]
    warmup = opt.warmup(n_train)
    cfg = apply_overrides(cfg, {"train_side.warmup_steps": warmup})
    needed = build_side_network(bcfg, side_config(cfg, opt.rs[0], spec)).needed_layers()
    backbone = load_backbone(opt.backbone) if online else None
    groups = [opt.seeds] if opt.one_pass else [[s] for s in opt.seeds]
    memory, networks, run_s = [], {}, []
    for seeds in groups:
        gcfg = apply_overrides(cfg, {"train_side.seeds": seeds})
        meter = PeakMemory()
        meter.start()
        t0 = time.perf_counter()
        res = train_side_fn(
            gcfg,
            cache_key=opt.cache_key,
            run_name=f"{opt.method}-{opt.task}-s{'_'.join(map(str, seeds))}",
            online=backbone,
            online_dropout=True,
            progress=False,
        )
        run_s.append(time.perf_counter() - t0)
        memory.append(meter.stop())
        networks.update(res.metrics["networks"])
        for name in res.metrics["networks"]:
            net = res.metrics["networks"][name]
            print(
                f"{opt.method} {opt.task} {name}: test {net['test']['score']:.2f}, "
                f"peak +{memory[-1]['peak_above_base'] / 2**20:.0f} MB",
                flush=True,
            )
    by_r: dict[str, Any] = {}
    for r in opt.rs:
        nets = [v for v in networks.values() if v["r"] == r]
        tests = [v["test"]["score"] for v in nets]
        by_r[str(r)] = {
            "trainable_parameters": nets[0]["trainable_parameters"],
            "test": tests,
            **_summary(tests),
            **_epoch_times([v["epochs"] for v in nets]),
        }
    main = by_r[str(opt.rs[0])]
    out = {
        "trainable_parameters": main["trainable_parameters"],
        "backbone_parameters": backbone_parameters(bcfg),
        "memory": merge_memory(memory),
        "epoch_s": main["epoch_s"],
        "epoch_s_first": main["epoch_s_first"],
        "epoch_s_all": main["epoch_s_all"],
        "test": main["test"],
        "mean": main["mean"],
        "std": main["std"],
        "by_r": by_r,
        "run_s_per_seed": sum(run_s) / len(opt.seeds),  # one pass: its time shared out
        "cache_key": opt.cache_key,
        "cache_in_ram_bytes": 0 if online else loader_bytes(cache, needed, opt.memory_mb << 20),
        "n_train": n_train,
        "train_tokens": cache.manifest["splits"]["train"]["streams"]["enc"]["n_tokens"],
        "eval_tokens": {
            s: cache.manifest["splits"][s]["streams"]["enc"]["n_tokens"]
            for s in ("validation", "test")
        },
        "warmup_steps": warmup,
        "threads": torch.get_num_threads(),
        "networks": networks,
        "side": {
            "rs": opt.rs,
            "kept_layers": opt.kept_layers,
            "fusion": opt.fusion,
            "init": opt.init,
            "one_pass": opt.one_pass,
        },
    }
    if extraction is not None:
        out["extraction"] = extraction
    if opt.tmp is None:
        shutil.rmtree(runs, ignore_errors=True)
    if own_root:
        shutil.rmtree(opt.cache_root, ignore_errors=True)
    return out


def run(opt: Options) -> dict[str, Any]:
    if opt.method == "extract":
        return run_extract(opt)
    if opt.method in LST_METHODS:
        return run_lst(opt)
    return run_in_backbone(opt)


def figures_of(opt: Options, result: dict[str, Any]) -> dict[str, Any]:
    settings = {
        k: v
        for k, v in vars(opt).items()
        if k not in ("data_dir", "cache_root", "tmp") and not isinstance(v, Path)
    }
    return {
        "method": opt.method,
        "task": opt.task,
        "settings": settings,
        "load_average_at_end": os.getloadavg(),  # the machine is shared: how busy it was
        **result,
    }


def print_summary(fig: dict[str, Any]) -> None:
    if fig["method"] == "extract":
        print(
            table(
                ["extract", "value"],
                [
                    ["states (s)", f"{fig['extract_states_s']:.1f}"],
                    ["side_init (s)", f"{fig['side_init_s']:.1f}"],
                    ["cache on disk (MB)", f"{fig['cache_bytes'] / 2**20:.1f}"],
                    ["peak RSS (MB)", f"{fig['memory']['abs_peak_rss'] / 2**20:.0f}"],
                ],
            )
        )
        return
    m = fig["memory"]
    pct = 100 * fig["trainable_parameters"] / fig["backbone_parameters"]
    print(
        table(
            ["method", "trainable %", "peak above base MB", "abs peak MB", "epoch s", "test"],
            [
                [
                    fig["method"],
                    f"{pct:.2f}",
                    f"{m['peak_above_base'] / 2**20:.0f}",
                    f"{m['abs_peak_rss'] / 2**20:.0f}",
                    f"{fig['epoch_s']:.1f}",
                    f"{fig['mean']:.1f} ± {fig['std']:.1f}",
                ]
            ],
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    from pipeline.errors import USER_ERRORS

    try:
        opt = parse_options(argv)
        result = run(opt)
    except (BenchError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    fig = figures_of(opt, result)
    print_summary(fig)
    write_json(opt.json, "baselines", fig)


if __name__ == "__main__":
    main()
