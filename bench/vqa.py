"""Vision-and-language LST on easy-VQA: with visual tokens against the same side network on the
text alone (the answer prior), from one cache.

    python -m bench.vqa --limit 4000 --epochs 10 --vision-pool 4x4 --warmup-steps 20 \
        --plot docs/vqa-question-types.png --json bench/results/vqa_pooled.json
    python -m bench.vqa --limit 4000 --json bench/results/vqa_quick.json   # all 65 tokens
    python -m bench.vqa --merge a.json b.json --plot p.png --json ab.json  # arms run apart

Extracts one cache (packaged MiniLM text backbone, the packaged ``random-vit`` vision encoder,
float16/lz4, magnitude side_init at r = 4), then trains r = 4 side networks, seeds 0, 1, 2 in one
pass, twice on the same batches: with the visual tokens (``backbone.vision`` set) and without
(text alone). Reports test accuracy (mean and std over the seeds), seconds per epoch, and the
bytes of image features in the cache against the bytes they would take stored once per question.
Per question type (``stages.vqa.question_type``: color, shape, yes/no) the test accuracy of
each arm comes from every network's test predictions (``stages.train_side.cached_predictions``,
the same figures train-side's test evaluation computes); ``--plot`` draws it
(``bench.plots.vqa_question_types``).

``random-vit`` is a randomly initialised, frozen ViT (no pretrained vision weights exist offline
here): whatever it adds over the answer prior comes from random features of the pixels. The side
network needs a few hundred optimizer steps before it reads them (at 2,000 questions and 3
epochs, 60 steps, it had not); ``--vision-pool 4x4`` (17 visual tokens instead of 65) makes
those steps about 4x cheaper. ``--vision-encoder openai/clip-vit-base-patch32`` measures a real
one where the hub is reachable.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines import PeakMemory
from bench.common import parser, table, write_json
from stages.vqa import EASY_VQA_ANSWERS, QUESTION_TYPES, question_type

SHAPES = ("circle", "rectangle", "triangle")


def stored_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def accuracies(preds: list[np.ndarray], labels: np.ndarray, pick: np.ndarray) -> list[float]:
    """Each network's accuracy x100 on the questions ``pick`` selects."""
    return [float(np.mean(p[pick] == labels[pick])) * 100 for p in preds]


def by_type(preds: list[np.ndarray], labels: np.ndarray, kinds: np.ndarray) -> dict[str, Any]:
    """Test accuracy x100 per question type and over all questions: per network (``seeds``),
    their mean, the type's size and its majority answer's accuracy."""
    out = {}
    for t in [*QUESTION_TYPES, "all"]:
        pick = np.ones(len(labels), bool) if t == "all" else kinds == t
        if not pick.any():
            continue
        seeds = accuracies(preds, labels, pick)
        majority = float(np.bincount(labels[pick]).max() / pick.sum()) * 100
        out[t] = {
            "seeds": seeds,
            "mean": statistics.mean(seeds),
            "n": int(pick.sum()),
            "majority": majority,
        }
    return out


def yes_no_subjects(questions: list[str]) -> np.ndarray:
    """Per question: for a yes/no question, ``naming a shape`` when it names circle, rectangle
    or triangle ("is there a red triangle?"), else ``naming a colour``; "" for the others."""
    return np.asarray(
        [
            ("naming a shape" if any(s in q for s in SHAPES) else "naming a colour")
            if question_type(q) == "yes/no"
            else ""
            for q in questions
        ]
    )


def image_shapes(questions: list[str], labels: np.ndarray, images: list[str]) -> np.ndarray:
    """Per question, the shape in its image (an easy-VQA image holds one shape), known from the
    image's "what shape" questions' answers; "" for an image without one."""
    shape_of = {
        image: EASY_VQA_ANSWERS[label]
        for q, label, image in zip(questions, labels.tolist(), images, strict=True)
        if question_type(q) == "shape"
    }
    return np.asarray([shape_of.get(image, "") for image in images])


