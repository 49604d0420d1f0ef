"""Vision-and-language metrics as the paper reports them: the VQA score, GQA / NLVR2 accuracy
(``stages.tasks.compute_metrics``), and captioning CIDEr through ``pycocoevalcap``.

The VQA answer normalisation is hand-written here, as in every VQA codebase (VL-T5, LXMERT,
BEiT-3 each carry their own copy): it follows the official evaluation
(github.com/GT-Vision-Lab/VQA, ``vqaEval.py``: ``processPunctuation`` then
``processDigitArticle``; visualqa.org/evaluation.html describes the steps), including its
quirks: when a comma sits between two digits anywhere in the answer, every punctuation mark
is deleted instead of replaced by a space ("100,978" -> "100978"); the period rule keeps a
period followed by a digit. The contraction table is generated from the canonical forms
(each form with one or more apostrophes missing maps back to it), which covers the official
table's entries except its few typos.

The VQA score: with the 10 human answers of the official annotations, an answer's accuracy is
min(#humans who gave it / 3, 1) averaged over the 10 leave-one-out subsets of 9 humans
(``vqa_human_accuracy``: 0, 0.3, 0.6, 0.9, 1 for 0..4+ matching humans); VL-T5's data files carry
that score per answer in ``label`` ({answer: score}), and its evaluator scores a prediction by
``label[prediction]`` (``vqa_score``), which is what the task ``vqa`` reports.

CIDEr (CIDEr-D, as the COCO caption evaluation computes it) comes from ``pycocoevalcap``; with
``tokenize=True`` the captions first go through its PTB tokenizer (Java, as in the official
evaluation); not hand-written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from stages.errors import StageError

_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've "
    "it'll let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
    "oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've somebody'd "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd "
    "they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're "
    "why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()


def _contraction_map() -> dict[str, str]:
    out: dict[str, str] = {}
    for form in _CONTRACTIONS:
        cuts = [i for i, c in enumerate(form) if c == "'"]
        for mask in range(1, 1 << len(cuts)):  # every non-empty subset of apostrophes dropped
            drop = {cuts[k] for k in range(len(cuts)) if mask >> k & 1}
            out.setdefault("".join(c for i, c in enumerate(form) if i not in drop), form)
    return out


CONTRACTIONS = _contraction_map()
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")  # fmt: skip
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, verbatim in effect
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``."""
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words to digits, no articles,
    missing apostrophes of contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the official evaluation compares it (whitespace, punctuation, digits,
    articles, contractions)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_human_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official per-question accuracy: min(#matching humans / 3, 1), averaged over the
    leave-one-out subsets of the human answers (10 in VQA v2). The prediction is normalised;
    the human answers too (the official code punctuation-processes them only when they
    differ, which changes nothing when they are equal)."""
    if not human_answers:
        raise StageError("vqa_human_accuracy needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in human_answers]
    accs = []
    for k in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != k and g == pred)
        accs.append(min(1.0, matches / 3))
    return float(np.mean(accs))


def vqa_score(
    predictions: Sequence[str], labels: Sequence[Mapping[str, float]], *, normalize: bool = True
) -> float:
    """VL-T5's VQA score x100: the mean over questions of ``label[prediction]`` (0 when the
    predicted answer is not in the question's label). ``normalize``: pass free-form answers
    (generation) through the official normalisation first; a classifier's answers are already
    in the label's form."""
    if len(predictions) != len(labels):
        raise StageError(f"{len(predictions)} predictions for {len(labels)} questions")
    if not labels:
        return 0.0
    total = 0.0
    for pred, lab in zip(predictions, labels, strict=True):
        total += lab.get(normalize_vqa_answer(pred) if normalize else pred, 0.0)
    return total / len(labels) * 100


def vqa_score_ids(preds: np.ndarray, targets: Sequence[Sequence[tuple[int, float]]]) -> float:
    """The VQA score x100 of class ids: each question's score of the predicted class (its
    ``targets`` are (class id, score) pairs), averaged."""
    if len(preds) != len(targets):
        raise StageError(f"{len(preds)} predictions for {len(targets)} questions")
    if not len(targets):
        return 0.0
    scores = [dict(t).get(int(p), 0.0) for p, t in zip(preds, targets, strict=True)]
    return float(np.mean(scores)) * 100


def cider(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    *,
    tokenize: bool = True,
) -> dict[str, float]:
    """CIDEr-D x100 (``cider``) of one predicted caption per image against its references,
    from ``pycocoevalcap`` (``Cider``; ``PTBTokenizer`` first when ``tokenize``); also the
    per-image scores' minimum and maximum. Every predicted image needs references."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise StageError("CIDEr needs pycocoevalcap (pip install 'lst-pipeline[vl]')") from None
    missing = [k for k in predictions if k not in references]
    if missing:
        raise StageError(f"{len(missing)} predicted images have no references, e.g. {missing[0]!r}")
    if not predictions:
        raise StageError("CIDEr of no predictions")
    gts = {k: list(references[k]) for k in predictions}
    res = {k: [predictions[k]] for k in predictions}
    if tokenize:
        import shutil

        if shutil.which("java") is None:
            raise StageError("the PTB tokenizer of pycocoevalcap needs java; or tokenize=False")
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
        res = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    score, per_image = Cider().compute_score(gts, res)
    per_image = np.asarray(per_image, dtype=float)
    return {
        "cider": float(score) * 100,
        "cider_min": float(per_image.min()) * 100,
        "cider_max": float(per_image.max()) * 100,
    }
