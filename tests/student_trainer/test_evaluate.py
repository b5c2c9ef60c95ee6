"""Answer normalisation, exact-match scoring, and end-to-end evaluation of tiny student and teacher checkpoints."""

from __future__ import annotations

import json

import pytest

from genrecal.families import load_vlm
from student_trainer.data import load_dataset_samples
from student_trainer.evaluate import (
    EvalReport,
    evaluate,
    exact_match_accuracy,
    generate_answers,
    main,
    normalize_answer,
)
from tests.conftest import random_image


@pytest.mark.parametrize(
    "prediction,reference",
    [
        ("The Circle.", "circle"),
        ("  a   RED square!", "red square"),
        ("Two", "2"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("an apple", "Apple"),
        ("it's blue", "its blue"),
    ],
)
def test_normalisation_makes_equivalent_answers_equal(prediction, reference):
    assert normalize_answer(prediction) == normalize_answer(reference)


@pytest.mark.parametrize("prediction,reference", [("3.5", "35"), ("red", "red square"), ("theatre", "atre"), ("", "no")])
def test_normalisation_keeps_different_answers_different(prediction, reference):
    assert normalize_answer(prediction) != normalize_answer(reference)


def test_exact_match_accuracy_by_construction():
    predictions = ["The circle.", "blue", "3", "Yes", "square", "two"]
    references = ["circle", "red", "three", "yes", ["box", "Square"], "2"]
    types = ["shape", "colour", "count", None, "shape", "count"]
    accuracy, per_type = exact_match_accuracy(predictions, references, types)
    assert accuracy == pytest.approx(5 / 6)
    assert per_type == {"colour": (0.0, 1), "count": (1.0, 2), "shape": (1.0, 2)}  # untyped: overall only
    assert exact_match_accuracy(predictions, references) == (pytest.approx(5 / 6), {})
    with pytest.raises(ValueError, match="pair up"):
        exact_match_accuracy(predictions, references[:-1])


def test_report_table_and_json(tmp_path):
    report = EvalReport(accuracy=0.5, count=4, per_type={"colour": (1.0, 2), "count": (0.0, 2)})
    table = report.table().splitlines()
    assert table[0].split() == ["type", "accuracy", "count"]
    assert table[2].split() == ["colour", "100.00%", "2"] and table[-1].split() == ["overall", "50.00%", "4"]
    saved = json.loads(report.write(tmp_path / "r.json").read_text())
    assert saved["per_type"] == {"colour": {"accuracy": 1.0, "count": 2}, "count": {"accuracy": 0.0, "count": 2}}


QUESTIONS = ("What is it?", "What colour is the shape in this small picture, please?", "Which?")


def write_vqa_set(folder, rng):
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(5):
        random_image(rng, size=32).save(folder / f"{i}.png")
        records.append({"id": f"q{i}", "image": f"{i}.png", "type": ["colour", "count"][i % 2],
                        # Questions of different lengths, so that batches need padding.
                        "conversations": [{"from": "human", "value": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]},
                                          {"from": "gpt", "value": ["red", "2"][i % 2]}]})
    records.append({"id": "chat", "conversations": [  # multi-turn, no image, untyped: the last answer is scored
        {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"},
        {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "hello"}]})
    records.append({"id": "broken", "image": "missing.png", "type": "colour",
                    "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]})
    (folder / "vqa.json").write_text(json.dumps(records))
    return folder / "vqa.json"


@pytest.mark.parametrize("family,tokenizer", [("internvl", "llama2"), ("qwen2_vl", "gpt2")])
def test_evaluate_end_to_end(tiny_checkpoint, tmp_path, rng, family, tokenizer, capsys):
    model_dir = tiny_checkpoint(family, tokenizer=tokenizer, **({"hidden_size": 96} if family == "qwen2_vl" else {}))
    data = write_vqa_set(tmp_path / "data", rng)
    report = evaluate(model_dir, data, batch_size=4, max_new_tokens=3)

    assert report.count == 6  # the broken record is skipped
    assert [p.sample_id for p in report.predictions] == ["q0", "q1", "q2", "q3", "q4", "chat"]
    assert [p.reference for p in report.predictions] == ["red", "2", "red", "2", "red", "hello"]
    assert [p.question_type for p in report.predictions] == ["colour", "count"] * 2 + ["colour", None]
    assert all(isinstance(p.prediction, str) for p in report.predictions)
    assert sorted(report.per_type) == ["colour", "count"]
    assert report.per_type["colour"][1] == 3 and report.per_type["count"][1] == 2
    accuracy, per_type = exact_match_accuracy(
        [p.prediction for p in report.predictions], [p.reference for p in report.predictions],
        [p.question_type for p in report.predictions])
    assert report.accuracy == accuracy and report.per_type == per_type
    assert [p.correct for p in report.predictions] == [
        normalize_answer(p.prediction) == normalize_answer(p.reference) for p in report.predictions]

    # Left-padded batches generate what one sample at a time does.
    vlm = load_vlm(model_dir)
    samples, _ = load_dataset_samples(data)
    assert generate_answers(vlm, samples, batch_size=1, max_new_tokens=3) == [p.prediction for p in report.predictions]
    assert vlm.processor.tokenizer.padding_side == "right"  # restored for training-style encoding

    limited = evaluate(model_dir, data, limit=2, batch_size=2, max_new_tokens=3)
    assert limited.count == 2 and [p.prediction for p in limited.predictions] == [
        p.prediction for p in report.predictions[:2]]

    if family == "internvl":  # the CLI prints the table and writes the same report
        main([str(model_dir), str(data), "--batch-size", "4", "--max-new-tokens", "3", "--out", str(tmp_path / "r.json")])
        assert "overall" in capsys.readouterr().out
        saved = json.loads((tmp_path / "r.json").read_text())
        assert saved["count"] == 6 and saved["accuracy"] == report.accuracy
        assert [p["prediction"] for p in saved["predictions"]] == [p.prediction for p in report.predictions]
