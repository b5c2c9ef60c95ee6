"""Evaluation of any supported checkpoint (a trained student or a teacher) on a VQA-style set.

For each sample the prompt is the conversation up to its *last* assistant turn (earlier answers stay in the
context), rendered with the checkpoint's own chat template and generation prompt; the model generates greedily,
in left-padded batches, until the family's end-of-turn token (or EOS, or ``max_new_tokens``). The answer is
scored against the last assistant turn with three metrics, all on :func:`normalize_answer`'d text:

- ``exact_match``: the whole normalised answer equals the reference (one-word VQA answers: "circle", "2").
- ``f1``: SQuAD's token F1, the harmonic mean of token precision and recall over the bag of words shared with
  the reference; partial credit for a phrase answer ("a red circle" vs "red circle on the left").
- ``rouge_l``: the F-measure of the longest common subsequence of tokens (Lin, 2004; beta = 1 as in Google's
  ``rouge-score``), which also rewards word order; the usual choice for sentence-long answers and captions.

Every report holds all three, overall and per question type (records with a ``"type"`` or ``"question_type"``
key); one of them is the *headline* (``EvalConfig.metric``; ``auto`` = exact match when every reference has at
most :data:`~student_trainer.eval_config.SHORT_ANSWER_WORDS` words, else ROUGE-L). ``python -m student_trainer
eval`` and ``genrecal-eval`` run :func:`run_eval`; docs/evaluate.md describes the JSON report.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from genrecal.families import LoadedVLM, load_vlm
from genrecal.sample import Sample
from student_trainer.data import load_dataset_samples, load_question_types
from student_trainer.eval_config import METRICS, SHORT_ANSWER_WORDS, EvalConfig

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
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


# ---- metrics: each takes one prediction and one reference or several acceptable ones (the best counts) ---------
def exact_match(prediction: str, reference: str | Sequence[str]) -> bool:
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(r) for r in _references(reference))


def token_f1(prediction: str, reference: str | Sequence[str]) -> float:
    """SQuAD v1.1's token F1 on normalised words; two empty answers score 1, one empty answer scores 0."""
    return _best_f_measure(prediction, reference, lambda p, r: sum((Counter(p) & Counter(r)).values()))


