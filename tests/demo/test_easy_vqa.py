"""easy-VQA converted to LLaVA JSON: full counts, pixels and answers as the package has them, the trainer's loader
reads it back, seeded subsets are deterministic and stratified, a second conversion is a no-op."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import easy_vqa
import numpy as np
import pytest
from PIL import Image

from demo.easy_vqa import (
    FULL_COUNTS,
    QUESTION_TYPES,
    convert_easy_vqa,
    easy_vqa_records,
    image_paths,
    stratified_subset,
)
from student_trainer.data import load_dataset_samples, load_question_types


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The whole data set, converted once (about a second: pictures are hard-linked or copied, not decoded)."""
    out = tmp_path_factory.mktemp("easy_vqa_full")
    return out, convert_easy_vqa(out)


def package_questions(split):
    return easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_listing_has_every_question_once(split):
    records = easy_vqa_records(split)
    assert len(records) == FULL_COUNTS[split] == len(package_questions(split)[0])
    assert len({r["id"] for r in records}) == len(records)
    assert set(Counter(r["type"] for r in records)) == set(QUESTION_TYPES)
    assert {r["image"] for r in records} == {f"images/{split}/{i}.png" for i in image_paths(split)}


def test_full_conversion_writes_all_questions_and_pictures(full):
    out, result = full
    assert result["counts"] == FULL_COUNTS
    assert result["images"] == {"train": 4000, "test": 1000}
    # easy-vqa's README: 28,407 train and 7,136 test questions are yes/no.
    assert result["types"]["train"]["yes_no"] == 28_407 and result["types"]["test"]["yes_no"] == 7_136
    for split in ("train", "test"):
        records = json.loads((out / f"{split}.json").read_text())
        assert len(records) == FULL_COUNTS[split]
        assert len(list((out / "images" / split).glob("*.png"))) == result["images"][split]
    assert json.loads((out / "manifest.json").read_text())["counts"] == FULL_COUNTS


@pytest.mark.parametrize("split", ["train", "test"])
def test_records_carry_the_package_pictures_questions_and_answers(full, split):
    out, _ = full
    texts, answers, image_ids = package_questions(split)
    sources = image_paths(split)
    records = json.loads((out / f"{split}.json").read_text())
    picked = np.random.default_rng(0).choice(len(records), size=25, replace=False)
    for index in picked:
        record = records[index]
        assert record["id"] == f"{split}-{index}"
        assert record["conversations"] == [
            {"from": "human", "value": f"<image>\n{texts[index]}"}, {"from": "gpt", "value": answers[index]},
        ]
        expected = {"circle": "shape", "rectangle": "shape", "triangle": "shape", "yes": "yes_no", "no": "yes_no"}
        assert record["type"] == expected.get(answers[index], "colour")
        converted = np.asarray(Image.open(out / record["image"]).convert("RGB"))
        original = np.asarray(Image.open(sources[image_ids[index]]).convert("RGB"))
        assert converted.shape == (64, 64, 3)
        np.testing.assert_array_equal(converted, original)


def test_the_trainers_loader_reads_a_conversion_back(tmp_path):
    result = convert_easy_vqa(tmp_path, train_limit=60, test_limit=30, seed=3)
    for split in ("train", "test"):
        records = json.loads((tmp_path / f"{split}.json").read_text())
        samples, report = load_dataset_samples(tmp_path / f"{split}.json")
        assert report.count == 0 and len(samples) == result["counts"][split]
        assert [s.sample_id for s in samples] == [r["id"] for r in records]
        assert [s.turns[-1].text for s in samples] == [r["conversations"][-1]["value"] for r in records]
        assert all(len(s.images) == 1 and s.images[0].size == (64, 64) for s in samples)
        assert load_question_types(tmp_path / f"{split}.json") == {r["id"]: r["type"] for r in records}
    # Each loaded test sample against the package: question, answer and the decoded picture.
    test_texts, test_answers, test_image_ids = easy_vqa.get_test_questions()
    for sample in samples:
        index = int(sample.sample_id.split("-")[1])
        assert sample.turns[-1].text == test_answers[index]
        assert sample.turns[0].text == f"<image>\n{test_texts[index]}"
        original = Image.open(image_paths("test")[test_image_ids[index]]).convert("RGB")
        np.testing.assert_array_equal(np.asarray(sample.images[0]), np.asarray(original))


def test_limits_are_seeded_stratified_and_deterministic(tmp_path):
    first = convert_easy_vqa(tmp_path / "a", train_limit=300, test_limit=90, seed=7)
    again = convert_easy_vqa(tmp_path / "b", train_limit=300, test_limit=90, seed=7)
    other = convert_easy_vqa(tmp_path / "c", train_limit=300, test_limit=90, seed=8)
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.json").read_bytes() == (tmp_path / "b" / f"{split}.json").read_bytes()
        assert (tmp_path / "a" / f"{split}.json").read_bytes() != (tmp_path / "c" / f"{split}.json").read_bytes()
    assert first["counts"] == again["counts"] == other["counts"] == {"train": 300, "test": 90}
    # Each type keeps its share of the full split (largest remainder: within one question).
    full_types = Counter(r["type"] for r in easy_vqa_records("train"))
    for question_type, count in first["types"]["train"].items():
        assert abs(count - 300 * full_types[question_type] / FULL_COUNTS["train"]) < 1
    # Ids keep the package's order; only pictures of kept questions are written.
    ids = [r["id"] for r in json.loads((tmp_path / "a" / "train.json").read_text())]
    assert ids == sorted(ids, key=lambda i: int(i.split("-")[1]))
    assert len(list((tmp_path / "a" / "images" / "test").glob("*.png"))) == first["images"]["test"] <= 90


def test_a_tiny_limit_still_covers_every_type():
    for limit in (3, 4, 7):
        records = easy_vqa_records("test", limit=limit, seed=1)
        assert len(records) == limit
        assert {r["type"] for r in records} == set(QUESTION_TYPES)


def test_stratified_subset_edges():
    types = ["a"] * 90 + ["b"] * 9 + ["c"]
    assert stratified_subset(types, None, 0) == list(range(100))
    assert stratified_subset(types, 1000, 0) == list(range(100))
    picked = stratified_subset(types, 10, 0)
    assert Counter(types[i] for i in picked) == {"a": 8, "b": 1, "c": 1}
    assert picked == stratified_subset(types, 10, 0) == sorted(picked)
    with pytest.raises(ValueError, match="positive"):
        stratified_subset(types, 0, 0)


def test_converting_again_with_the_same_options_is_a_no_op(tmp_path):
    convert_easy_vqa(tmp_path, train_limit=20, test_limit=10)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    assert convert_easy_vqa(tmp_path, train_limit=20, test_limit=10)["counts"] == {"train": 20, "test": 10}
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")} == stamps
    changed = convert_easy_vqa(tmp_path, train_limit=25, test_limit=10)
    assert changed["counts"]["train"] == 25 == len(json.loads((tmp_path / "train.json").read_text()))
    assert json.loads((tmp_path / "manifest.json").read_text())["options"]["train_limit"] == 25


def test_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "demo.easy_vqa", "--out", str(tmp_path), "--train-limit", "12", "--test-limit", "6",
         "--seed", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train: 12 questions" in result.stdout and "test: 6 questions" in result.stdout
    assert len(json.loads((tmp_path / "test.json").read_text())) == 6
