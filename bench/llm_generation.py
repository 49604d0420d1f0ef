"""Generation with a decoder-only LLM: SmolLM2-135M answers SST-2 reviews in one word.

    python -m bench.llm_generation --json bench/results/llm_generation.json

Writes prompt/answer JSONL files from SST-2 sentences (prompt ``"Review: <sentence>\\nAnswer with
one word: positive or negative.\\nAnswer:"``, answer ``" positive"`` or ``" negative"``; the first
``--train`` sentences of train.tsv for training, the next ``--held-out`` for validation and as
many again for test), extracts the cache with the packaged ``smollm2-135m`` (task ``custom``,
``problem: generation``), trains an r = 8 side network with the frozen LM head, then generates
greedily with the live backbone (``pipeline evaluate``'s code: ``stages.evaluate``) and reports
the share of valid answers (one of the two words) and the exact-match accuracy, with the exact
match the cache measured (teacher-forced argmax) beside it.
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import glue_dir, parser, table, write_json

PROMPT = "Review: {}\nAnswer with one word: positive or negative.\nAnswer:"
WORDS = ("positive", "negative")


def sst2_generation_jsonl(
    folder: Path, glue: Path, sizes: tuple[tuple[str, int], ...]
) -> dict[str, str]:
    """Prompt/answer JSONL files from SST-2's train.tsv, in its order: split -> path."""
    with (glue / "SST-2" / "train.tsv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    files, at = {}, 0
    for split, n in sizes:
        path = folder / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for r in rows[at : at + n]:
                answer = " positive" if r["label"] == "1" else " negative"
                prompt = PROMPT.format(r["sentence"].strip())
                f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
        files[split] = str(path)
        at += n
    return files


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=200, help="training pairs")
    p.add_argument("--held-out", type=int, default=100, help="validation pairs, and test pairs")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--work", type=Path, default=None, help="cache and runs here (default: temp)")
    args = p.parse_args()
    if args.quick:
        args.train, args.held_out, args.epochs = 100, 40, 3
    glue = glue_dir(args.data_dir)

    from pipeline.config import Config, apply_overrides
    from stages.evaluate import Predictor, generate_ids, generation_metrics
    from stages.extract import extract
    from stages.tasks import load_task_of
    from stages.train_side import train_side

    work = args.work or Path(tempfile.mkdtemp(prefix="lst-llm-generation-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = (("train", args.train), ("validation", args.held_out), ("test", args.held_out))
    files = sst2_generation_jsonl(work, glue, sizes)
    layers = list(range(0, 31, 5))  # states 0, 5, ..., 30: the ladders of blocks 4, 9, ..., 29
    cfg = apply_overrides(
        Config(),
        {
            "task.name": "custom",
            "task.problem": "generation",
            "task.files": files,
            "backbone.name": "smollm2-135m",
            "backbone.max_length": 128,
            "cache.root": str(work / "cache"),
            "cache.dtype": "float16",
            "extract.layers": layers,
            "extract.side_init": ["magnitude"],
            "extract.reduction_factors": [args.r],
            "train_side.reduction_factors": [args.r],
            "train_side.kept_layers": [n - 1 for n in layers[1:]],
            "train_side.init": "magnitude",
            "train_side.learning_rates": [args.lr],
            "train_side.epochs": args.epochs,
            "train_side.batch_size": 16,
            "train_side.warmup_ratio": 0.06,
            "train_side.run_dir": str(work / "runs"),
        },
    )
    t0 = time.perf_counter()
    key = extract(cfg, progress=False).key
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = train_side(cfg, cache_key=key, progress=False)
    train_s = time.perf_counter() - t0
    (name, net), *_ = run.metrics["networks"].items()

    t0 = time.perf_counter()
    predictor = Predictor(run.folder, name)
    data = load_task_of(cfg.task)
    test = data.splits["test"]
    tok = predictor.backbone.tokenizer
    ids = generate_ids(predictor, test)  # once: the words and the exact match read the same ids
    words = [tok.decode(t, skip_special_tokens=True).strip() for t in ids]
    valid = 100 * sum(w in WORDS for w in words) / len(words)
    right = 100 * sum(w == (ex.answer or "").strip() for w, ex in zip(words, test, strict=True))
    em = generation_metrics(predictor, test, ids)["exact_match"]
    generate_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "backbone": "smollm2-135m",
        "cache": key,
        "network": name,
        "trainable_parameters": net["trainable_parameters"],
        "train": args.train,
        "test": len(test),
        "epochs": args.epochs,
        "valid_pct": valid,
        "accuracy_pct": right / len(test),
        "exact_match_generated": em,
        "exact_match_cache": net["test"]["exact_match"],
        "answer_loss_cache": net["test"]["answer_loss"],
        "best_epoch": net["best_epoch"],
        "extract_s": round(extract_s, 1),
        "train_s": round(train_s, 1),
        "generate_and_evaluate_s": round(generate_s, 1),
        "answers_seen": sorted(set(words))[:10],
    }
    rows = [[k, f"{v:.1f}" if isinstance(v, float) else str(v)] for k, v in out.items()]
    print(table(["figure", "value"], rows))
    write_json(args.json, "llm_generation", out)


if __name__ == "__main__":
    main()
