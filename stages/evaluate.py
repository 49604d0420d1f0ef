"""``pipeline predict`` and ``pipeline evaluate``: backbone plus a trained side network on new text.

    pipeline predict  --run runs/<folder> "A man is playing a guitar." "A man plays music."
    pipeline predict  --run runs/<folder> --input pairs.jsonl --json
    pipeline evaluate --run runs/<folder> --split test --data-dir ../shared/data/glue
    pipeline evaluate --run runs/<rte,mrpc folder> --json          # every task, and the average
    pipeline predict  --run runs/<rte,mrpc folder> --task mrpc "A man plays." "A man plays music."

A multi-task run's network (``stages.multitask``) is rebuilt whole, a head per task, and used one
task at a time (``Predictor(..., task=...)``, :meth:`Predictor.select`).

These need the backbone (the text is new, so there is no cache for it): it runs live in eval mode
and feeds the side network exactly the states stage one would have stored. Generation tasks
generate greedily (``ladder.generation``: the backbone and the side network each with their KV
cache), up to EOS or ``MAX_NEW_TOKENS``; ``evaluate`` scores the exact match of the answer tokens.

Vision-and-language runs (``backbone.vision`` set) also need the visual tokens: ``evaluate``
takes the run's cache's image features when the cache holds the split being scored (same
content), else runs the frozen vision encoder once per distinct image; ``predict`` reads
``--input`` rows with ``question`` and ``image`` (a file path) and runs the encoder on them.

    pipeline predict  --run runs/<vqa folder> --input questions.jsonl --json

Captioning runs (``coco-caption``, T5 with a vision encoder) generate greedily with the live T5
backbone (``ladder.generation.greedy_generate_t5``: the backbone decoder's states depend on the
generated prefix, so they cannot come from the cache), up to EOS or ``CAPTION_MAX_NEW_TOKENS``;
``evaluate`` scores CIDEr-D (``stages.vl_metrics.cider``) against each image's references
(validation or test: one example per image); ``predict`` captions ``--input`` rows with ``image``.

    pipeline evaluate --run runs/<coco-caption folder> --split test --json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from cache_store.images import ImageTable
from cache_store.reader import open_cache
from ladder.backbones import Backbone, load_backbone
from ladder.generation import beam_generate_t5, greedy_generate, greedy_generate_t5
from ladder.side import SideConfig, build_side_network
from ladder.vision import (
    VisionEncoder,
    build_visual_side_network,
    load_vision_encoder,
    saved_visual_fusion,
    saved_visual_readout,
)
from stages.batches import Batch
from stages.config import BackboneConfig
from stages.errors import StageError
from stages.images import encode_images
from stages.multitask import saved_network, select_task, task_of_list
from stages.tasks import (
    Example,
    TaskConfig,
    TaskData,
    TaskSpec,
    compute_metrics,
    jsonl_rows,
    load_task_of,
    read_table,
    spec_of,
    t5_candidates,
)
from stages.tokens import Stream, end_token_id, pad, prompt_ids, tokenize_split
from stages.train_side import (
    batch_outputs,
    load_into,
    online_states,
    predictions_of,
    stream_layers,
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise StageError(
            f"{path} is not valid JSON (truncated or corrupt); retrain the run with train-side "
            "or restore the file"
        ) from None


def unfinished(folder: Path, name: str) -> str | None:
    """Why network ``name`` of a run folder is not finished (no test figures), or None."""
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        return "it has no metrics.json"
    net = _read_json(metrics_file).get("networks", {}).get(name)
    if net is None:
        return f"metrics.json has no network {name!r}"
    if net.get("stopped"):
        return f"network {name} {net['stopped']}"
    if net.get("test") is None:
        signature = folder / "run.json"
        total = _read_json(signature).get("epochs") if signature.is_file() else None
        return (
            f"network {name} finished {len(net.get('epochs', []))} of {total or '?'} epochs "
            "and has no test figures (killed, or still training)"
        )
    return None


def _run_config(folder: Path) -> dict[str, Any]:
    if not (folder / "config.json").is_file():
        raise StageError(f"{folder} is not a train-side run folder (no config.json)")
    return _read_json(folder / "config.json")


def run_tasks(run: str | Path) -> list[str]:
    """The task(s) a run folder trained: one, or a multi-task run's list in its order."""
    return TaskConfig.model_validate(_run_config(Path(run))["task"]).names


