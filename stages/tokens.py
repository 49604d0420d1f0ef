"""Token streams: the tokenised examples of a split, and the length-grouped plans over them.

A *stream* is one token axis of a split: ``enc`` (the encoder input; for a decoder-only causal
LM, its input tokens), and for T5 ``dec`` (decoder inputs under teacher forcing on the verbalised
target) and ``cand_K`` (decoder inputs for label string K, validation and test only). Stage one
runs the backbone over them; evaluation and prediction tokenise new text the same way, so the
live backbone sees what stage one saw.

Templates (the cache key records :func:`template_id`):

* ``pair`` (encoder-only): the text or text pair as the tokenizer joins them ([CLS] a [SEP] b).
* ``t5-prefix`` (T5): the authors' ``"<task> key1: text1 key2: text2"`` (``t5_source``).
* ``fields`` (decoder-only, Llama family): ``"key1: text1 key2: text2"``, the task's own field
  names (:func:`causal_text`, e.g. ``"sentence1: ... sentence2: ..."``; SST-2: ``"sentence:
  ..."``), tokenised with the tokenizer's own special tokens (Llama: BOS first; SmolLM2: none)
  and truncated from the end to the max length. No answer prompt: the side network reads the
  last real token.
* ``fields-answer`` (decoder-only, ``train_side.head: lm``, a verbaliser): the ``fields`` text,
  truncated to leave room, then the answer prompt :data:`ANSWER_PROMPT` (``" Answer:"``,
  tokenised on its own without special tokens): ``"sentence: ... Answer:"``. The side network
  reads the last real token (the prompt's colon) and scores each label word's first token
  there (:func:`label_token_ids`: the token that follows ``"Answer:"`` in ``"Answer: <word>"``).
* ``prompt-answer`` (generation tasks, decoder-only): ``enc`` is the prompt's tokens (with the
  tokenizer's special tokens), then the answer's (without), then the end-of-sequence token:
  teacher forcing, so the cache holds the states of prompt and answer. ``targets`` (aligned with
  the ids) are -100 on the prompt and the token itself on the answer and EOS; the side network
  predicts position t + 1 from t. Too long: the answer (+ EOS) is kept, the prompt loses its
  first tokens.
* ``t5-caption`` (captioning, T5): ``enc`` is :data:`stages.tasks.CAPTION_PROMPT` (``"caption:"``)
  for every example, the image reaching the side network only; ``dec`` is teacher forcing on the
  example's caption (``Example.answer``: train, each caption; validation and test, the image's
  first reference), truncated to the max length; no candidate streams (captions are generated,
  ``stages.evaluate``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cache_store import layout
from ladder.families import CAUSAL_FAMILIES
from stages.errors import StageError
from stages.tasks import TaskData, t5_candidates, t5_source, t5_target, verbalised_labels

if TYPE_CHECKING:
    from ladder.backbones import Backbone
    from stages.tasks import Example, TaskSpec


@dataclass
class Stream:
    """One token axis of a split: per-example token ids, and T5 decoder targets."""

    name: str
    ids: list[list[int]]  # encoder: input ids; decoder: decoder *input* ids (shifted right)
    token_types: list[list[int]] | None = None
    targets: list[list[int]] | None = None  # decoder: the labels the side network predicts
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        lengths = np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])


TEMPLATE_VERSION = 1  # bump when a tokenisation template changes (it is part of the cache key)


ANSWER_PROMPT = " Answer:"  # after the fields text, template fields-answer (a verbaliser)


def template_id(backbone: Backbone, spec: TaskSpec | None = None, answer: bool = False) -> str:
    """The template's name in the cache key: ``pair-v1``, ``t5-prefix-v1``, ``t5-caption-v1``
    (captioning), ``fields-v1``,
    (``answer``: a decoder-only verbaliser's) ``fields-answer-v1`` or (generation tasks)
    ``prompt-answer-v1``."""
    if spec is not None and spec.generation:
        kind = "prompt-answer"
    elif spec is not None and spec.captioning and backbone.encoder_decoder:
        kind = "t5-caption"
    elif backbone.encoder_decoder:
        kind = "t5-prefix"
    elif getattr(backbone, "causal", False):
        kind = "fields-answer" if answer else "fields"
    else:
        kind = "pair"
    return f"{kind}-v{TEMPLATE_VERSION}"


def answer_template(head: str, spec: TaskSpec) -> bool:
    """Whether a classification task is tokenised with the answer prompt: ``train_side.head``
    ``lm`` (a verbaliser) on a task that is not a generation task (those have their own)."""
    return head == "lm" and not spec.generation


def check_verbaliser(head: str, spec: TaskSpec, family: str, backbone_name: str) -> None:
    """``head: lm`` on a classification task needs a decoder-only backbone and label names."""
    if not answer_template(head, spec):
        return
    if spec.is_regression:
        raise StageError(
            f"--head lm scores label words; task {spec.name!r} is a regression task; allowed: "
            "--head cls"
        )
    if family not in CAUSAL_FAMILIES:
        raise StageError(
            f"--head lm needs a decoder-only causal LM backbone (its LM head scores the label "
            f"words); {backbone_name!r} is {family}; allowed: --head cls, or the Llama family "
            "(e.g. smollm2-135m) or GPT-2"
        )


def label_token_ids(tokenizer: Any, spec: TaskSpec) -> list[int]:
    """Each label word's first token as it follows the answer prompt: the token after
    ``"Answer:"`` in ``"Answer: <word>"`` (:func:`stages.tasks.verbalised_labels`). Two labels
    whose words start with the same token cannot be told apart: one error line names them."""
    words = verbalised_labels(spec)
    prompt = ANSWER_PROMPT.strip()
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    firsts = []
    for word in words:
        ids = tokenizer(f"{prompt} {word}", add_special_tokens=False)["input_ids"]
        if ids[: len(base)] != base or len(ids) <= len(base):
            raise StageError(
                f"label word {word!r} does not tokenise after {prompt!r} as a token of its own "
                "start; allowed: label names that start a new token"
            )
        firsts.append(int(ids[len(base)]))
    for i, t in enumerate(firsts):
        j = firsts.index(t)
        if j != i:
            raise StageError(
                f"labels {spec.labels[j]!r} and {spec.labels[i]!r} of task {spec.name!r} start "
                f"with the same token ({tokenizer.convert_ids_to_tokens(t)!r}, id {t}): the LM "
                "cannot score them apart; allowed: --head cls, or label names that start "
                "differently"
            )
    return firsts


def causal_text(field_names: Sequence[str], ex: Example) -> str:
    """A decoder-only backbone's input: ``"key1: text1 key2: text2"`` in the task's field names."""
    return " ".join(f"{key}: {text}" for key, text in zip(field_names, ex.texts, strict=True))


def tokenize_split(
    backbone: Backbone, data: TaskData, split: str, max_length: int, answer: bool = False
) -> dict[str, Stream]:
    """The streams of one split: ``enc``, and for T5 ``dec`` plus ``cand_K`` for evaluation;
    ``answer``: a decoder-only backbone's classification input ends with the answer prompt
    (template ``fields-answer``, :func:`answer_template`)."""
    spec, examples = data.spec, data.splits[split]
    tok = backbone.tokenizer
    if spec.generation:
        check_generation_backbone(backbone.family, backbone.name)
        return {"enc": generation_stream(tok, examples, max_length)}
    if getattr(backbone, "causal", False):
        if answer:
            texts = [causal_text(spec.text_fields, ex) for ex in examples]
            return {"enc": answer_stream(tok, texts, max_length)}
        return {"enc": tokenize_causal(tok, spec.text_fields, examples, max_length)}
    if not backbone.encoder_decoder:
        return {"enc": tokenize_texts(tok, examples, max_length)}
    sources = [t5_source(spec, ex) for ex in examples]
    enc = tok(sources, truncation=True, max_length=max_length)
    streams = {"enc": Stream("enc", enc["input_ids"])}
    start = backbone.config.decoder_start_token_id or 0

    def teacher(targets: list[list[int]], name: str) -> Stream:
        return Stream(name, [[start, *t[:-1]] for t in targets], targets=targets)

    if spec.captioning:  # template t5-caption: the caption under teacher forcing, no candidates
        captions = [ex.answer or "" for ex in examples]
        targets = tok(captions, truncation=True, max_length=max_length)["input_ids"]
        streams["dec"] = teacher(targets, "dec")
        return streams

    targets = tok([t5_target(spec, ex.label) for ex in examples])["input_ids"]
    streams["dec"] = teacher(targets, "dec")
    if split != "train":
        for k, cand in enumerate(t5_candidates(spec)):
            ids = tok([cand])["input_ids"][0]
            streams[layout.cand_stream(k)] = teacher([ids] * len(examples), layout.cand_stream(k))
    return streams


def answer_stream(tokenizer: Any, texts: Sequence[str], max_length: int) -> Stream:
    """Template ``fields-answer``: each text (with the tokenizer's special tokens) truncated from
    the end to leave room for the answer prompt's tokens, then those tokens."""
    suffix = tokenizer(ANSWER_PROMPT, add_special_tokens=False)["input_ids"]
    room = max_length - len(suffix)
    if room < 1:
        raise StageError(
            f"--max-length {max_length} leaves no room for the text before the answer prompt "
            f"{ANSWER_PROMPT.strip()!r} ({len(suffix)} tokens); allowed: at least {len(suffix) + 1}"
        )
    ids = tokenizer(list(texts), truncation=True, max_length=room)["input_ids"]
    return Stream("enc", [[*x, *suffix] for x in ids])


def check_generation_backbone(family: str, name: str) -> None:
    """A generation task needs a decoder-only causal backbone (its LM head generates)."""
    if family not in CAUSAL_FAMILIES:
        raise StageError(
            f"a generation task needs a decoder-only causal LM backbone; {name!r} is {family} "
            "(allowed: the Llama family (Llama, SmolLM2, Mistral, Qwen2, e.g. smollm2-135m) "
            "or GPT-2)"
        )


def end_token_id(tokenizer: Any) -> int:
    """The token that ends an answer: the tokenizer's end-of-sequence token ([SEP] without one)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    if eos is None:
        raise StageError("the tokenizer has no end-of-sequence token; a generation task needs one")
    return int(eos)


def prompt_ids(tokenizer: Any, prompt: str, max_length: int) -> list[int]:
    """A prompt's tokens as generation feeds them (the template's), its last ``max_length - 1``."""
    ids = tokenizer(prompt)["input_ids"]
    return ids[-(max_length - 1) :] if max_length > 1 else ids[-1:]


def generation_stream(tokenizer: Any, examples: Sequence[Example], max_length: int) -> Stream:
    """The ``enc`` stream of a generation task (template ``prompt-answer``): prompt + answer + EOS
    ids, with targets -100 on the prompt (see the module docstring)."""
    eos = end_token_id(tokenizer)
    prompts = tokenizer([ex.texts[0] for ex in examples])["input_ids"]
    answers = tokenizer([ex.answer or "" for ex in examples], add_special_tokens=False)
    ids, targets = [], []
    for p, a in zip(prompts, answers["input_ids"], strict=True):
        tail = [*a, eos][: max(1, max_length - 1)]
        p = p[-(max_length - len(tail)) :] if max_length > len(tail) else p[-1:]
        ids.append([*p, *tail])
        targets.append([-100] * len(p) + tail)
    return Stream("enc", ids, targets=targets)


def tokenize_causal(
    tokenizer: Any, field_names: Sequence[str], examples: Sequence[Example], max_length: int
) -> Stream:
    """The ``enc`` stream of a decoder-only backbone: each example as :func:`causal_text`,
    truncated to ``max_length`` tokens. Like :func:`tokenize_texts`, it needs only the tokenizer
    (the benchmarks' baselines run the causal model themselves)."""
    texts = [causal_text(field_names, ex) for ex in examples]
    return Stream("enc", tokenizer(texts, truncation=True, max_length=max_length)["input_ids"])


def tokenize_texts(tokenizer: Any, examples: Sequence[Example], max_length: int) -> Stream:
    """The ``enc`` stream of an encoder-only backbone: each example's text (or text pair) as one
    input, truncated to ``max_length`` tokens, with the tokenizer's token types where it has them.

    This is what ``tokenize_split`` does for BERT, RoBERTa, ELECTRA and BART; it needs only the
    tokenizer, for code that runs the backbone's model itself (the benchmarks' baselines).
    """
    columns = list(zip(*(ex.texts for ex in examples), strict=True))
    enc = tokenizer(*columns[:2], truncation=True, max_length=max_length)
    return Stream("enc", enc["input_ids"], token_types=enc.get("token_type_ids"))


def plan_segments(offsets: np.ndarray, segment_tokens: int) -> list[int]:
    """Example indices where segments start (plus the end): about one shard of tokens each."""
    starts, n = [0], len(offsets) - 1
    while starts[-1] < n:
        target = offsets[starts[-1]] + segment_tokens
        nxt = int(np.searchsorted(offsets, target, side="left"))
        starts.append(min(n, max(nxt, starts[-1] + 1)))
    return starts


def plan_batches(lengths: list[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Length-grouped batches (indices into ``lengths``): longest first, padded tokens bounded."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * width > batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@dataclass
class PaddedBatch:
    """One batch of a stream as stage one runs it, padded, on the CPU."""

    index: list[int]  # example indices into the split, in batch order
    ids: torch.Tensor  # [B, T] long, padded with the tokenizer's pad id
    mask: torch.Tensor  # [B, T] bool, True on real tokens
    token_types: torch.Tensor | None  # [B, T] long (BERT pairs), padded with 0


def padded_batches(
    stream: Stream, lo: int, hi: int, batch_tokens: int, max_batch_size: int, pad_id: int
) -> Iterator[PaddedBatch]:
    """The batches stage one runs over examples [lo, hi) of ``stream``: ``plan_batches`` on their
    lengths (a function of the lengths alone), each padded with ``pad``."""
    lengths = [stream.length(i) for i in range(lo, hi)]
    for batch in plan_batches(lengths, batch_tokens, max_batch_size):
        idx = [lo + b for b in batch]
        ids, mask = pad([stream.ids[i] for i in idx], pad_id)
        types = None
        if stream.token_types is not None:
            types = pad([stream.token_types[i] for i in idx], 0)[0]
        yield PaddedBatch(idx, ids, mask, types)


def pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``seqs`` right-padded with ``value`` to the longest: ids [B, T] (long), mask [B, T] (bool)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = True
    return ids, mask
