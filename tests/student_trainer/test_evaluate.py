"""Answer normalisation, the three metrics against reference values, the report, and end-to-end evaluation of
tiny student and teacher checkpoints (through :func:`run_eval` with an :class:`EvalConfig`)."""

from __future__ import annotations

import json

import pytest
import torch

from genrecal.families import load_vlm
from student_trainer.data import load_dataset_samples
from student_trainer.eval_config import EvalConfig
from student_trainer.evaluate import (
    EvalReport,
    Prediction,
    evaluate,
    exact_match,
    generate_answers,
    headline_metric,
    normalize_answer,
    rouge_l,
    run_eval,
    token_f1,
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
    assert exact_match(prediction, reference) and token_f1(prediction, reference) == rouge_l(prediction, reference) == 1


@pytest.mark.parametrize("prediction,reference", [("3.5", "35"), ("red", "red square"), ("theatre", "atre"), ("", "no")])
def test_normalisation_keeps_different_answers_different(prediction, reference):
    assert normalize_answer(prediction) != normalize_answer(reference)
    assert not exact_match(prediction, reference)


# (prediction, reference, ROUGE-L F-measure) as google-research's rouge-score 0.1.2 computes it
# (RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure); article-free texts, which both
# tokenise alike (rouge-score keeps articles, normalize_answer drops them).
ROUGE_SCORE_VALUES = [
    ("police killed gunman", "police kill gunman", 0.6666666666666666),
    ("gunman kill police", "police kill gunman", 0.3333333333333333),
    ("red circle on left of blue square", "red circle left blue square", 0.8333333333333333),
    ("there is small red circle in middle of picture", "red circle is in middle", 0.5714285714285714),
    ("blue square", "square is blue", 0.4),
    ("cat dog bird fish", "fish bird dog cat", 0.25),
    ("w1 w2 w3 w4 w5", "w1 w6 w2 w7 w3", 0.6),
    ("yes", "no", 0.0),
]


@pytest.mark.parametrize("prediction,reference,expected", ROUGE_SCORE_VALUES)
def test_rouge_l_matches_rouge_score(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_and_f1_by_hand():
    # Word order: F1 sees the same bag of words, ROUGE-L only the longest in-order run ("cat" or "dog"...).
    assert token_f1("cat dog bird fish", "fish bird dog cat") == 1.0
    assert rouge_l("cat dog bird fish", "fish bird dog cat") == pytest.approx(0.25)
    # SQuAD F1 counts repeated words at most as often as the reference has them: shared {red: 1} -> P=1/3, R=1/2.
    assert token_f1("red red red", "red square") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    # Lin (2004)'s example, after normalisation drops "the": LCS("police killed gunman", "police kill gunman") = 2.
    assert rouge_l("Police killed the gunman.", "police kill the gunman") == pytest.approx(2 / 3)
    # Several acceptable references: the best one counts; empty answers score 1 only against an empty reference.
    assert rouge_l("a red circle", ["blue", "red circle"]) == token_f1("a red circle", ["blue", "red circle"]) == 1.0
    assert rouge_l("", "red") == token_f1("", "red") == token_f1("red", "the") == 0.0
    assert rouge_l("the", "a") == token_f1("the", "a") == 1.0
    # Quadratic LCS on long answers stays exact: a reference inside a longer answer is all recall.
    long_answer = " ".join(f"w{i}" for i in range(300))
    assert rouge_l(long_answer, "w3 w7 w200") == pytest.approx(2 * (3 / 300) * 1 / (3 / 300 + 1))


def test_headline_metric_auto_picks_by_reference_length():
    assert headline_metric("auto", ["circle", "red square", "left of box"]) == "exact_match"
    assert headline_metric("auto", ["circle", "a small red circle on the left"]) == "rouge_l"
    assert headline_metric("auto", ["circle", ["no", "a small red circle on the left"]]) == "rouge_l"
    assert headline_metric("f1", ["circle"]) == "f1"


def test_report_scores_table_and_json(tmp_path):
    predictions = [
        Prediction.score("a", "The red circle.", "red circle", "colour"),  # em 1, f1 1, rouge 1
        Prediction.score("b", "blue square", "square is blue", "colour"),  # em 0, f1 0.8, rouge 0.4
        Prediction.score("c", "3", "three", "count"),  # em 1
        Prediction.score("d", "no", "yes", None),  # em 0; untyped: overall only
    ]
    report = EvalReport(predictions, metric="f1", model="m", data="d")
    assert report.count == 4 and report.accuracy == 0.5
    assert report.scores == pytest.approx({"exact_match": 0.5, "f1": 2.8 / 4, "rouge_l": 2.4 / 4})
    assert report.score == report.scores["f1"]
    assert report.per_type == {"colour": (0.5, 2), "count": (1.0, 1)}
    assert report.per_type_scores["colour"] == pytest.approx({"exact_match": 0.5, "f1": 0.9, "rouge_l": 0.7})

    table = report.table().splitlines()
    assert table[0].split() == ["type", "exact_match", "f1*", "rouge_l", "count"]
    assert table[2].split() == ["colour", "50.00%", "90.00%", "70.00%", "2"]
    assert table[-1].split() == ["overall", "50.00%", "70.00%", "60.00%", "4"]

    saved = json.loads(report.write(tmp_path / "out" / "r.json").read_text())
    assert saved["metric"] == "f1" and saved["score"] == pytest.approx(0.7) and saved["count"] == 4
    assert saved["scores"] == pytest.approx(report.scores) and saved["accuracy"] == 0.5
    assert saved["per_type"]["count"] == {"count": 1, "exact_match": 1.0, "f1": 1.0, "rouge_l": 1.0, "accuracy": 1.0}
    assert saved["predictions"][1] == {"sample_id": "b", "prediction": "blue square", "reference": "square is blue",
                                       "question_type": "colour", "exact_match": False, "f1": pytest.approx(0.8),
                                       "rouge_l": pytest.approx(0.4)}
    with pytest.raises(ValueError, match="metric must be one of"):
        EvalReport(predictions, metric="auto")
    with pytest.raises(ValueError, match="at least one prediction"):
        EvalReport([])


def test_eval_config_validation(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint("internvl", tokenizer="llama2"))
    data = tmp_path / "d.json"
    data.write_text("[]")
    config = EvalConfig(model=model, data=str(data))
    assert (config.max_new_tokens, config.metric, config.batch_size, config.dtype) == (256, "auto", 8, "auto")
    bad = [
        (dict(model=str(tmp_path)), "not a checkpoint folder"),
        (dict(data=str(tmp_path / "missing.json")), "does not exist"),
        (dict(image_folder=str(data)), "image_folder .* is not a folder"),
        (dict(limit=0), "limit must be a whole number >= 1"),
        (dict(batch_size=True), "batch_size must be"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be"),
        (dict(metric="bleu"), "metric must be one of auto, exact_match, f1, rouge_l"),
        (dict(dtype="fp32"), "dtype must be one of auto, bfloat16, float16, float32"),
        (dict(output=str(tmp_path)), "is a folder"),
        (dict(image_options=3), "image_options must be"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            EvalConfig(**{"model": model, "data": str(data), **overrides})
    assert EvalConfig(model=model, data="owner/name:test").data == "owner/name:test"  # a Hub id is checked on load


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
def test_evaluate_end_to_end(tiny_checkpoint, tmp_path, rng, family, tokenizer, capfd):
    model_dir = tiny_checkpoint(family, tokenizer=tokenizer, **({"hidden_size": 96} if family == "qwen2_vl" else {}))
    data = write_vqa_set(tmp_path / "data", rng)
    report = evaluate(model_dir, data, batch_size=4, max_new_tokens=3)

    assert report.count == 6  # the broken record is skipped
    assert [p.sample_id for p in report.predictions] == ["q0", "q1", "q2", "q3", "q4", "chat"]
    assert [p.reference for p in report.predictions] == ["red", "2", "red", "2", "red", "hello"]
    assert [p.question_type for p in report.predictions] == ["colour", "count"] * 2 + ["colour", None]
    assert all(isinstance(p.prediction, str) for p in report.predictions)
    assert report.metric == "exact_match"  # auto: one-word references
    assert sorted(report.per_type) == ["colour", "count"]
    assert report.per_type["colour"][1] == 3 and report.per_type["count"][1] == 2
    assert report.predictions == [Prediction.score(p.sample_id, p.prediction, p.reference, p.question_type)
                                  for p in report.predictions]
    assert "generating answers" in capfd.readouterr().err  # the progress bar

    # Left-padded batches generate what one sample at a time does.
    vlm = load_vlm(model_dir)
    samples, _ = load_dataset_samples(data)
    assert generate_answers(vlm, samples, batch_size=1, max_new_tokens=3) == [p.prediction for p in report.predictions]
    assert vlm.processor.tokenizer.padding_side == "right"  # restored for training-style encoding

    limited = evaluate(model_dir, data, limit=2, batch_size=2, max_new_tokens=3, metric="rouge_l", progress=False)
    assert limited.count == 2 and limited.metric == "rouge_l"
    assert [p.prediction for p in limited.predictions] == [p.prediction for p in report.predictions[:2]]

    if family == "internvl":  # the command prints the table and writes the same report
        config = EvalConfig(model=str(model_dir), data=str(data), batch_size=4, max_new_tokens=3,
                            output=str(tmp_path / "r.json"))
        assert run_eval(config) == 0
        out = capfd.readouterr().out
        assert "overall" in out and "headline metric: exact_match" in out
        saved = json.loads((tmp_path / "r.json").read_text())
        assert saved["count"] == 6 and saved["accuracy"] == report.accuracy and saved["metric"] == "exact_match"
        assert saved["generation"] == {"max_new_tokens": 3, "batch_size": 4, "greedy": True}
        assert [p["prediction"] for p in saved["predictions"]] == [p.prediction for p in report.predictions]


def _greedy_tokens(vlm, sample, max_new_tokens):
    """Greedy continuation of one sample's last question, without any stop token (the reference below)."""
    prompt = vlm.processor.apply_chat_template(sample.messages()[:-1], add_generation_prompt=True, tokenize=False)
    inputs = vlm.processor(text=[prompt], images=[list(sample.images)] if sample.images else None, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(vlm.model.dtype)
    output = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=vlm.processor.tokenizer.pad_token_id)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def test_answers_stop_at_the_end_of_turn_token(tiny_checkpoint, tmp_path, rng):
    """A batch row stops at the family's end-of-turn token (which generation_config's EOS does not name here) while
    the others go on; its answer is the text before that token. The model (untied head, varied greedy answers) is
    edited so that the end-of-turn token wins wherever sample 0's second greedy token would have won."""
    vlm = load_vlm(tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96))
    samples = [s for s in load_dataset_samples(write_vqa_set(tmp_path / "data", rng))[0] if s.images]
    tokenizer = vlm.processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids(vlm.adapter.end_of_turn_token(vlm.processor))
    vlm.model.generation_config.eos_token_id = None  # only the end-of-turn token can stop an answer
    head = vlm.adapter.head(vlm.model).weight  # (V, D), not tied to the input embedding
    assert head.data_ptr() != vlm.model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        head[end_of_turn] = head[_greedy_tokens(vlm, samples[0], 2)[1]] * 1.05

    budget = 8
    greedy = [_greedy_tokens(vlm, s, budget) for s in samples]
    cut = [row[: row.index(end_of_turn)] if end_of_turn in row else row for row in greedy]
    assert len(cut[0]) == 1 and any(len(row) == budget for row in cut)  # row 0 stops, others run to the budget
    expected = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in cut]
    assert generate_answers(vlm, samples, batch_size=len(samples), max_new_tokens=budget) == expected

    forward_calls = []
    hook = vlm.model.register_forward_hook(lambda *_: forward_calls.append(1))
    assert generate_answers(vlm, samples[:1], max_new_tokens=budget) == expected[:1]
    hook.remove()
    assert len(forward_calls) == 2  # prompt + one step: generation stopped at the end-of-turn token, not the budget
