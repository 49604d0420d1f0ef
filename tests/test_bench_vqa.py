"""``bench.vqa --merge``: arms of one cache and training setup, run as separate processes, side
by side as one run's figures, an arm's seeds from several runs joined; runs of another setup,
an arm twice for a seed, or arms ending with other seeds, are refused."""

from __future__ import annotations

import json

import pytest

from bench.vqa import SAME, merge, report


def _run(tmp_path, arm, mean, seeds=(0,), name=None, **over):
    """A run's JSON with one arm whose every seed scores ``mean``."""
    accs = [mean] * len(seeds)
    by_type = {"all": {"seeds": accs, "mean": mean, "n": 10, "majority": 40.0}}
    figures = {
        "benchmark": "vqa",
        "command": f"python -m bench.vqa --arms {arm} --seeds {seeds}",
        **{k: 1 for k in SAME},
        "seeds": list(seeds),
        "splits": {"train": 30, "test": 10},
        "n_images": 4,
        "image_tokens": 17,
        "image_d": 192,
        "image_bytes": 1000,
        "image_bytes_if_per_question": 10000,
        "text_state_bytes": 5000,
        "arms_asked": [arm],
        "time_to_result_10_epochs_s": {arm: 100.0 * mean},
        "arms": {
            arm: {
                "test_accuracy": accs,
                "best_validation": accs,
                "mean": mean,
                "std": 0.0,
                "epoch_s": 1.0,
                "peak_above_base": 2**20,
                "trainable_parameters": 7,
                "by_type": by_type,
            }
        },
        **over,
    }
    path = tmp_path / f"{name or arm}.json"
    path.write_text(json.dumps(figures))
    return path


def test_merged_runs_hold_every_arm_with_its_own_figures(tmp_path, capsys):
    a, b = _run(tmp_path, "with images", 90.0), _run(tmp_path, "text alone", 60.0)
    figures = merge([a, b])
    assert list(figures["arms"]) == ["with images", "text alone"]
    assert figures["arms"]["text alone"]["mean"] == 60.0
    assert figures["time_to_result_10_epochs_s"] == {"with images": 9000.0, "text alone": 6000.0}
    assert [m["command"] for m in figures["merged_from"]] == [
        "python -m bench.vqa --arms with images --seeds (0,)",
        "python -m bench.vqa --arms text alone --seeds (0,)",
    ]
    out = tmp_path / "merged.json"
    report(figures, tmp_path / "merged.png", out)
    assert "90.0" in capsys.readouterr().out and (tmp_path / "merged.png").stat().st_size > 5000
    assert set(json.loads(out.read_text())["arms"]) == {"with images", "text alone"}


@pytest.mark.parametrize("key", ["class_weight", "batch_size", "epochs"])
def test_runs_of_another_setup_or_a_repeated_arm_are_refused(tmp_path, key):
    a = _run(tmp_path, "with images", 90.0)
    other = _run(tmp_path, "text alone", 60.0, **{key: 7})
    with pytest.raises(ValueError, match=f"has {key}=7.*allowed: runs of one"):
        merge([a, other])
    with pytest.raises(ValueError, match="repeats arm 'with images' for seed 0; allowed: each arm"):
        merge([a, a])