def load_trained(
    run: str | Path, network: str | None = None, *, allow_unfinished: bool = False
) -> tuple[TaskConfig, BackboneConfig, dict[str, Any], Path]:
    """A run folder's task(s) and backbone, and the chosen network's saved config and weights.

    An unfinished run (killed, still training, or a network stopped early) is refused unless
    ``allow_unfinished``: its best checkpoint is not the run's answer yet.
    """
    folder = Path(run)
    saved_cfg = _run_config(folder)
    task = TaskConfig.model_validate(saved_cfg["task"])
    backbone = BackboneConfig.model_validate(saved_cfg["backbone"])
    configs = sorted(folder.glob("*.config.json"))
    if not configs:
        raise StageError(f"run folder {folder} has no trained network yet")
    names = [p.name.removesuffix(".config.json") for p in configs]
    name = network or names[0]
    if name not in names:
        raise StageError(f"run folder {folder} has no network {name!r}; it has {', '.join(names)}")
    if not allow_unfinished and (why := unfinished(folder, name)):
        raise StageError(
            f"run {folder} is unfinished: {why}; run train-side again to finish it, or pass "
            "--allow-unfinished to use its best checkpoint so far"
        )
    return (
        task,
        backbone,
        _read_json(folder / f"{name}.config.json"),
        folder / f"{name}.best.safetensors",
    )


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A network's ``*.best.safetensors``; one line naming the file when it is unreadable."""
    if not path.is_file():
        raise StageError(f"{path} is missing; retrain the run with train-side")
    try:
        return load_file(str(path))
    except Exception as e:
        raise StageError(
            f"{path} cannot be read ({' '.join(str(e).split()) or type(e).__name__}; truncated or "
            "corrupt?); retrain the run with train-side or restore the file"
        ) from None


