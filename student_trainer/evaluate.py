"""Exact-match evaluation of any supported checkpoint (a trained student or a teacher) on a VQA-style set.

For each sample the prompt is the conversation up to its *last* assistant turn (earlier answers stay in the
context), rendered with the checkpoint's own chat template and generation prompt; the model generates greedily
and the decoded new tokens are compared with the last assistant turn after :func:`normalize_answer`
(exact match). Records carrying a ``"type"`` or ``"question_type"`` key get a per-type breakdown.

``python -m student_trainer.evaluate MODEL_DIR DATA [--image-folder DIR] [--limit N] [--out report.json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from genrecal.families import LoadedVLM, load_vlm
from genrecal.sample import Sample
from student_trainer.data import load_dataset_samples, load_question_types

logger = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # VQA's answer processing maps these to digits
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d)")  # "1,000" -> "1000"
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]")
_NON_DECIMAL_POINT = re.compile(r"(?<!\d)\.|\.(?!\d)")  # every "." except in "3.5"


def normalize_answer(text: str) -> str:
    """VQA/SQuAD-style normalisation: lowercase, drop punctuation and articles, number words to digits, single
    spaces. ``"The Circle."`` and ``"circle"`` both become ``"circle"``; ``"Two"`` becomes ``"2"``; ``"1,000"``
    becomes ``"1000"`` and ``"3.5"`` stays ``"3.5"``.
    """
    text = _THOUSANDS_SEPARATOR.sub("", text.lower())
    text = _NON_DECIMAL_POINT.sub("", _PUNCTUATION.sub("", text))
    text = _ARTICLES.sub(" ", text)
    return " ".join(_NUMBER_WORDS.get(word, word) for word in text.split())


def exact_match_accuracy(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    types: Sequence[str | None] | None = None,
) -> tuple[float, dict[str, tuple[float, int]]]:
    """Exact-match accuracy of normalised predictions, overall and per question type.

    Args:
        predictions: N generated answers.
        references: N reference answers; an entry may list several acceptable answers (any one matches).
        types: N question types or None (untyped samples count only in the overall accuracy).

    Returns:
        ``(accuracy, {type: (accuracy, count)})``.
    """
    if len(predictions) != len(references) or (types is not None and len(types) != len(predictions)):
        raise ValueError(
            f"got {len(predictions)} predictions, {len(references)} references"
            + (f" and {len(types)} types" if types is not None else "")
            + "; they must pair up"
        )
    if not predictions:
        raise ValueError("exact_match_accuracy needs at least one prediction")
    correct = [is_correct(p, r) for p, r in zip(predictions, references, strict=True)]
    per_type: dict[str, list[bool]] = {}
    for question_type, hit in zip(types or [None] * len(correct), correct, strict=True):
        if question_type is not None:
            per_type.setdefault(question_type, []).append(hit)
    breakdown = {t: (sum(hits) / len(hits), len(hits)) for t, hits in sorted(per_type.items())}
    return sum(correct) / len(correct), breakdown


def is_correct(prediction: str, reference: str | Sequence[str]) -> bool:
    references = [reference] if isinstance(reference, str) else list(reference)
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(r) for r in references)


@dataclass
class Prediction:
    sample_id: str
    prediction: str
    reference: str
    correct: bool
    question_type: str | None = None


@dataclass
class EvalReport:
    accuracy: float
    count: int
    per_type: dict[str, tuple[float, int]] = field(default_factory=dict)  # {type: (accuracy, count)}
    predictions: list[Prediction] = field(default_factory=list)
    model: str | None = None
    data: str | None = None

    def write(self, path: str | Path) -> Path:
        """The report as JSON: accuracy, count, per_type {type: {accuracy, count}}, predictions."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        content = {
            "model": self.model,
            "data": self.data,
            "accuracy": self.accuracy,
            "count": self.count,
            "per_type": {t: {"accuracy": acc, "count": n} for t, (acc, n) in self.per_type.items()},
            "predictions": [asdict(p) for p in self.predictions],
        }
        path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def table(self) -> str:
        """A plain-text table: one row per question type, then the overall accuracy."""
        rows = [(t, acc, n) for t, (acc, n) in self.per_type.items()] + [("overall", self.accuracy, self.count)]
        width = max(len("type"), *(len(name) for name, _, _ in rows))
        lines = [f"{'type':<{width}}  {'accuracy':>8}  {'count':>6}", "-" * (width + 18)]
        lines += [f"{name:<{width}}  {100 * acc:>7.2f}%  {n:>6}" for name, acc, n in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def evaluate(
    model_dir: str | Path,
    data_path: str | Path,
    *,
    image_folder: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    split: str = "train",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    image_options: dict | str | None = None,
) -> EvalReport:
    """Generate an answer for each sample of ``data_path`` with the checkpoint in ``model_dir`` and score it.

    Args:
        model_dir: any checkpoint :func:`genrecal.families.load_vlm` supports.
        data_path, image_folder, split, limit: as for :func:`student_trainer.data.load_dataset_samples` (bad
            records are skipped and counted in the log).
        batch_size: samples per ``generate`` call (left-padded).
        max_new_tokens: generation budget per answer (greedy decoding).
        device: default CUDA when available, else CPU. dtype: the model's dtype (default: the checkpoint's).
        image_options: the family's resolution knobs (:mod:`genrecal.families.resolution`); default: the
            checkpoint's own settings (a training run's exports hold the options it trained with).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    samples, _ = load_dataset_samples(data_path, image_folder=image_folder, split=split, limit=limit)
    types = load_question_types(data_path, split=split)
    vlm = load_vlm(model_dir, dtype=dtype, image_options=image_options)
    vlm.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generated = generate_answers(vlm, samples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    references = [s.turns[-1].text for s in samples]
    sample_types = [types.get(s.sample_id) for s in samples]
    accuracy, per_type = exact_match_accuracy(generated, references, sample_types)
    predictions = [
        Prediction(s.sample_id, p, r, is_correct(p, r), t)
        for s, p, r, t in zip(samples, generated, references, sample_types, strict=True)
    ]
    return EvalReport(accuracy, len(samples), per_type, predictions, model=str(model_dir), data=str(data_path))


@torch.no_grad()
def generate_answers(
    vlm: LoadedVLM, samples: Sequence[Sample], *, batch_size: int = 8, max_new_tokens: int = 16
) -> list[str]:
    """Greedy answers to each sample's last question, in order (the last assistant turn is left out)."""
    processor, model = vlm.processor, vlm.model
    tokenizer = processor.tokenizer
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers: dict[int, str] = {}
    try:
        for start in range(0, len(samples), batch_size):
            indices = range(start, min(start + batch_size, len(samples)))
            # A processor call takes images for all rows or none: batch samples with and without images apart.
            for group in ([i for i in indices if samples[i].images], [i for i in indices if not samples[i].images]):
                if group:
                    texts = _generate(vlm, [samples[i] for i in group], max_new_tokens, pad_token_id)
                    answers.update(zip(group, texts, strict=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return [answers[i] for i in range(len(samples))]


def _generate(vlm: LoadedVLM, samples: list[Sample], max_new_tokens: int, pad_token_id: int | None) -> list[str]:
    processor, model = vlm.processor, vlm.model
    prompts = [
        processor.apply_chat_template(s.messages()[:-1], add_generation_prompt=True, tokenize=False) for s in samples
    ]
    # Left padding: an adapter may pin padding_side for training-style encoding (InternVL's pins "right"), which
    # would override the tokenizer's setting and make generate continue padded rows after their pad tokens.
    extra = dict(vlm.adapter.processor_kwargs)
    if "padding_side" in extra:
        extra["padding_side"] = "left"
    kwargs = dict(text=prompts, return_tensors="pt", padding=True, **extra)
    if samples[0].images:
        kwargs["images"] = [list(s.images) for s in samples]
    inputs = processor(**kwargs).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]  # left padding: every row's prompt ends here
    return [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m student_trainer.evaluate", description="Exact-match VQA evaluation of a checkpoint."
    )
    parser.add_argument("model_dir", help="checkpoint folder (student or teacher; any supported family)")
    parser.add_argument("data", help="evaluation data in any format of student_trainer/records.py: a .json/.jsonl "
                        "file (LLaVA / ShareGPT or OpenAI-style messages), .parquet/.arrow, a datasets save_to_disk "
                        "folder or a Hub dataset id (owner/name[:split], from the cache offline)")
    parser.add_argument("--image-folder", help="folder image names are relative to (default: the data's folder)")
    parser.add_argument("--split", default="train", help="split of a saved DatasetDict (default: train)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N usable samples")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per generate call (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation budget per answer (default: 16)")
    parser.add_argument("--image-options", help="the model's resolution knobs, 'KNOB=VALUE,...' or JSON (default: "
                                                "the checkpoint's own; docs/student_trainer.md, 'Image resolution')")
    parser.add_argument("--out", help="write the JSON report (with every prediction) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = evaluate(
        args.model_dir, args.data, image_folder=args.image_folder, limit=args.limit, split=args.split,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, image_options=args.image_options,
    )
    print(report.table())
    if args.out:
        print(f"report written to {report.write(args.out)}")


if __name__ == "__main__":
    main()
