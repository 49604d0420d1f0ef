"""``side_init``: pruned backbone weights that initialise side networks (LST_REFERENCE.md §4).

Computed in stage one because it needs the backbone: for each reduction factor R and method
(magnitude: the raw weights; Fisher: summed squared per-example gradients of the task loss over
``fisher_samples`` training examples, batch size 1, eval mode), the structural pruning keeps
1/R of the rows of every projection. Written under ``side_init/r<R>/<method>/`` in canonical
names, with the selected indices beside them (``idx.*``) so anyone can check the selection.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from cache_store import layout
from ladder.fisher import compute_fisher
from ladder.pruning import fisher_model_for, prune_backbone
from stages.config import StageConfig
from stages.tasks import TaskData

if TYPE_CHECKING:
    from cache_store.writer import CacheWriter
    from ladder.backbones import Backbone
    from stages.tokens import Stream


def fisher_batches(
    backbone: Backbone, data: TaskData, train: dict[str, Stream], n: int, seed: int
) -> list[dict[str, Any]]:
    """``n`` training examples in a seeded shuffle, one per batch, with their loss labels."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train["enc"].ids), generator=g)[:n].tolist()
    dev = backbone.device
    out = []
    for i in order:
        ids = torch.tensor([train["enc"].ids[i]], device=dev)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if backbone.encoder_decoder:
            batch["labels"] = torch.tensor([train["dec"].targets[i]], device=dev)
        else:
            if train["enc"].token_types is not None:
                batch["token_type_ids"] = torch.tensor([train["enc"].token_types[i]], device=dev)
            label = data.splits["train"][i].label
            dtype = torch.float32 if data.spec.is_regression else torch.long
            batch["labels"] = torch.tensor([label], dtype=dtype, device=dev)
        out.append(batch)
    return out


def fisher_importance(
    cfg: StageConfig,
    backbone: Backbone,
    data: TaskData,
    train: dict[str, Stream],
    *,
    batched: bool = True,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Fisher importance in the backbone's own names; ``batched=False`` forces the one-by-one loop."""
    n = min(cfg.extract.fisher_samples, len(train["enc"].ids))
    if backbone.encoder_decoder:
        model = backbone.model
    else:
        model = fisher_model_for(
            backbone.family,
            backbone.config,
            data.spec.num_labels,
            cfg.extract.seed,
            pad_token_id=backbone.tokenizer.pad_token_id,  # Llama: the last non-pad token
        )
        model.base_model.load_state_dict(backbone.model.state_dict(), strict=False)
        model.to(backbone.device)
    batches = fisher_batches(backbone, data, train, n, cfg.extract.seed)
    with torch.enable_grad():
        examples = tqdm(
            batches,
            desc=f"side_init: Fisher pass over {n} examples",
            unit="ex",
            leave=False,
            disable=not progress,
        )
        imp = compute_fisher(model, examples, n, batched=batched)
    base = model.base_model_prefix + "." if not backbone.encoder_decoder else ""
    return {k.removeprefix(base): v for k, v in imp.items()}


def write_side_init(
    cfg: StageConfig,
    backbone: Backbone,
    data: TaskData,
    train: dict[str, Stream],
    writer: CacheWriter,
    timings: dict[str, float] | None = None,
    *,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Write every (R, method) of the config; returns ``{"r8": ["fisher", ...], ...}``.

    With ``timings``, the Fisher pass alone (shared by every R) is recorded as ``fisher_s`` when
    the config asks for the Fisher method, so its cost can be told from the pruning's.
    """
    methods = sorted(set(cfg.extract.side_init))
    if not methods or not cfg.extract.reduction_factors:
        return {}
    state = {k: v.detach().float().cpu() for k, v in backbone.model.state_dict().items()}
    importances: dict[str, dict[str, torch.Tensor] | None] = {}
    if "magnitude" in methods:
        importances["magnitude"] = None
    if "fisher" in methods:
        t0 = time.perf_counter()
        importances["fisher"] = {
            k: v.cpu()
            for k, v in fisher_importance(cfg, backbone, data, train, progress=progress).items()
        }
        if timings is not None:
            timings["fisher_s"] = time.perf_counter() - t0
    done: dict[str, list[str]] = {}
    jobs = [(r, m) for r in sorted(set(cfg.extract.reduction_factors)) for m in importances]
    bar = tqdm(jobs, desc="side_init: pruning", unit="init", leave=False, disable=not progress)
    for r, method in bar:
        bar.set_description(f"side_init: pruning for r={r} ({method})")
        imp = importances[method]
        weights, indices = prune_backbone(backbone.family, state, imp, r, backbone.config)
        for name, t in {**weights, **indices}.items():
            a = t.numpy()
            writer.create_array(
                layout.side_init_path(r, method, name),
                a.shape,
                a.dtype,
                chunk_rows=max(1, a.shape[0] if a.ndim else 1),
                data=np.ascontiguousarray(a),
            )
        done.setdefault(f"r{r}", []).append(method)
    return done
