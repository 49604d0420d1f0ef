"""``pipeline predict`` and ``pipeline evaluate``: backbone plus a trained side network on new text.

    pipeline predict  --run runs/<folder> "A man is playing a guitar." "A man plays music."
    pipeline evaluate --run runs/<folder> --split test --data-dir ../shared/data/glue

These need the backbone (the text is new, so there is no cache for it): it runs live in eval mode
and feeds the side network exactly the states stage one would have stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from cache_store import layout
from ladder.backbones import Backbone, load_backbone
from ladder.side import SideConfig, build_side_network
from stages.batches import Batch
from stages.config import BackboneConfig
from stages.errors import StageError
from stages.tasks import Example, TaskConfig, TaskData, compute_metrics, spec_of, t5_candidates
from stages.tokens import Stream, pad, tokenize_split
from stages.train_side import online_states, predict_batch


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


def load_trained(
    run: str | Path, network: str | None = None, *, allow_unfinished: bool = False
) -> tuple[TaskConfig, BackboneConfig, dict[str, Any], Path]:
    """A run folder's task and backbone, and the chosen network's saved config and weights.

    An unfinished run (killed, still training, or a network stopped early) is refused unless
    ``allow_unfinished``: its best checkpoint is not the run's answer yet.
    """
    folder = Path(run)
    if not (folder / "config.json").is_file():
        raise StageError(f"{folder} is not a train-side run folder (no config.json)")
    saved_cfg = _read_json(folder / "config.json")
    task = TaskConfig.model_validate(saved_cfg["task"])
    backbone = BackboneConfig.model_validate(saved_cfg["backbone"])
    if backbone.vision is not None:
        raise StageError(
            f"run {folder} reads images (vision encoder {backbone.vision!r}); predict and "
            "evaluate on new images are not built yet: its test figures are in metrics.json"
        )
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
    streams: dict[str, Stream], labels: np.ndarray, batch_size: int, pad_id: int
) -> Iterator[Batch]:
    """Padded batches of token ids (no states: the live backbone computes them)."""
    n = len(labels)
    for lo in range(0, n, batch_size):
        idx = list(range(lo, min(n, lo + batch_size)))
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
    """A live backbone and one trained side network, in eval mode."""

    def __init__(
        self,
        run: str | Path,
        network: str | None = None,
        device: str = "cpu",
        *,
        allow_unfinished: bool = False,
    ) -> None:
        self.task, self.backbone_cfg, saved, weights = load_trained(
            run, network, allow_unfinished=allow_unfinished
        )
        state = load_weights(weights)
        self.backbone: Backbone = load_backbone(
            self.backbone_cfg.name, revision=self.backbone_cfg.revision, device=device
        )
        self.spec = spec_of(saved["task_spec"])
        side = SideConfig(
            **{
                **saved["side"],
                "kept_layers": saved["side"]["kept_layers"] and tuple(saved["side"]["kept_layers"]),
            }
        )
        lm_head = self.backbone.frozen_tensors().get("lm_head")
        self.net = build_side_network(self.backbone.config, side, lm_head)
        self.net.load_state_dict(state, strict=False)
        self.net.eval()
        self.candidates = t5_candidates(self.spec) if self.backbone.encoder_decoder else None
        layers = {"enc": self.net.needed_layers("enc")}
        if self.candidates is not None:
            layers.update(
                {
                    s: self.net.needed_layers("dec")
                    for s in layout.cand_streams(len(self.candidates))
                }
            )
        self.states = online_states(self.backbone, False, layers)

    def predict(self, examples: list[Example], batch_size: int = 64) -> np.ndarray:
        data = TaskData(self.spec, {"test": examples}, "given")
        streams = tokenize_split(self.backbone, data, "test", self.backbone_cfg.max_length)
        streams = {k: v for k, v in streams.items() if k != "dec"}
        labels = np.asarray([ex.label for ex in examples])
        pad_id = self.backbone.tokenizer.pad_token_id or 0
        out = [
            predict_batch(self.net, b, self.states, self.spec, self.candidates)
            for b in batches_of(streams, labels, batch_size, pad_id)
        ]
        return np.concatenate(out) if out else np.zeros(0)

    def label_name(self, pred: Any) -> str:
        if self.spec.labels is None:
            return f"{float(pred):.3f}"
        return self.spec.labels[int(pred)]


def evaluate_split(predictor: Predictor, data: TaskData, split: str) -> dict[str, float]:
    examples = data.splits[split]
    preds = predictor.predict(examples)
    return compute_metrics(predictor.spec, preds, np.asarray([ex.label for ex in examples]))