def yes_no_diagnostics(
    preds: list[np.ndarray], labels: np.ndarray, questions: list[str], images: list[str]
) -> dict[str, Any]:
    """The yes/no questions by what they name (``by_subject``: a shape or a colour; accuracy
    x100 per network and their mean), and those naming a shape by the shape asked and the shape
    in the image (``shape_match``: asked -> image's shape -> mean accuracy x100 and n)."""
    subjects = yes_no_subjects(questions)
    by_subject = {}
    for subject in ("naming a shape", "naming a colour"):
        pick = subjects == subject
        seeds = accuracies(preds, labels, pick)
        by_subject[subject] = {"seeds": seeds, "mean": statistics.mean(seeds), "n": int(pick.sum())}
    shapes = image_shapes(questions, labels, images)
    match: dict[str, dict[str, Any]] = {}
    for asked in SHAPES:
        named = (subjects == "naming a shape") & np.asarray([asked in q for q in questions])
        for seen in SHAPES:
            pick = named & (shapes == seen)
            if pick.any():
                match.setdefault(asked, {})[seen] = {
                    "mean": statistics.mean(accuracies(preds, labels, pick)),
                    "n": int(pick.sum()),
                }
    return {"by_subject": by_subject, "shape_match": match}


ARMS = {  # --arms name -> (label, visual fusion or None for text alone, online, visual readout)
    "ladder": ("with images (ladder)", "ladder", False, "text"),
    "input": ("with images (input)", "input", False, "text"),
    "text": ("text alone", None, False, "text"),
    "online": ("with images (ladder), online LST", "ladder", True, "text"),
    "readout": ("with images (ladder), text+visual readout", "ladder", False, "text+visual"),
}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=4000, help="first N questions of each split")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--vision-encoder", default="random-vit")
    p.add_argument("--vision-pool", default=None, help="patch tokens pooled to KxK (e.g. 4x4)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="train_side.dropout: one rate for every side-network dropout (default: MiniLM's)",
    )
    p.add_argument(
        "--batched",
        default="auto",
        choices=["auto", "on", "off"],
        help="train_side.batched: the seeds as one stacked model (auto, on) or one by one",
    )
    p.add_argument(
        "--side-device",
        default="auto",
        help="train_side.device: where the side networks train (auto: CUDA when present)",
    )
    p.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="train_side.precision: the side networks' forward in float32, or bfloat16 or float16 "
        "autocast",
    )
    p.add_argument(
        "--class-weight",
        default="none",
        choices=["none", "balanced"],
        help="train_side.class_weight: balanced weighs each answer's loss by its rarity",
    )
    p.add_argument(
        "--arms",
        default="ladder,input,text",
        help=f"comma-separated, of {', '.join(ARMS)}: with images through visual ladders (the "
        "default network), with images at the input only (the authors'), text alone, online "
        "LST (live backbone, dropout on) with visual ladders, and visual ladders with the head "
        "reading the visual positions too (train_side.visual_readout text+visual)",
    )
    p.add_argument("--work", type=Path, default=None, help="cache and runs here (default: temp)")
    p.add_argument("--plot", type=Path, default=None, help="accuracy per question type (PNG)")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="runs of this bench on one cache (e.g. --arms ladder and --arms text, one per core): "
        "print, --plot and --json their arms side by side, training nothing",
    )
    args = p.parse_args()
    if args.merge:
        try:
            figures = merge(args.merge)
        except ValueError as e:
            p.error(str(e))
        report(figures, args.plot, args.json)
        return
    if args.quick:
        args.limit, args.epochs = 1000, 2
    seeds = [int(s) for s in args.seeds.split(",")]

    import torch

    from cache_store import layout
    from ladder.backbones import load_backbone
    from pipeline.config import Config, apply_overrides
    from stages.extract import extract
    from stages.tasks import load_task_of
    from stages.train_side import cached_predictions, side_device, train_side

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-vqa-"))
    over: dict[str, Any] = {
        "task.name": "easy-vqa",
        "task.limit": args.limit,
        "backbone.vision": args.vision_encoder,
        "backbone.vision_pool": args.vision_pool,
        "cache.root": str(work / "cache"),
        "extract.side_init": ["magnitude"],
        "extract.reduction_factors": [args.r],
        "train_side.reduction_factors": [args.r],
        "train_side.seeds": seeds,
        "train_side.epochs": args.epochs,
        "train_side.batch_size": args.batch_size,
        "train_side.init": "magnitude",
        "train_side.warmup_steps": args.warmup_steps,
        "train_side.learning_rates": [args.lr],
        "train_side.class_weight": args.class_weight,
        "train_side.dropout": args.dropout,
        "train_side.batched": args.batched,
        "train_side.device": args.side_device,
        "train_side.precision": args.precision,
        "train_side.run_dir": str(work / "runs"),
    }
    cfg = apply_overrides(Config(), over)
    t0 = time.perf_counter()
    res = extract(cfg, progress=True)
    extract_s = time.perf_counter() - t0
    m = res.manifest
    commit = json.loads((work / "cache" / res.key / layout.COMMIT).read_text())
    attempt = work / "cache" / res.key / commit["attempt"]
    img = m["images"]
    n_questions = sum(s["n_examples"] for s in m["splits"].values())
    image_bytes = stored_bytes(attempt / layout.IMAGES)
    text_bytes = sum(stored_bytes(attempt / s / "enc") for s in m["splits"])

    test = load_task_of(cfg.task).splits["test"]  # the cache's test split, in its order
    labels = np.asarray([ex.label for ex in test])
    kinds = np.asarray([question_type(ex.texts[0]) for ex in test])
    questions, images = [ex.texts[0] for ex in test], [str(ex.image) for ex in test]
    arms: dict[str, Any] = {}
    no_vision = cfg.model_copy(
        update={"backbone": cfg.backbone.model_copy(update={"vision": None, "vision_pool": None})}
    )
    chosen = args.arms.split(",")
    if unknown := [a for a in chosen if a not in ARMS]:
        p.error(f"--arms {','.join(unknown)}: allowed {', '.join(ARMS)}")
    backbone = None
    device = side_device(cfg)
    for name in chosen:
        arm, fusion, online, readout = ARMS[name]
        c = no_vision
        if fusion is not None:
            update = {"visual_fusion": fusion, "visual_readout": readout}
            ts = cfg.train_side.model_copy(update=update)
            c = cfg.model_copy(update={"train_side": ts})
        if online and backbone is None:
            backbone = load_backbone(cfg.backbone.name, device=device)
        memory = PeakMemory()
        memory.start()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t1 = time.perf_counter()
        out = train_side(c, cache_key=res.key, run_name=name, online=backbone if online else None,
                         progress=True)  # fmt: skip
        peak = memory.stop()
        names = list(out.metrics["networks"])
        nets = out.metrics["networks"].values()
        preds = [cached_predictions(c, out.folder, name, "test", res.key) for name in names]
        acc = [n["test"]["accuracy"] for n in nets]
        epoch_s = [h["epoch_s"] for n in nets for h in n["epochs"]]
        arms[arm] = {
            "test_accuracy": acc,
            "mean": statistics.mean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "best_validation": [n["best_validation"] for n in nets],
            "epoch_s": statistics.median(epoch_s),
            "trainable_parameters": next(iter(nets))["trainable_parameters"],
            "wall_s": time.perf_counter() - t1,
            # a run folder already complete (same --work) is not retrained: then this is not
            # its training's peak
            "peak_above_base": peak["peak_above_base"],
            **(
                {"cuda_peak_bytes": torch.cuda.max_memory_allocated(device)}
                if device.type == "cuda"
                else {}
            ),
            "online": online,
            "by_type": by_type(preds, labels, kinds),
            "yes_no": yes_no_diagnostics(preds, labels, questions, images),
        }
        if not online:  # an online run's test figures come from the live backbone's states
            for got, want in zip(arms[arm]["by_type"]["all"]["seeds"], acc, strict=True):
                assert abs(got - want) < 1e-6, (got, want)  # the test figures of train-side
    # time to a result at N = 10 epochs: stage one (its own total, also when the cache was
    # already there) + 10 cached epochs, against the image features alone (online LST reads
    # them from the cache too) + 10 online epochs (seconds per epoch of the run)
    stage_one_s = float(m["timings"].get("total_s", extract_s))
    images_s = float(m["timings"].get("images_s", 0.0))
    to_result = {
        a: (images_s if v["online"] else stage_one_s) + 10 * v["epoch_s"] for a, v in arms.items()
    }
    figures = {
        "cache": res.key,
        "stage_one_s": stage_one_s,
        "time_to_result_10_epochs_s": to_result,
        "limit": args.limit,
        "epochs": args.epochs,
        "r": args.r,
        "batch_size": args.batch_size,
        "seeds": seeds,
        "vision_encoder": args.vision_encoder,
        "vision_pool": args.vision_pool,
        "warmup_steps": args.warmup_steps,
        "lr": args.lr,
        "class_weight": args.class_weight,
        "dropout": args.dropout,
        "batched": args.batched,
        "side_device": str(device),
        "precision": args.precision,
        "arms_asked": chosen,
        "splits": {s: v["n_examples"] for s, v in m["splits"].items()},
        "n_images": img["n_images"],
        "image_tokens": img["n_tokens"],
        "image_d": img["d"],
        "image_bytes": image_bytes,
        "image_bytes_if_per_question": round(image_bytes * n_questions / img["n_images"]),
        "text_state_bytes": text_bytes,
        "extract_s": extract_s,
        "images_encode_s": m["timings"].get("images_s"),
        "arms": arms,
    }
    report(figures, args.plot, args.json)


