"""Probe easy-VQA's cached image features: can a simple classifier read each image's shape and
colour from the frozen vision encoder's tokens, pooled 4x4 and unpooled?

    python -m bench.vqa_probe --json bench/results/vqa_probe.json
    python -m bench.vqa_probe --quick                       # fewer MLP steps

The features are the product's: ``ladder.vision.load_vision_encoder`` (default ``random-vit``)
with ``pool="4x4"`` and with no pooling, run over every distinct image of the task by
``stages.images.encode_images`` (what stage one stores in the cache's ``images/grid``). Labels
per image (circle/rectangle/triangle; 8 colours) come from its easy-VQA questions
(``image_labels``: "what shape ...?" and "what color ...?" answers, the shape or colour a question
names, and what yes/no answers assert or exclude).

Feature sets: the class token; the mean of the patch tokens; the 16 pooled tokens concatenated
(4x4); all 64 patch tokens concatenated (unpooled); the preprocessed pixels downsampled to 16x16
(a baseline that needs no encoder). Probes, each fitted on standardised features: a multinomial
logistic regression (scikit-learn, C = 0.1) and a 2-layer MLP (torch, AdamW); on the token grids
(the 17 cached tokens, the 65 unpooled) also a set probe (``SetProbe``: a shared per-token MLP,
mean and max over tokens). Trained on the training images of the task's train split ("all", about 3,900),
and on the images of its first ``--bench-limit`` questions ("bench", the images a
``bench.vqa --limit 8000`` side network sees); tested on the 1,000 test images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.common import parser, table, write_json
from stages.tasks import TaskData
from stages.vqa import EASY_VQA_ANSWERS, question_type

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
TARGETS = {"shape": SHAPES, "colour": COLOURS}
C_GRID = (0.1,)  # logistic regression's C (the best on validation where several)


def image_labels(
    data: TaskData,
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Per target (shape, colour) each image key's class index, from its questions and answers,
    and how many images of each target its questions leave undetermined or contradict (left
    out)."""
    pos: dict[str, dict[str, set[str]]] = {t: {} for t in TARGETS}
    neg: dict[str, dict[str, set[str]]] = {t: {} for t in TARGETS}
    for examples in data.splits.values():
        for ex in examples:
            q, a = ex.texts[0], EASY_VQA_ANSWERS[ex.label]
            words = set(q.lower().replace("?", " ").split())
            kind = question_type(q)
            for t, names in TARGETS.items():
                named = [w for w in names if w in words]
                p = pos[t].setdefault(ex.image, set())
                n = neg[t].setdefault(ex.image, set())
                if kind == "yes/no":
                    present = (a == "yes") != bool(words & {"not", "no"})  # "is no ... present?"
                    (p if present else n).update(named)
                else:
                    p.update(named)  # "what color is the triangle?", "what is the blue shape?"
                    if a in names:
                        p.add(a)
    labels: dict[str, dict[str, int]] = {t: {} for t in TARGETS}
    dropped: dict[str, dict[str, int]] = {}
    for t, names in TARGETS.items():
        dropped[t] = {"undetermined": 0, "contradictory": 0}
        for key, p in pos[t].items():
            left = p if p else set(names) - neg[t][key]
            if len(p) > 1 or p & neg[t][key]:
                dropped[t]["contradictory"] += 1
            elif len(left) == 1:
                labels[t][key] = names.index(next(iter(left)))
            else:
                dropped[t]["undetermined"] += 1
    return labels, dropped


