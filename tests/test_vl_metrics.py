"""VQA answer normalisation (the official evaluation's), the VQA score, and CIDEr from
pycocoevalcap, on small hand-checked examples."""

from __future__ import annotations

import numpy as np
import pytest

from stages.tasks import VL_TASKS, compute_metrics
from stages.vl_metrics import (
    cider,
    normalize_vqa_answer,
    process_punctuation,
    vqa_human_accuracy,
    vqa_score,
    vqa_score_ids,
)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        # the examples of visualqa.org/evaluation.html
        ("dont", "don't"),  # a contraction missing its apostrophe
        ("100,978", "100978"),  # a comma between digits: no space
        ("2:50 pm", "2:50 pm"),  # colons kept (times)
        ("girl's", "girl's"),  # apostrophes kept (possessives)
        ("3.5", "3.5"),  # a decimal point kept
        ("Two", "2"),  # lower case, number words to digits
        ("The red car.", "red car"),  # articles and periods removed
        ("an apple", "apple"),
        ("black-and-white", "black and white"),  # punctuation becomes a space ...
        ("red, white", "red white"),  # ... or nothing next to a space
        ("yes!", "yes"),
        ("  none \n", "0"),
        ("whats up", "what's up"),
        ("couldnt've", "couldn't've"),  # two apostrophes, one missing
        ("Youre", "you're"),
    ],
)
def test_official_vqa_answer_normalisation(raw, want):
    assert normalize_vqa_answer(raw) == want


def test_process_punctuation_quirk_of_the_official_code():
    # with a digit-comma-digit anywhere, every punctuation mark is deleted (not spaced)
    assert process_punctuation("1,000 red-blue") == "1000 redblue"
    assert process_punctuation("red-blue") == "red blue"


@pytest.mark.parametrize(("matching", "want"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)])
def test_vqa_human_accuracy_is_min_humans_over_3_averaged_over_9_of_10(matching, want):
    humans = ["two"] * matching + ["three"] * (10 - matching)
    assert vqa_human_accuracy("2", humans) == pytest.approx(want)


def test_vqa_score_uses_the_label_scores():
    labels = [{"2": 1.0, "3": 0.3}, {"yes": 0.6}, {"red": 1.0}]
    # "Two" normalises to "2" (1.0); "yes" scores 0.6; "blue" is not in the label (0)
    assert vqa_score(["Two", "yes", "blue"], labels) == pytest.approx((1.0 + 0.6 + 0) / 3 * 100)
    assert vqa_score(["Two", "yes", "red"], labels, normalize=False) == pytest.approx(
        (0 + 0.6 + 1.0) / 3 * 100
    )
    targets = [((0, 1.0), (1, 0.3)), ((4, 0.6),), ()]
    assert vqa_score_ids(np.asarray([1, 4, 0]), targets) == pytest.approx((0.3 + 0.6) / 3 * 100)


def test_compute_metrics_vqa_score_with_targets_and_accuracy_without():
    spec = VL_TASKS["vqa"]
    preds, labels = np.asarray([0, 1, 2, 2]), np.asarray([0, 0, 2, 1])
    targets = [((0, 1.0),), ((0, 1.0), (1, 0.6)), ((2, 0.9),), ((1, 1.0),)]
    with_t = compute_metrics(spec, preds, labels, targets)
    assert with_t["accuracy"] == 50.0
    assert with_t["vqa_score"] == pytest.approx((1.0 + 0.6 + 0.9 + 0) / 4 * 100)
    assert with_t["score"] == with_t["vqa_score"]
    assert compute_metrics(spec, preds, labels) == {"accuracy": 50.0, "score": 50.0}
    for task in ("gqa", "nlvr2"):  # plain accuracy
        assert compute_metrics(VL_TASKS[task], preds, labels)["score"] == 50.0


def test_cider_from_pycocoevalcap_on_a_hand_checked_example():
    """Two images, one reference each, no n-gram shared between them: every n-gram's idf is
    log 2, so an exact 2-word prediction has cosine 1 for 1- and 2-grams and no 3-/4-grams:
    CIDEr-D = 10 x (1 + 1 + 0 + 0) / 4 = 5 (length penalty exp(0) = 1); a prediction sharing
    nothing scores 0; the corpus score is the mean, 2.5 (x100 here)."""
    refs = {"A": ["a b"], "B": ["c d"]}
    out = cider(refs, {"A": "a b", "B": "x y"}, tokenize=False)
    assert out == pytest.approx({"cider": 250.0, "cider_min": 0.0, "cider_max": 500.0})
    # one word wrong: the 2-gram is gone and the 1-gram cosine drops
    worse = cider(refs, {"A": "a z", "B": "x y"}, tokenize=False)
    assert 0 < worse["cider"] < 250.0


def test_cider_tokenizes_with_the_ptb_tokenizer():
    # lower case, the final period split off and dropped: the example above again
    refs = {"A": ["Dogs run."], "B": ["cats sleep"]}
    assert cider(refs, {"A": "dogs RUN", "B": "x y"})["cider"] == pytest.approx(250.0)