# what a run's JSON holds about the machine and the command, not about the figures
RUN_KEYS = ("benchmark", "command", "created_at", "machine", "versions")
# what runs merged by --merge must share: the same cache, networks and training
SAME = ("cache", "limit", "epochs", "r", "batch_size", "vision_encoder", "vision_pool",
        "warmup_steps", "lr", "class_weight", "dropout", "precision")  # fmt: skip
# what runs made before a setting was recorded used
SAME_BEFORE = {"precision": "float32"}


def merge(paths: list[Path]) -> dict[str, Any]:
    """The figures of several runs of this bench (run as separate processes, e.g. one per core)
    as one run's: the runs must share ``SAME``; their arms side by side, and an arm run for
    other seeds in another run (e.g. one seed per core) as one arm of all its seeds
    (:func:`join_seeds`). Every arm must end with the same seeds."""
    runs = [json.loads(p.read_text()) for p in paths]
    figures = {k: v for k, v in runs[0].items() if k not in RUN_KEYS}
    figures["arms"], figures["arms_asked"], figures["time_to_result_10_epochs_s"] = {}, [], {}
    seeds: dict[str, list[int]] = {}
    for path, run in zip(paths, runs, strict=True):
        for k in SAME:
            mine, first = (r.get(k, SAME_BEFORE.get(k)) for r in (run, runs[0]))
            if mine != first:
                raise ValueError(
                    f"--merge: {path} has {k}={mine!r}, {paths[0]} has {first!r}; allowed: "
                    "runs of one cache and one training setup"
                )
        for arm, v in run["arms"].items():
            to_result = run["time_to_result_10_epochs_s"][arm]
            if arm not in figures["arms"]:
                figures["arms"][arm], seeds[arm] = v, list(run["seeds"])
                figures["time_to_result_10_epochs_s"][arm] = to_result
                figures["arms_asked"].append(arm)
                continue
            if both := set(seeds[arm]) & set(run["seeds"]):
                raise ValueError(
                    f"--merge: {path} repeats arm {arm!r} for seed {sorted(both)[0]}; allowed: "
                    "each arm once per seed"
                )
            figures["arms"][arm] = join_seeds(figures["arms"][arm], seeds[arm], v, run["seeds"])
            seeds[arm] += run["seeds"]
            # the seeds trained one after another: the added epochs' time
            figures["time_to_result_10_epochs_s"][arm] += 10 * v["epoch_s"]
    kinds = {tuple(sorted(s)) for s in seeds.values()}
    if len(kinds) > 1:
        raise ValueError(
            "--merge: the arms end with different seeds ("
            + ", ".join(f"{a}: {sorted(s)}" for a, s in seeds.items())
            + "); allowed: every arm for the same seeds"
        )
    figures["seeds"] = sorted(kinds.pop())
    figures["merged_from"] = [
        {"json": str(p), "command": r["command"]} for p, r in zip(paths, runs, strict=True)
    ]
    return figures


