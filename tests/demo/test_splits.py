"""The demo's split of easy-VQA: warm-up pool vs distillation data by picture, and the seeded noisy labels."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from demo.splits import (
    ANSWERS,
    binding_records,
    is_negated,
    picture_index,
    picture_labels,
    warmup_and_distillation,
    with_label_noise,
    without_label_noise,
    write_balanced_test,
    write_splits,
)


def records(n: int = 400) -> list[dict]:
    out = []
    for i in range(n):
        kind = ("colour", "shape", "yes_no")[i % 3]
        value = ANSWERS[kind][i % len(ANSWERS[kind])]
        out.append({"id": f"train-{i}", "image": f"images/train/{i // 3}.png", "type": kind,
                    "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": value}]})
    return out


def test_warmup_and_distillation_are_disjoint_by_picture():
    warmup, distill = warmup_and_distillation(records())
    assert {picture_index(r) % 4 for r in warmup} == {0} and 0 not in {picture_index(r) % 4 for r in distill}
    assert len(warmup) + len(distill) == 400 and not {r["image"] for r in warmup} & {r["image"] for r in distill}


def test_label_noise_is_seeded_of_the_right_rate_and_type():
    clean = records(3000)
    noisy = with_label_noise(clean, 0.4, seed=0)
    assert noisy == with_label_noise(clean, 0.4, seed=0) and noisy != with_label_noise(clean, 0.4, seed=1)
    changed = [(c, n) for c, n in zip(clean, noisy, strict=True) if "clean_answer" in n]
    assert 0.36 < len(changed) / len(clean) < 0.44
    for c, n in changed:
        new, old = n["conversations"][-1]["value"], c["conversations"][-1]["value"]
        assert new != old and n["clean_answer"] == old and new in ANSWERS[c["type"]]
    assert clean[0]["conversations"][-1]["value"] == ANSWERS["colour"][0]  # the input is not modified
    assert Counter(n["conversations"][-1]["value"] for c, n in changed if c["type"] == "yes_no").keys() <= {"yes", "no"}
    assert with_label_noise(clean, 0.0, seed=0) == clean
    restored = without_label_noise(noisy)
    assert restored == clean and any("clean_answer" in n for n in noisy)  # the input keeps its noise
    with pytest.raises(ValueError, match="rate must be in"):
        with_label_noise(clean, 1.0, seed=0)


def test_picture_labels_use_the_clean_answers():
    noisy = with_label_noise(records(), 0.5, seed=0)
    labels = picture_labels(noisy)
    colour_of = {r["image"]: r.get("clean_answer", r["conversations"][-1]["value"]) for r in noisy if r["type"] == "colour"}
    assert all(labels[image][0] == colour for image, colour in colour_of.items())


def test_write_splits(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(records()))
    warmup_path, distill_path = write_splits(tmp_path, noise=0.3, distill_limit=50)
    distill = json.loads(distill_path.read_text())
    assert len(distill) == 50 and any("clean_answer" in r for r in distill)
    assert all(picture_index(r) % 4 == 0 for r in json.loads(warmup_path.read_text()))


def test_balanced_test_has_equal_seeded_shares_of_each_type(tmp_path):
    test = [dict(r, id=f"test-{i}") for i, r in enumerate(records(300))]
    test += [dict(r, id=f"test-y{i}") for i, r in enumerate(records(300)) if r["type"] == "yes_no"]  # 2/3 yes/no
    (tmp_path / "test.json").write_text(json.dumps(test))
    path = write_balanced_test(tmp_path, 40)
    chosen = json.loads(path.read_text())
    assert path.name == "test_balanced.json" and Counter(r["type"] for r in chosen) == {
        "colour": 40, "shape": 40, "yes_no": 40}
    assert len({r["id"] for r in chosen}) == 120 and chosen == json.loads(write_balanced_test(tmp_path, 40).read_text())
    with pytest.raises(ValueError, match="fewer than per_type=101"):
        write_balanced_test(tmp_path, 101)


def yes_no_record(i: int, question: str, value: str) -> dict:
    return {"id": f"train-yn{i}", "image": f"images/train/{i}.png", "type": "yes_no",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": value}]}


def test_negated_questions_are_recognised_in_easy_vqa_wordings():
    negated = ["is there not a red shape?", "is no circle present?", "does the image not contain a teal shape?",
               "is there not a triangle in the image?"]
    plain = ["is there a red shape?", "is a circle present?", "does the image contain a teal shape?",
             "is there a triangle in the image?"]
    assert [is_negated(yes_no_record(0, q, "yes")) for q in negated + plain] == [True] * 4 + [False] * 4


def test_binding_records_balance_away_what_the_wording_predicts():
    # easy-VQA-like skew: plain questions mostly "no", negated ones mostly "yes"
    skewed = ([yes_no_record(i, "is there a red shape?", "no" if i % 5 else "yes") for i in range(100)]
              + [yes_no_record(100 + i, "is there not a red shape?", "yes" if i % 5 else "no") for i in range(100)])
    others = [r for r in records(90) if r["type"] != "yes_no"]  # 30 colour and 30 shape questions
    pool = skewed + others

    plain = binding_records(pool, with_negated=False, yes_no_share=0.6, rng=random.Random(0))
    yes_no = [r for r in plain if r["type"] == "yes_no"]
    assert not any(is_negated(r) for r in yes_no)
    distinct = {r["id"]: r for r in yes_no}.values()
    assert Counter(r["conversations"][-1]["value"] for r in distinct) == {"yes": 20, "no": 20}  # all 20 plain "yes"
    assert len(yes_no) == 80 and plain[80:] == others  # repeated to 80 / 140 (share 0.6 asked): every other question

    both = binding_records(pool, with_negated=True, yes_no_share=0.75, rng=random.Random(0))
    groups = Counter((is_negated(r), r["conversations"][-1]["value"]) for r in both if r["type"] == "yes_no")
    assert groups == {(False, "yes"): 40, (False, "no"): 40, (True, "yes"): 40, (True, "no"): 40}  # 80 x 2 copies
    assert both[160:] == others
    assert binding_records(pool, with_negated=True, yes_no_share=0.75, rng=random.Random(0)) == both  # seeded


def test_binding_records_name_a_missing_group():
    only_no = [yes_no_record(i, "is there a red shape?", "no") for i in range(10)]
    with pytest.raises(ValueError, match=r"every group .*found \[\(False, 'no'\)\]"):
        binding_records(only_no, with_negated=False, yes_no_share=0.5, rng=random.Random(0))
    with pytest.raises(ValueError, match="yes_no_share"):
        binding_records(only_no, with_negated=False, yes_no_share=1.0, rng=random.Random(0))