def rouge_l(prediction: str, reference: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (beta = 1) on normalised words: with ``lcs`` the longest common subsequence,
    ``P = lcs / len(prediction)``, ``R = lcs / len(reference)``, ``F = 2PR / (P + R)``. Empty answers as in
    :func:`token_f1`. O(len(prediction) * len(reference)) time; 256 x 256 words take milliseconds.
    """
    return _best_f_measure(prediction, reference, _lcs_length)


def _best_f_measure(prediction: str, reference: str | Sequence[str],
                    overlap: Callable[[list[str], list[str]], int]) -> float:
    """The best F-measure over the references, with precision ``overlap / len(prediction)`` and recall
    ``overlap / len(reference)`` in normalised words."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for ref in _references(reference):
        expected = normalize_answer(ref).split()
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
            continue
        shared = overlap(predicted, expected)
        if shared:
            precision, recall = shared / len(predicted), shared / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)  # previous[j]: LCS of a[:i-1] and b[:j]
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _references(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def headline_metric(metric: str, references: Sequence[str | Sequence[str]]) -> str:
    """``metric``, or for ``"auto"``: exact match when every reference is short (at most SHORT_ANSWER_WORDS
    normalised words), else ROUGE-L."""
    if metric != "auto":
        return metric
    short = all(len(normalize_answer(r).split()) <= SHORT_ANSWER_WORDS for ref in references for r in _references(ref))
    return "exact_match" if short else "rouge_l"


# ---- the report ---------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    sample_id: str
    prediction: str
    reference: str
    question_type: str | None
    exact_match: bool
    f1: float
    rouge_l: float

    @classmethod
    def score(cls, sample_id: str, prediction: str, reference: str, question_type: str | None = None) -> Prediction:
        return cls(sample_id, prediction, reference, question_type, exact_match(prediction, reference),
                   token_f1(prediction, reference), rouge_l(prediction, reference))


@dataclass
class EvalReport:
    """Scored predictions; every score is derived from them. ``metric`` names the headline metric."""

    predictions: list[Prediction]
    metric: str = "exact_match"
    model: str | None = None
    data: str | None = None
    generation: dict = field(default_factory=dict)  # the settings the answers were generated with

    def __post_init__(self) -> None:
        if not self.predictions:
            raise ValueError("an evaluation report needs at least one prediction")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")

    @property
    def count(self) -> int:
        return len(self.predictions)

    @property
    def scores(self) -> dict[str, float]:
        """``{metric: mean over every prediction}``."""
        return _means(self.predictions)

    @property
    def score(self) -> float:
        return self.scores[self.metric]

    @property
    def accuracy(self) -> float:
        """Exact-match accuracy (the demo's one-word answers)."""
        return self.scores["exact_match"]

    @property
    def per_type_scores(self) -> dict[str, dict[str, float]]:
        """``{question type: {metric: mean}}`` in type order; untyped predictions count only overall."""
        groups: dict[str, list[Prediction]] = {}
        for p in self.predictions:
            if p.question_type is not None:
                groups.setdefault(p.question_type, []).append(p)
        return {t: _means(group) for t, group in sorted(groups.items())}

    @property
    def per_type(self) -> dict[str, tuple[float, int]]:
        """``{question type: (exact-match accuracy, count)}``."""
        counts = Counter(p.question_type for p in self.predictions)
        return {t: (scores["exact_match"], counts[t]) for t, scores in self.per_type_scores.items()}

    def to_json(self) -> dict:
        counts = Counter(p.question_type for p in self.predictions)
        return {
            "model": self.model,
            "data": self.data,
            "count": self.count,
            "metric": self.metric,
            "score": self.score,
            "scores": self.scores,
            "accuracy": self.accuracy,  # = scores["exact_match"]
            "per_type": {t: {"count": counts[t], **scores, "accuracy": scores["exact_match"]}
                         for t, scores in self.per_type_scores.items()},
            "generation": self.generation,
            "predictions": [asdict(p) for p in self.predictions],
        }

    def write(self, path: str | Path) -> Path:
        """The report as JSON (docs/evaluate.md, "The JSON report")."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def table(self) -> str:
        """A plain-text table: one row per question type, then overall; every metric in %, the headline one
        marked with ``*``."""
        counts = Counter(p.question_type for p in self.predictions)
        rows = [(t, s, counts[t]) for t, s in self.per_type_scores.items()]
        rows.append(("overall", self.scores, self.count))
        width = max(len("type"), *(len(name) for name, _, _ in rows))
        names = [m + ("*" if m == self.metric else "") for m in METRICS]
        columns = [max(len(name), 8) for name in names]
        lines = [f"{'type':<{width}}" + "".join(f"  {n:>{c}}" for n, c in zip(names, columns, strict=True))
                 + f"  {'count':>6}"]
        lines.append("-" * len(lines[0]))
        for name, scores, n in rows:
            cells = "".join(f"  {100 * scores[m]:>{c - 1}.2f}%" for m, c in zip(METRICS, columns, strict=True))
            lines.append(f"{name:<{width}}{cells}  {n:>6}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _means(predictions: Sequence[Prediction]) -> dict[str, float]:
    return {m: sum(float(getattr(p, m)) for p in predictions) / len(predictions) for m in METRICS}


# ---- running it ---------------------------------------------------------------------------------------------------
def run_eval(config: EvalConfig) -> int:
    """The ``eval`` command: evaluate, print the table, write the JSON report if asked. Returns the exit status."""
    report = evaluate(
        config.model, config.data, image_folder=config.image_folder, limit=config.limit, split=config.split,
        config_name=config.data_config,
        batch_size=config.batch_size, max_new_tokens=config.max_new_tokens, metric=config.metric,
        device=config.device, dtype=TORCH_DTYPES[config.dtype], image_options=config.image_options,
    )
    print(report.table())
    print(f"headline metric: {report.metric} = {100 * report.score:.2f}% over {report.count} samples")
    if config.output:
        print(f"report written to {report.write(config.output)}")
    return 0


def evaluate(
    model_dir: str | Path,
    data_path: str | Path,
    *,
    image_folder: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    metric: str = "auto",
    split: str = "train",
    config_name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    image_options: dict | str | None = None,
    progress: bool = True,
) -> EvalReport:
    """Generate an answer for each sample of ``data_path`` with the checkpoint in ``model_dir`` and score it.

    Args:
        model_dir: any checkpoint :func:`genrecal.families.load_vlm` supports.
        data_path, image_folder, split, config_name, limit: as for :func:`student_trainer.data.load_dataset_samples` (bad
            records are skipped and counted in the log).
        batch_size, max_new_tokens: as for :func:`generate_answers`.
        metric: the report's headline metric, ``"auto"`` or one of :data:`METRICS` (all are computed).
        device: default CUDA when available, else CPU. dtype: the model's dtype (default: the checkpoint's).
        image_options: the family's resolution knobs (:mod:`genrecal.families.resolution`); default: the
            checkpoint's own settings (a training run's exports hold the options it trained with).
        progress: show a tqdm bar over the samples.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if metric != "auto" and metric not in METRICS:
        raise ValueError(f"metric must be 'auto' or one of {', '.join(METRICS)}, got {metric!r}")
    samples, _ = load_dataset_samples(data_path, image_folder=image_folder, split=split, config_name=config_name,
                                      limit=limit)
    types = load_question_types(data_path, split=split, config_name=config_name)
    vlm = load_vlm(model_dir, dtype=dtype, image_options=image_options)
    vlm.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generated = generate_answers(vlm, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 progress=progress)
    references = [s.turns[-1].text for s in samples]
    predictions = [Prediction.score(s.sample_id, answer, reference, types.get(s.sample_id))
                   for s, answer, reference in zip(samples, generated, references, strict=True)]
    return EvalReport(predictions, headline_metric(metric, references), model=str(model_dir), data=str(data_path),
                      generation={"max_new_tokens": max_new_tokens, "batch_size": batch_size, "greedy": True})