def join_seeds(
    a: dict[str, Any], seeds_a: list[int], b: dict[str, Any], seeds_b: list[int]
) -> dict[str, Any]:
    """One arm's figures for seeds ``seeds_a`` and, from another run, ``seeds_b``, as one arm's
    for all of them in seed order: per-seed lists joined, means and spreads recomputed, seconds
    per epoch and wall time added (the seeds' networks trained one after another), peak memory
    the larger; ``shape_match`` means weighted by their seeds."""
    order = sorted(range(len(seeds_a) + len(seeds_b)), key=lambda i: [*seeds_a, *seeds_b][i])
    ka, kb = len(seeds_a), len(seeds_b)

    def joined(x: list[Any], y: list[Any]) -> list[Any]:
        both = [*x, *y]
        return [both[i] for i in order]

    def per_seed(x: dict[str, Any], y: dict[str, Any]) -> dict[str, Any]:
        out = {**x, "seeds": joined(x["seeds"], y["seeds"])}
        out["mean"] = statistics.mean(out["seeds"])
        return out

    acc = joined(a["test_accuracy"], b["test_accuracy"])
    out = {
        **a,
        "test_accuracy": acc,
        "mean": statistics.mean(acc),
        "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "best_validation": joined(a["best_validation"], b["best_validation"]),
        "epoch_s": a["epoch_s"] + b["epoch_s"],
        "wall_s": a.get("wall_s", 0.0) + b.get("wall_s", 0.0),
        "peak_above_base": max(a["peak_above_base"], b["peak_above_base"]),
        "by_type": {t: per_seed(v, b["by_type"][t]) for t, v in a["by_type"].items()},
    }
    if "yes_no" in a and "yes_no" in b:
        ya, yb = a["yes_no"], b["yes_no"]
        match = {
            asked: {
                seen: {
                    **v,
                    "mean": (v["mean"] * ka + yb["shape_match"][asked][seen]["mean"] * kb)
                    / (ka + kb),
                }
                for seen, v in row.items()
            }
            for asked, row in ya["shape_match"].items()
        }
        by_subject = {k: per_seed(v, yb["by_subject"][k]) for k, v in ya["by_subject"].items()}
        out["yes_no"] = {"by_subject": by_subject, "shape_match": match}
    return out