def batches_of(
    streams: dict[str, Stream],
    labels: np.ndarray,
    batch_size: int,
    pad_id: int,
    order: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """Padded batches of token ids (no states: the live backbone computes them), in ``order``
    (default: as given); ``Batch.index`` holds each row's example index."""
    order = list(range(len(labels))) if order is None else list(order)
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        ids, masks, targets = {}, {}, {}
        for name, s in streams.items():
            ids[name], masks[name] = pad([s.ids[i] for i in idx], pad_id)
            if s.targets is not None:
                t, _ = pad([s.targets[i] for i in idx], -100)
                targets[name] = t
        types = None
        if streams["enc"].token_types is not None:
            types = pad([streams["enc"].token_types[i] for i in idx], 0)[0]
        yield Batch(
            torch.tensor(idx), torch.from_numpy(labels[idx]), {}, masks, ids, targets, types
        )


class Predictor:
    """A live backbone and one trained side network, in eval mode.

    A multi-task run's network is rebuilt whole (the shared body, every task's head) and
    predicts one task at a time: ``task`` (default: the run's first), then :meth:`select`.
    """

    def __init__(
        self,
        run: str | Path,
        network: str | None = None,
        device: str = "cpu",
        *,
        task: str | None = None,
        allow_unfinished: bool = False,
        num_beams: int = 1,
    ) -> None:
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise StageError(f"--num-beams {num_beams!r}; allowed: an int >= 1")
        self.num_beams = num_beams  # captioning: beam search with this many beams (1: greedy)
        self.run_task, self.backbone_cfg, saved, weights = load_trained(
            run, network, allow_unfinished=allow_unfinished
        )
        self.run, self.saved = Path(run), saved
        self.multitask = "tasks" in saved  # <net>.config.json of stages.multitask
        self.tasks: list[str] = list(saved["tasks"]) if self.multitask else self.run_task.names
        self._check_task(task or self.tasks[0])  # before the backbone loads
        state = load_weights(weights)
        self.backbone: Backbone = load_backbone(
            self.backbone_cfg.name,
            revision=self.backbone_cfg.revision,
            device=device,
            quantization=self.backbone_cfg.quantization,  # the states it was trained on
        )
        side = SideConfig(**saved["side"])  # kept_layers: SideConfig takes the saved list
        lm_head = self.backbone.frozen_tensors(lm_head=side.head == "lm").get("lm_head")
        self.answer = side.label_tokens is not None  # a verbaliser: template fields-answer
        self.encoder: VisionEncoder | None = None  # the run's; ``vision``: the task's, if VL
        if self.multitask:
            self.net: torch.nn.Module = saved_network(self.backbone.config, saved, lm_head)
            if self.backbone_cfg.vision is not None:
                self.encoder = run_vision_encoder(self.backbone_cfg, saved, device)
        elif self.backbone_cfg.vision is not None:  # visual tokens before the text
            self.net, self.encoder = visual_network(
                self.backbone, self.backbone_cfg, saved, device, lm_head
            )
        else:
            self.net = build_side_network(self.backbone.config, side, lm_head)
        load_into(self.net, state, str(weights))
        self.net.to(device).eval()  # beside the backbone
        self.select(task or self.tasks[0])
        if num_beams > 1 and not self.spec.captioning:
            raise StageError(
                f"--num-beams {num_beams}: beam search decodes captions; task {self.spec.name!r} "
                "is not captioning; allowed: 1"
            )

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise StageError(
                f"run {self.run} did not train task {task!r}; allowed: {', '.join(self.tasks)}"
            )

    def select(self, task: str) -> Predictor:
        """Predict and evaluate ``task`` (one of :attr:`tasks`) from now on: its head, its
        labels, its visual tokens if it has images, and its data (:attr:`task`: the run's
        ``task:`` section for this task alone); returns the predictor."""
        self._check_task(task)
        record = self.saved["tasks"][task] if self.multitask else self.saved
        self.spec = spec_of(record["task_spec"])
        self.cache_key: str | None = record.get("cache")  # the cache it was trained from
        self.task = task_of_list(self.run_task, task) if self.multitask else self.run_task
        self.vision = self.encoder if self.spec.images or not self.multitask else None
        select_task(self.net, task)
        # T5 scores the task's candidate label strings, each on its own decoder stream
        self.candidates = (
            t5_candidates(self.spec)
            if self.backbone.encoder_decoder and not self.spec.captioning
            else None
        )
        _, layers = stream_layers(self.net, self.candidates)  # captions: generated, not scored
        self.states = online_states(self.backbone, False, layers)
        return self

    def outputs(
        self,
        examples: list[Example],
        batch_size: int = 64,
        progress: str | None = None,
        images: VisualTokens | None = None,
    ) -> torch.Tensor:
        """The side network's raw outputs per example, in the examples' order: logits (regression:
        ``[N, 1]``), or for T5 the score of every candidate label string. Batches group examples
        of similar length (less padding); ``progress`` describes a progress bar (stderr, shown
        on a terminal only). A VL network reads each example's visual tokens from ``images``
        (default: :func:`encoded_tokens` of the examples' ``image`` fields as file paths)."""
        if self.vision is not None and images is None:
            images = encoded_tokens(self.vision, examples)
        data = TaskData(self.spec, {"test": examples}, "given")
        streams = tokenize_split(
            self.backbone, data, "test", self.backbone_cfg.max_length, self.answer
        )
        streams = {k: v for k, v in streams.items() if k != "dec"}
        labels = np.asarray([ex.label for ex in examples])
        pad_id = self.backbone.tokenizer.pad_token_id or 0
        order = sorted(range(len(examples)), key=lambda i: -len(streams["enc"].ids[i]))
        out: torch.Tensor | None = None
        with tqdm(
            total=len(examples),
            unit="ex",
            desc=progress,
            disable=None if progress else True,  # None: only on a terminal
            leave=False,
        ) as bar:
            for b in batches_of(streams, labels, batch_size, pad_id, order):
                if images is not None:
                    b = dataclasses.replace(b, visual=torch.from_numpy(images(b.index.numpy())))
                o = batch_outputs(self.net, b, self.states, self.candidates)
                if out is None:
                    out = o.new_zeros((len(examples), *o.shape[1:]))
                out[b.index] = o
                bar.update(len(b.index))
        return out if out is not None else torch.zeros(0, 1)

    def predict(
        self,
        examples: list[Example],
        batch_size: int = 64,
        progress: str | None = None,
        images: VisualTokens | None = None,
    ) -> np.ndarray:
        """Class ids (or scores) per example, as evaluation computes them."""
        out = self.outputs(examples, batch_size, progress, images)
        if not examples:
            return np.zeros(0)
        return predictions_of(out, self.spec, self.candidates)

    def explain(
        self, examples: list[Example], batch_size: int = 64, progress: str | None = None
    ) -> list[dict[str, Any]]:
        """Per example: ``prediction`` (the label's name, or the score as text) and, for
        classification, ``probability`` (of that label) and ``probabilities`` (of every label:
        the softmax of the logits, or for T5 of the candidate strings' scores); for regression
        ``score``; for generation the generated text (:func:`generation_rows`)."""
        if self.spec.generation:
            return generation_rows(self, examples, progress=progress)
        if self.spec.captioning:
            return [{"prediction": c} for c in caption_texts(self, examples, progress=progress)]
        out = self.outputs(examples, batch_size, progress)
        if not examples:
            return []
        preds = predictions_of(out, self.spec, self.candidates)
        if self.spec.is_regression:
            return [{"prediction": self.label_name(p), "score": float(p)} for p in preds]
        # T5: candidate k is the string of class id int(candidates[k])
        cls = (
            list(range(out.shape[1]))
            if self.candidates is None
            else [int(c) for c in self.candidates]
        )
        probs = torch.softmax(out.float(), dim=-1).numpy()
        rows = []
        for p, pr in zip(preds, probs, strict=True):
            by_label = {self.label_name(c): float(pr[k]) for k, c in enumerate(cls)}
            name = self.label_name(p)
            rows.append(
                {"prediction": name, "probability": by_label[name], "probabilities": by_label}
            )
        return rows

    def label_name(self, pred: Any) -> str:
        if self.spec.labels is None:
            return f"{float(pred):.3f}"
        return self.spec.labels[int(pred)]


def read_inputs(source: str, spec: TaskSpec) -> list[Example]:
    """Examples to predict from a ``.jsonl``, ``.csv`` or ``.tsv`` file, or ``-`` (stdin, JSONL),
    whose rows hold the task's text columns (``spec.text_fields``); other columns are ignored."""
    where = "<stdin>" if source == "-" else source
    rows = jsonl_rows(sys.stdin, where) if source == "-" else read_table(Path(source))
    if not rows:
        raise StageError(f"{where} holds no inputs")
    fields = spec.text_fields
    out = []
    for n, row in enumerate(rows, start=1):
        missing = [f for f in fields if row.get(f) is None]
        if missing:
            raise StageError(
                f"{where}: row {n} has no {', '.join(map(repr, missing))}; task {spec.name!r} "
                f"reads the column(s) {', '.join(fields)} (have: {', '.join(map(str, row)) or 'none'})"
            )
        if spec.images:  # vision-and-language: the row's image file(s) too
            out.append(image_example(row, n, where, spec))
            continue
        out.append(Example(tuple(str(row[f]) for f in fields), 0))
    return out


def image_example(row: dict[str, Any], n: int, where: str, spec: TaskSpec) -> Example:
    """A VL input row as an example: its text fields and ``image`` (a file path; ``image2``
    too for two-image tasks, NLVR2), paths as given (relative ones from the working directory).
    A row without an image is one line; the files are read when the encoder runs."""
    image = row.get("image")
    if not isinstance(image, str) or not image.strip():
        raise StageError(
            f"{where}: row {n} has no 'image' (a file path); task {spec.name!r} reads images: "
            f"each row needs {', '.join(spec.text_fields)} and image"
        )
    image2 = row.get("image2")
    texts = tuple(str(row[f]) for f in spec.text_fields)
    return Example(texts, 0, image, str(image2) if image2 is not None else None)


def evaluate_task(
    predictor: Predictor, split: str, *, data_dir: str | None = None, limit: int | None = None
) -> dict[str, float]:
    """The selected task's metrics on ``split`` of its data: the run's, or the folder
    ``data_dir``; ``limit``: the first N examples (default: the run's limit)."""
    task = predictor.task
    return _evaluate_data(
        predictor,
        task if data_dir is None else task.model_copy(update={"data_dir": data_dir}),
        split,
        limit,
    )


def evaluate_tasks(
    predictor: Predictor, split: str, *, data_dir: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    """Every task of a (multi-task) run on ``split``, as its metrics.json records a split: each
    task's metrics under its name and their unweighted average as ``score``. ``data_dir``
    replaces the run's data folder, which names the text tasks' data in a list that mixes text
    and VL tasks (the VL tasks' come from their default place, as in training:
    ``stages.multitask.task_of_list``). The last task stays selected."""
    run_task = predictor.run_task
    if data_dir is not None:
        run_task = run_task.model_copy(update={"data_dir": data_dir})
    out: dict[str, Any] = {}
    for task in predictor.tasks:
        predictor.select(task)
        out[task] = _evaluate_data(predictor, task_of_list(run_task, task), split, limit)
    out["score"] = float(np.mean([out[t]["score"] for t in predictor.tasks]))
    return out


def _evaluate_data(
    predictor: Predictor, task: TaskConfig, split: str, limit: int | None
) -> dict[str, float]:
    data = load_task_of(task, limit=limit)
    if split not in data.splits:
        raise StageError(f"unknown split {split!r}; allowed: {', '.join(data.splits)}")
    return evaluate_split(predictor, data, split)


def evaluate_split(predictor: Predictor, data: TaskData, split: str) -> dict[str, float]:
    if predictor.spec.generation:
        return evaluate_generation_split(predictor, data, split)
    if predictor.spec.captioning:
        return evaluate_caption_split(predictor, data, split)[0]
    examples = data.splits[split]
    desc = f"evaluate: {data.spec.name} ({split}, {len(examples)} examples)"
    images = split_tokens(predictor, data, split) if predictor.vision is not None else None
    preds = predictor.predict(examples, progress=desc, images=images)
    targets = [ex.targets for ex in examples] if predictor.spec.metric == "vqa_score" else None
    return compute_metrics(
        predictor.spec, preds, np.asarray([ex.label for ex in examples]), targets
    )


# --- generation tasks ----------------------------------------------------------------------------

MAX_NEW_TOKENS = 32  # generation stops at EOS, or after this many tokens


def generate_ids(
    predictor: Predictor,
    examples: list[Example],
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: str | None = None,
) -> list[list[int]]:
    """Greedy answer tokens (EOS excluded) per example's prompt, one example at a time."""
    tok, max_length = predictor.backbone.tokenizer, predictor.backbone_cfg.max_length
    eos = end_token_id(tok)
    out = []
    with tqdm(
        total=len(examples),
        unit="ex",
        desc=progress,
        disable=None if progress else True,
        leave=False,
    ) as bar:
        for ex in examples:
            prompt = prompt_ids(tok, ex.texts[0], max_length)
            out.append(
                greedy_generate(predictor.backbone, predictor.net, prompt, max_new_tokens, eos)
            )
            bar.update(1)
    return out


def generation_rows(
    predictor: Predictor, examples: list[Example], progress: str | None = None
) -> list[dict[str, Any]]:
    """Per example ``prediction``: the generated text (greedy, up to EOS)."""
    tok = predictor.backbone.tokenizer
    ids = generate_ids(predictor, examples, progress=progress)
    return [{"prediction": tok.decode(t, skip_special_tokens=True)} for t in ids]


def evaluate_generation_split(predictor: Predictor, data: TaskData, split: str) -> dict[str, float]:
    """``exact_match`` (x100, the ``score``): the generated tokens are the answer's, then EOS."""
    examples = data.splits[split]
    desc = f"evaluate: {data.spec.name} ({split}, {len(examples)} examples, generating)"
    return generation_metrics(predictor, examples, generate_ids(predictor, examples, progress=desc))


def generation_metrics(
    predictor: Predictor, examples: list[Example], got: list[list[int]]
) -> dict[str, float]:
    """``exact_match`` of answer tokens already generated (``got``, EOS excluded, per example)."""
    tok = predictor.backbone.tokenizer
    want = tok([ex.answer or "" for ex in examples], add_special_tokens=False)["input_ids"]
    right = np.asarray([g == w for g, w in zip(got, want, strict=True)], dtype=np.int64)
    return compute_metrics(predictor.spec, right, np.ones_like(right))


# --- vision-and-language: the visual part of a network, its visual tokens --------------------------

VisualTokens = Callable[[np.ndarray], np.ndarray]  # example rows -> [B, n_tokens, d_v] features


def visual_network(
    backbone: Backbone,
    backbone_cfg: BackboneConfig,
    saved: dict[str, Any],
    device: str,
    lm_head: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, VisionEncoder]:
    """A VL run's side network (unloaded) as train-side built it, from its ``<net>.config.json``
    (``visual``: the vision encoder's width, images per example, visual fusion and readout; T5 also needs
    ``lm_head``, the backbone's frozen LM head), and the frozen vision encoder the run names
    (``backbone.vision``)."""
    vision = run_vision_encoder(backbone_cfg, saved, device)
    visual = saved.get("visual") or {"d": vision.d, "n_images": 1}
    side = SideConfig(**saved["side"])
    net = build_visual_side_network(
        backbone.config,
        side,
        visual["d"],
        visual["n_images"],
        saved_visual_fusion(visual),
        lm_head,
        visual_readout=saved_visual_readout(visual),
    )  # networks saved before visual ladders existed took their tokens at the input
    return net, vision


def run_vision_encoder(
    backbone_cfg: BackboneConfig, saved: dict[str, Any], device: str
) -> VisionEncoder:
    """The frozen vision encoder a VL run names (``backbone.vision``), checked against the width
    its network was trained on (``<net>.config.json``'s ``visual``)."""
    vision = load_vision_encoder(
        backbone_cfg.vision or "", device=device, pool=backbone_cfg.vision_pool
    )
    d = (saved.get("visual") or {"d": vision.d})["d"]
    if d != vision.d:
        raise StageError(
            f"vision encoder {backbone_cfg.vision!r} gives features of width {vision.d}, but the "
            f"network was trained on width {d}"
        )
    return vision


def encoded_tokens(
    vision: VisionEncoder, examples: list[Example], files: dict[str, str] | None = None
) -> VisualTokens:
    """The visual tokens of ``examples`` from the live vision encoder, run once per distinct
    image: ``files`` maps each example's ``image`` (and ``image2``) key to its file (default:
    the keys are file paths). A missing or unreadable file is one line naming it."""
    spec = TaskSpec(name="given", text_fields=(), labels=None, metric="accuracy")
    data = TaskData(spec, {"given": examples}, "the given inputs", files or {})
    if files is None:
        data.images = {k: k for ex in examples for k in (ex.image, ex.image2) if k is not None}
    grid, _, index = encode_images(vision, data)
    table = ImageTable.of_arrays(grid, index)
    return lambda rows: table.gather("given", rows)


def split_tokens(predictor: Predictor, data: TaskData, split: str) -> VisualTokens:
    """The visual tokens of a split's examples: the run's cache's image features when the cache
    (still there) holds this split with the same content and the run's vision encoder, else the
    live vision encoder on the split's image files."""
    cached = cached_tokens(predictor, data, split)
    if cached is not None:
        return cached
    assert predictor.vision is not None
    return encoded_tokens(predictor.vision, data.splits[split], data.images)


def cached_tokens(predictor: Predictor, data: TaskData, split: str) -> VisualTokens | None:
    """The run's cache's image features for ``split``, or None where the cache is gone, holds
    other data for the split, or holds another encoder's features."""
    folder = Path(predictor.run)
    root = _read_json(folder / "config.json").get("cache", {}).get("root")
    key = predictor.cache_key
    if root is None or key is None:
        return None
    try:
        cache = open_cache(root, key, check=False)
    except Exception:  # gone, moved, or remote without credentials: the encoder runs instead
        return None
    info = cache.manifest["splits"].get(split, {})
    encoder = (cache.manifest.get("images") or {}).get("encoder", {})
    if (
        info.get("fingerprint") != data.fingerprint(split)
        or encoder.get("name") != predictor.backbone_cfg.vision
        or encoder.get("pool") != predictor.backbone_cfg.vision_pool
    ):
        return None
    table = ImageTable(cache, memory_budget=1 << 30)  # past 1 GB, a batch's images at a time
    return lambda rows: table.gather(split, rows)


# --- captioning ------------------------------------------------------------------------------------

CAPTION_MAX_NEW_TOKENS = 20  # a caption stops at EOS, or after this many tokens


def caption_texts(
    predictor: Predictor,
    examples: list[Example],
    images: VisualTokens | None = None,
    max_new_tokens: int = CAPTION_MAX_NEW_TOKENS,
    batch_size: int = 32,
    progress: str | None = None,
) -> list[str]:
    """Captions, one per example, decoded without special tokens: the backbone encoder reads
    the captioning template's input (``CAPTION_PROMPT``), the side network each example's visual
    tokens from ``images`` (default: the live vision encoder on ``image`` as a file path).
    Batches decode in lockstep, greedily (:func:`ladder.generation.greedy_generate_t5`) or with
    ``predictor.num_beams`` beams (:func:`ladder.generation.beam_generate_t5`)."""
    if predictor.vision is None:
        raise StageError("captioning needs the run's vision encoder (backbone.vision); none set")
    if images is None:
        images = encoded_tokens(predictor.vision, examples)
    tok = predictor.backbone.tokenizer
    data = TaskData(predictor.spec, {"test": examples}, "given")
    enc = tokenize_split(predictor.backbone, data, "test", predictor.backbone_cfg.max_length)["enc"]
    pad_id = tok.pad_token_id or 0
    eos = end_token_id(tok)
    out: list[str] = []
    with tqdm(
        total=len(examples), unit="ex", desc=progress, disable=None if progress else True,
        leave=False,
    ) as bar:  # fmt: skip
        for lo in range(0, len(examples), batch_size):
            rows = np.arange(lo, min(lo + batch_size, len(examples)))
            ids, mask = pad([enc.ids[i] for i in rows], pad_id)
            visual = torch.from_numpy(images(rows))
            args = (predictor.backbone, predictor.net, ids, mask, visual, max_new_tokens, eos)
            if predictor.num_beams == 1:
                got = greedy_generate_t5(*args)
            else:
                got = [t for t, _ in beam_generate_t5(*args, num_beams=predictor.num_beams)]
            out += [tok.decode(t, skip_special_tokens=True).strip() for t in got]
            bar.update(len(rows))
    return out


def evaluate_caption_split(
    predictor: Predictor, data: TaskData, split: str
) -> tuple[dict[str, float], dict[str, str]]:
    """CIDEr-D x100 (``cider``, the ``score``; ``stages.vl_metrics.cider``, PTB-tokenised) of the
    greedy captions of a split's images against their references, and the captions by image id.
    Validation and test hold one example per image with its references; train does not."""
    examples = data.splits[split]
    if any(not ex.references or ex.image is None for ex in examples):
        raise StageError(
            f"split {split!r} of task {data.spec.name!r} has examples without reference captions "
            "(train: one example per caption); allowed: --split validation or test"
        )
    from stages.vl_metrics import cider

    desc = f"evaluate: {data.spec.name} ({split}, {len(examples)} images, generating)"
    images = split_tokens(predictor, data, split)
    texts = caption_texts(predictor, examples, images, progress=desc)
    captions = {str(ex.image): t for ex, t in zip(examples, texts, strict=True)}
    references = {str(ex.image): list(ex.references) for ex in examples}
    scores = cider(references, captions)
    return {**scores, "score": scores["cider"]}, captions