def feature_sets(data: TaskData, encoder: str) -> tuple[list[str], dict[str, np.ndarray], float]:
    """Every distinct image's features, float32 [n_images, dim] per feature set (sets named
    "... [set]": the token grid [n_images, n_tokens, d], for the set probe), in the order of
    ``stages.images.distinct_images``, and the seconds the two encoder passes took."""
    from ladder.vision import load_vision_encoder, pool_grid, random_vit_preprocess
    from stages.images import distinct_images, encode_images, open_image

    keys = distinct_images(data)[0]
    t0 = time.perf_counter()
    full, _, _ = encode_images(load_vision_encoder(encoder, pool=None), data)  # [n, 65, d]
    pooled, _, _ = encode_images(load_vision_encoder(encoder, pool="4x4"), data)  # [n, 17, d]
    encode_s = time.perf_counter() - t0
    again = pool_grid(torch.from_numpy(full), 4).numpy()
    assert np.allclose(again, pooled, atol=1e-5), float(np.abs(again - pooled).max())
    pixels = torch.cat(
        [
            random_vit_preprocess([open_image(data, k) for k in keys[i : i + 256]])
            for i in range(0, len(keys), 256)
        ]
    )
    small = torch.nn.functional.adaptive_avg_pool2d(pixels, 16).flatten(1).numpy()
    n = len(keys)
    feats = {
        "CLS token": full[:, 0],
        "mean of 64 patches": full[:, 1:].mean(1),
        "4x4 pooled, 16 tokens concat": pooled[:, 1:].reshape(n, -1),
        "no pool, 64 tokens concat": full[:, 1:].reshape(n, -1),
        "raw pixels 16x16x3": small,
    }
    sets = {"4x4 pooled + CLS (17 tokens, cached)": pooled, "no pool (65 tokens)": full}
    feats |= {f"{k} [set]": v for k, v in sets.items()}
    return keys, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feats.items()}, encode_s


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Per feature (a token grid: per channel, over images and tokens) to mean 0, std 1."""
    axes = (0, 1) if train.ndim == 3 else 0
    mean, std = train.mean(axes), train.std(axes) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


class SetProbe(torch.nn.Module):
    """A token-set probe: one MLP per token (shared weights, with a learnt position embedding),
    then mean and max over the tokens, then a linear layer: it can find a shape wherever it is,
    as a side network's attention over the visual tokens can."""

    def __init__(self, n_tokens: int, d: int, n_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.pos = torch.nn.Parameter(torch.zeros(n_tokens, d))
        self.token = torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
        )
        self.head = torch.nn.Linear(2 * hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.token(x + self.pos)
        return self.head(torch.cat([h.mean(1), h.amax(1)], 1))


def logistic(
    x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, grid: tuple[float, ...]
) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """Multinomial L2 logistic regression, C picked on the validation images (the first of the
    best); the fitted model's predict and its C."""
    from sklearn.linear_model import LogisticRegression

    best: tuple[float, Any, float] | None = None
    for c in grid:
        m = LogisticRegression(C=c, max_iter=500).fit(x, y)
        acc = float((m.predict(xv) == yv).mean()) if len(grid) > 1 else 0.0
        if best is None or acc > best[0]:
            best = (acc, m, c)
    assert best is not None
    return best[1].predict, best[2]


def mlp(
    x: np.ndarray, y: np.ndarray, n_classes: int, steps: int, seed: int = 0
) -> Callable[[np.ndarray], np.ndarray]:
    """A 2-layer MLP (256 hidden, GELU, dropout 0.1) on [n, dim] features, or a ``SetProbe`` on
    [n, n_tokens, d] token grids; AdamW lr 1e-3, weight decay 0.05, batches of 256; its
    predict."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net: torch.nn.Module
    if x.ndim == 3:
        net = SetProbe(x.shape[1], x.shape[2], n_classes)
    else:
        net = torch.nn.Sequential(
            torch.nn.Dropout(0.1),
            torch.nn.Linear(x.shape[1], 256),
            torch.nn.GELU(),
            torch.nn.Linear(256, n_classes),
        )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (min(256, len(xt)),), generator=g)
        loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()

    def predict(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(z)).argmax(1).numpy()

    return predict


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--vision-encoder", default="random-vit")
    p.add_argument("--mlp-steps", type=int, default=400)
    p.add_argument(
        "--bench-limit",
        type=int,
        default=8000,
        help="the 'bench' training set: images of the first N training questions",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    grid = C_GRID
    if args.quick:
        args.mlp_steps = 150

    from stages.tasks import load_task

    data = load_task("easy-vqa")
    keys, feats, encode_s = feature_sets(data, args.vision_encoder)
    labels, dropped = image_labels(data)
    row = {k: i for i, k in enumerate(keys)}
    split_keys = {s: list(dict.fromkeys(ex.image for ex in v)) for s, v in data.splits.items()}
    bench_train = list(dict.fromkeys(ex.image for ex in data.splits["train"][: args.bench_limit]))
    train_sets = {"all": split_keys["train"], "bench": bench_train}

    results: list[dict[str, Any]] = []
    for target, names in TARGETS.items():
        lab = labels[target]

        def rows_of(ks: list[str], lab: dict[str, int] = lab) -> tuple[np.ndarray, np.ndarray]:
            have = [k for k in ks if k in lab]
            return np.asarray([row[k] for k in have]), np.asarray([lab[k] for k in have])

        iv, yv = rows_of(split_keys["validation"])
        it, yt = rows_of(split_keys["test"])
        majority = float(np.bincount(yt).max() / len(yt))
        for train_name, tkeys in train_sets.items():
            ir, yr = rows_of(tkeys)
            for fname, f in feats.items():
                xr, xv, xt = standardise(f[ir], f[iv], f[it])
                for probe in ("mlp",) if f.ndim == 3 else ("logistic", "mlp"):
                    t0 = time.perf_counter()
                    extra: dict[str, Any] = {}
                    if probe == "logistic":
                        predict, extra["C"] = logistic(xr, yr, xv, yv, grid)
                    else:
                        predict = mlp(xr, yr, len(names), args.mlp_steps)
                    r = {
                        "target": target,
                        "train_set": train_name,
                        "features": fname,
                        "dim": int(np.prod(f.shape[1:])),
                        "probe": probe,
                        "n_train": len(yr),
                        "n_test": len(yt),
                        "train_acc": float((predict(xr) == yr).mean()) * 100,
                        "validation_acc": float((predict(xv) == yv).mean()) * 100,
                        "test_acc": float((predict(xt) == yt).mean()) * 100,
                        "test_majority": majority * 100,
                        "fit_s": time.perf_counter() - t0,
                        **extra,
                    }
                    results.append(r)
                    print(
                        f"{target:6s} {train_name:5s} {probe:8s} {fname:38s} "
                        f"train {r['train_acc']:5.1f} test {r['test_acc']:5.1f} "
                        f"({r['fit_s']:.0f}s)",
                        flush=True,
                    )

    for train_name in train_sets:
        print(f"\ntrained on '{train_name}' images; accuracy x100, train / test")
        rows = []
        for fname, f in feats.items():
            cells: list[Any] = [fname, "x".join(map(str, f.shape[1:]))]
            for target in TARGETS:
                for probe in ("logistic", "mlp"):
                    got = [
                        r
                        for r in results
                        if (r["target"], r["train_set"], r["features"], r["probe"])
                        == (target, train_name, fname, probe)
                    ]
                    cells.append(
                        f"{got[0]['train_acc']:.1f} / {got[0]['test_acc']:.1f}" if got else "-"
                    )
            rows.append(cells)
        print(
            table(
                ["features", "dim", "shape LR", "shape MLP/set", "colour LR", "colour MLP/set"],
                rows,
            )
        )
    figures = {
        "vision_encoder": args.vision_encoder,
        "encode_s": encode_s,
        "mlp_steps": args.mlp_steps,
        "c_grid": list(grid),
        "bench_limit": args.bench_limit,
        "n_images": {
            "train_all": len(split_keys["train"]),
            "train_bench": len(bench_train),
            "validation": len(split_keys["validation"]),
            "test": len(split_keys["test"]),
        },
        "labelled": {t: len(v) for t, v in labels.items()},
        "unlabelled": dropped,
        "probes": results,
    }
    write_json(args.json, "vqa_probe", figures)


if __name__ == "__main__":
    main()