def report(figures: dict[str, Any], plot: Path | None, json_path: Path | None) -> None:
    """Print the arms' table, the image bytes and the per-type table; draw ``plot``; write
    ``json_path``."""
    arms, to_result = figures["arms"], figures["time_to_result_10_epochs_s"]
    n_questions = sum(figures["splits"].values())
    print()
    print(
        table(
            [
                f"side network (r = {figures['r']}, {len(figures['seeds'])} seeds)",
                "test acc",
                "s/epoch",
                "10 epochs (+ stage one) s",
                "peak MB",
                "trainable",
            ],
            [
                [
                    a,
                    f"{v['mean']:.1f} ± {v['std']:.1f}",
                    f"{v['epoch_s']:.1f}",
                    f"{to_result[a]:.0f}",
                    f"{v['peak_above_base'] / 2**20:.0f}",
                    v["trainable_parameters"],
                ]
                for a, v in arms.items()
            ],
        )  # fmt: skip
    )
    print(
        f"\nimage features: {figures['n_images']} images x {figures['image_tokens']} tokens x "
        f"{figures['image_d']}: {figures['image_bytes'] / 2**20:.1f} MB stored once per image, "
        f"{figures['image_bytes_if_per_question'] / 2**20:.1f} MB if per question "
        f"({n_questions} questions); text states {figures['text_state_bytes'] / 2**20:.1f} MB"
    )
    print()
    print(
        table(
            ["question type", "n", *arms, "majority answer"],
            [
                [
                    t,
                    v["n"],
                    *(f"{arms[a]['by_type'][t]['mean']:.1f}" for a in arms),
                    f"{v['majority']:.1f}",
                ]
                for t, v in next(iter(arms.values()))["by_type"].items()
            ],
        )  # fmt: skip
    )
    diagnosed = {a: v["yes_no"] for a, v in arms.items() if "yes_no" in v}
    for a, d in diagnosed.items():
        subjects = ", ".join(f"{k} {v['mean']:.1f}" for k, v in d["by_subject"].items())
        print(f"\n{a}: yes/no questions {subjects}; naming a shape, by the shape asked:")
        print(
            table(
                ["asked \\ in the image", *SHAPES],
                [
                    [
                        asked,
                        *(
                            f"{row[s]['mean']:.1f} (n={row[s]['n']})" if s in row else "-"
                            for s in SHAPES
                        ),
                    ]
                    for asked, row in d["shape_match"].items()
                ],
            )  # fmt: skip
        )
    if plot is not None:
        from bench.plots import vqa_question_types

        plot.parent.mkdir(parents=True, exist_ok=True)
        print(f"plot: {vqa_question_types(figures, plot)}")
    write_json(json_path, "vqa", figures)


if __name__ == "__main__":
    main()
