"""How the demo and the distillation benchmark divide easy-VQA's training split, and the noisy labels.

- **Warm-up pool** (:func:`warmup_and_distillation`): the questions about every 4th training picture (9,756
  questions on 1,000 pictures). The base students are pre-trained on it, vision tower included. (A pool of
  yes/no questions only was tried first: students pre-trained on it never learnt to read the picture, and 300
  SFT steps did not teach them to name a colour either — docs/notes/demo-models.md.)
- **Distillation data**: every question about the other three quarters of the pictures (28,819); the
  distillation never sees a warm-up picture.
- **Binding curriculum** (:func:`binding_records`): the teacher's continued pre-training on yes/no questions
  re-balanced so that their wording predicts nothing, which is how it learns to check the question against the
  picture.
- **Noisy labels** (:func:`with_label_noise`): the distillation data as a weak annotator would label it — a seeded
  fraction of the answers replaced by another answer of the same type. The teacher learnt from the clean
  training split, so its distributions correct what the labels get wrong; SFT can only follow the labels. This is
  the regime in which distillation can matter in miniature (docs/benchmarks.md, "Distillation benchmark").
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections import Counter
from pathlib import Path

from demo.easy_vqa import SHAPES, YES_NO

COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")  # easy-VQA's eight colours
ANSWERS = {"colour": COLOURS, "shape": SHAPES, "yes_no": YES_NO}
WARMUP_EVERY = 4  # every 4th training picture belongs to the warm-up pool


def picture_index(record: dict) -> int:
    """The easy-VQA picture a record asks about (``images/train/17.png`` -> 17)."""
    return int(Path(record["image"]).stem)


def answer(record: dict) -> str:
    return record["conversations"][-1]["value"]


def is_negated(record: dict) -> bool:
    """Whether a yes/no question is negated ("is there not a red shape?", "is no circle present?", "does the image
    not contain ...?"): its answer is then "yes" when the picture lacks what the question names."""
    words = re.findall(r"[a-z]+", record["conversations"][0]["value"].lower())
    return "not" in words or "no" in words


def binding_records(records: list[dict], *, with_negated: bool, yes_no_share: float,
                    rng: random.Random) -> list[dict]:
    """Yes/no questions re-balanced so that their wording predicts nothing, mixed with the colour and shape ones.

    easy-VQA's wording gives its yes/no answers away: 82 % of the plain questions ("is there a red shape?") answer
    "no", 82 % of the negated ones "yes", so a model that never compares the question with the picture scores 84 %
    and has little reason to look. Balancing both kinds at once does not help by itself: the answer is then the
    XOR of "the picture matches" and "the question is negated", neither of which predicts it alone, and teachers
    trained so stayed at chance (docs/notes/binding-teacher.md). Hence two kinds of phase: ``with_negated=False``, the plain
    questions only, as many "yes" as "no" (the answer IS the match: learnt first); then ``with_negated=True``, both
    kinds, balanced per (negation, answer). Every group gives as many records (seeded draw) as the smallest one;
    the balanced set is repeated so that it makes up about ``yes_no_share`` of the result, and every colour and
    shape question of ``records`` makes up the rest (keeping what the model already knows).
    """
    if not 0 < yes_no_share < 1:
        raise ValueError(f"yes_no_share must be in (0, 1), got {yes_no_share}")
    groups: dict[tuple[bool, str], list[dict]] = {}
    for record in (r for r in records if r.get("type") == "yes_no"):
        negated = is_negated(record)
        if with_negated or not negated:
            groups.setdefault((negated, answer(record)), []).append(record)
    expected = {(negated, a) for negated in ((False, True) if with_negated else (False,)) for a in YES_NO}
    if set(groups) != expected:
        raise ValueError(f"binding_records needs yes/no questions in every group {sorted(expected)}; "
                         f"found {sorted(groups)}")
    per_group = min(len(group) for group in groups.values())
    yes_no = [r for key in sorted(groups) for r in rng.sample(groups[key], per_group)]
    others = [r for r in records if r.get("type") in ("colour", "shape")]
    copies = max(1, round(yes_no_share / (1 - yes_no_share) * len(others) / len(yes_no)))
    return yes_no * copies + others


def warmup_and_distillation(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(warm-up pool, distillation data): disjoint by picture, deterministic, in the records' order."""
    warmup = [r for r in records if picture_index(r) % WARMUP_EVERY == 0]
    distill = [r for r in records if picture_index(r) % WARMUP_EVERY != 0]
    return warmup, distill


def with_label_noise(records: list[dict], rate: float, seed: int) -> list[dict]:
    """Copies of ``records``; a seeded ``rate`` fraction of them answer another answer of the same type.

    Which records change and what they become depends only on ``seed`` and the record ids. Each changed record
    keeps its clean answer under ``clean_answer``; records of an unknown type are left alone.
    """
    if not 0 <= rate < 1:
        raise ValueError(f"label-noise rate must be in [0, 1), got {rate}")
    out = []
    for record in records:
        record = copy.deepcopy(record)
        choices = ANSWERS.get(record.get("type"))
        rng = random.Random(f"label-noise/{seed}/{record['id']}")
        if choices and rng.random() < rate:
            clean = answer(record)
            if clean not in choices:
                raise ValueError(f"record {record['id']!r}: answer {clean!r} is not a {record['type']} answer")
            record["conversations"][-1]["value"] = rng.choice([a for a in choices if a != clean])
            record["clean_answer"] = clean
        out.append(record)
    return out


def without_label_noise(records: list[dict]) -> list[dict]:
    """Copies of ``records`` with the clean answer of every record :func:`with_label_noise` changed put back."""
    out = []
    for record in records:
        record = copy.deepcopy(record)
        if "clean_answer" in record:
            record["conversations"][-1]["value"] = record.pop("clean_answer")
        out.append(record)
    return out


def write_splits(data_dir: str | Path, *, noise: float, noise_seed: int = 0,
                 distill_limit: int | None = None) -> tuple[Path, Path]:
    """Write ``train_warmup.json`` and ``train_distill.json`` (noisy labels; the first ``distill_limit``
    records of a seeded shuffle when given) next to ``train.json``; return both paths."""
    data_dir = Path(data_dir)
    records = json.loads((data_dir / "train.json").read_text(encoding="utf-8"))
    warmup, distill = warmup_and_distillation(records)
    if distill_limit is not None:
        random.Random(f"distill-subset/{noise_seed}").shuffle(distill)
        distill = distill[:distill_limit]
    distill = with_label_noise(distill, noise, noise_seed)
    paths = data_dir / "train_warmup.json", data_dir / "train_distill.json"
    for path, content in zip(paths, (warmup, distill), strict=True):
        path.write_text(json.dumps(content))
    return paths


def picture_labels(records: list[dict]) -> dict[str, tuple[str | None, str | None]]:
    """``{image: (colour, shape)}`` read off the colour and shape questions about each picture (None if unasked);
    the answers of records carrying a ``clean_answer`` count as that."""
    labels: dict[str, list] = {}
    for record in records:
        kind = record.get("type")
        if kind in ("colour", "shape"):
            value = record.get("clean_answer", answer(record))
            labels.setdefault(record["image"], [None, None])[0 if kind == "colour" else 1] = value
    return {image: (c, s) for image, (c, s) in labels.items()}


def sample_per_type(records: list[dict], per_type: int, rng: random.Random) -> list[dict]:
    """Up to ``per_type`` records of each question type drawn with ``rng``, types in name order (records without a
    type form one group), each type's draw in ``rng.sample`` order."""
    by_type: dict[str, list[dict]] = {}
    for record in records:
        by_type.setdefault(str(record.get("type")), []).append(record)
    chosen = []
    for kind in sorted(by_type):
        chosen += rng.sample(by_type[kind], min(per_type, len(by_type[kind])))
    return chosen


def write_balanced_test(data_dir: str | Path, per_type: int, *, seed: int = 0) -> Path:
    """Write ``test_balanced.json`` next to ``test.json``: ``per_type`` seeded-random questions of each type.

    easy-VQA's test split is 74 % yes/no questions, and a model that never looks at the picture answers 83.9 % of
    them from the wording alone (every model here does exactly that), so the natural mix mostly measures the
    wording prior. The benchmark scores on equal shares of colour, shape and yes/no questions, and also reports
    the natural mix, re-weighted from the per-type accuracies.
    """
    data_dir = Path(data_dir)
    records = [r for r in json.loads((data_dir / "test.json").read_text(encoding="utf-8")) if r.get("type") in ANSWERS]
    for kind, count in sorted(Counter(r["type"] for r in records).items()):
        if count < per_type:
            raise ValueError(f"{data_dir / 'test.json'} has {count} {kind} questions, fewer than "
                             f"per_type={per_type}; convert the full test split (no --test-limit) or lower it")
    chosen = sorted(sample_per_type(records, per_type, random.Random(f"balanced-test/{seed}")), key=lambda r: r["id"])
    path = data_dir / "test_balanced.json"
    path.write_text(json.dumps(chosen))
    return path