def test_an_arms_seeds_from_several_runs_join_in_seed_order(tmp_path):
    """Seed 0 in one run, seeds 2 and 1 in another (one process per core): one arm of seeds
    0, 1, 2 in seed order, its mean and spread recomputed, its seconds per epoch added; the
    other arm must then hold the same seeds."""
    a = _run(tmp_path, "with images", 90.0, seeds=(0,), name="s0")
    b = _run(tmp_path, "with images", 96.0, seeds=(2, 1), name="s21")
    text = _run(tmp_path, "text alone", 60.0, seeds=(0, 1, 2))
    for path, acc, k in ((a, 10.0, 1), (b, 40.0, 2)):  # the yes/no diagnostics of each run
        run = json.loads(path.read_text())
        if k == 2:  # seeds 2 and 1 score 96 and 93
            run["arms"]["with images"]["test_accuracy"] = [96.0, 93.0]
            run["arms"]["with images"]["by_type"]["all"]["seeds"] = [96.0, 93.0]
        run["arms"]["with images"]["yes_no"] = {
            "by_subject": {"naming a shape": {"seeds": [acc] * k, "mean": acc, "n": 5}},
            "shape_match": {"circle": {"circle": {"mean": acc, "n": 3}}},
        }
        path.write_text(json.dumps(run))
    figures = merge([a, b, text])
    arm = figures["arms"]["with images"]
    assert figures["seeds"] == [0, 1, 2] and arm["test_accuracy"] == [90.0, 93.0, 96.0]
    assert arm["mean"] == pytest.approx(93.0) and arm["std"] == pytest.approx(3.0)
    assert arm["by_type"]["all"]["seeds"] == [90.0, 93.0, 96.0] and arm["epoch_s"] == 2.0
    assert figures["time_to_result_10_epochs_s"]["with images"] == 9000.0 + 10 * 1.0
    yes_no = arm["yes_no"]
    assert yes_no["by_subject"]["naming a shape"]["seeds"] == [10.0, 40.0, 40.0]
    assert yes_no["shape_match"]["circle"]["circle"] == {"mean": 30.0, "n": 3}  # by seeds
    with pytest.raises(ValueError, match="the arms end with different seeds .*allowed: every arm"):
        merge([a, text])


def test_yes_no_diagnostics_split_by_subject_and_by_the_shape_asked():
    """The yes/no questions naming a shape are scored by the shape asked against the image's
    shape (known from the image's "what shape" question); those naming a colour apart."""
    import numpy as np

    from bench.vqa import yes_no_diagnostics
    from stages.vqa import EASY_VQA_ANSWERS

    a = {name: i for i, name in enumerate(EASY_VQA_ANSWERS)}
    rows = [  # question, answer, image
        ("what shape is in the image?", "circle", "0"),
        ("is there a circle?", "yes", "0"),
        ("is there a triangle?", "no", "0"),
        ("what shape is present?", "triangle", "1"),
        ("is there a circle?", "no", "1"),
        ("is there a red shape?", "yes", "1"),
        ("is there a circle?", "no", "2"),  # image 2's shape is unknown: left out of the match
    ]
    questions, images = [q for q, _, _ in rows], [i for _, _, i in rows]
    labels = np.asarray([a[x] for _, x, _ in rows])
    always_no = np.where(labels >= 0, a["no"], 0)  # the text prior of "is there a circle?"
    got = yes_no_diagnostics([labels, always_no], labels, questions, images)
    assert got["by_subject"]["naming a shape"]["n"] == 4
    assert got["by_subject"]["naming a shape"]["seeds"] == [100.0, 75.0]
    assert got["by_subject"]["naming a colour"] == {"seeds": [100.0, 0.0], "mean": 50.0, "n": 1}
    match = got["shape_match"]
    assert match["circle"]["circle"] == {"mean": 50.0, "n": 1}  # one network right, one wrong
    assert match["circle"]["triangle"] == {"mean": 100.0, "n": 1}
    assert match["triangle"] == {"circle": {"mean": 100.0, "n": 1}}
    assert "rectangle" not in match


def test_a_run_made_before_precision_was_recorded_is_a_float32_run(tmp_path):
    old = _run(tmp_path, "with images", 90.0)
    figures = json.loads(old.read_text())
    del figures["precision"]  # written before train_side.precision existed
    old.write_text(json.dumps(figures))
    f32 = _run(tmp_path, "text alone", 60.0, precision="float32")
    assert set(merge([old, f32])["arms"]) == {"with images", "text alone"}
    bf16 = _run(tmp_path, "text alone", 60.0, name="bf16", precision="bfloat16")
    with pytest.raises(ValueError, match="has precision='bfloat16'.*has 'float32'"):
        merge([old, bf16])