@torch.no_grad()
def generate_answers(
    vlm: LoadedVLM, samples: Sequence[Sample], *, batch_size: int = 8, max_new_tokens: int = 256,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to each sample's last question, in order (the last assistant turn is left out).

    Rows of a batch are left-padded, so every row continues from its own last prompt token; a row stops at the
    family's end-of-turn token or the generation config's EOS (the rest of the batch goes on, up to
    ``max_new_tokens``), and the answer is the text before that token.
    """
    processor, model = vlm.processor, vlm.model
    tokenizer = processor.tokenizer
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    stop_ids = _stop_token_ids(vlm)
    # Finished rows are filled with the pad id (cut off again below); without any stop id no row finishes early.
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_ids), 0)
    was_training = model.training
    model.eval()
    answers: dict[int, str] = {}
    bar = tqdm(total=len(samples), desc="generating answers", unit="sample", disable=not progress)
    try:
        for start in range(0, len(samples), batch_size):
            indices = range(start, min(start + batch_size, len(samples)))
            # A processor call takes images for all rows or none: batch samples with and without images apart.
            for group in ([i for i in indices if samples[i].images], [i for i in indices if not samples[i].images]):
                if group:
                    texts = _generate(vlm, [samples[i] for i in group], max_new_tokens, pad_token_id, stop_ids)
                    answers.update(zip(group, texts, strict=True))
            bar.update(len(indices))
    finally:
        bar.close()
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return [answers[i] for i in range(len(samples))]


def _stop_token_ids(vlm: LoadedVLM) -> list[int]:
    """The family's end-of-turn token (what training taught the model to end an answer with), then the generation
    config's EOS ids."""
    token = vlm.adapter.end_of_turn_token(vlm.processor)
    end_of_turn = vlm.processor.tokenizer.encode(token, add_special_tokens=False)
    if len(end_of_turn) != 1:  # not a token of this vocabulary: only EOS can stop an answer early
        logger.warning("%s: the end-of-turn text %r is %d tokens here, not one; answers stop only at EOS",
                       vlm.adapter.model_type, token, len(end_of_turn))
        end_of_turn = []
    eos = vlm.model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return list(dict.fromkeys(end_of_turn + eos))


def _generate(vlm: LoadedVLM, samples: list[Sample], max_new_tokens: int, pad_token_id: int,
              stop_ids: list[int]) -> list[str]:
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
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids or None,
                            pad_token_id=pad_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()  # (B, <= max_new_tokens); prompts end here
    stops = set(stop_ids)
    answers = [next((row[:k] for k, token in enumerate(row) if token in stops), row) for row in new_tokens]
    return [text.strip() for text in processor.tokenizer.batch_decode(answers, skip_special_tokens=True)]
