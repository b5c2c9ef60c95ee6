"""Fixtures of the trainer tests: the tiny teacher/student pair, a small colour VQA data set, the subprocess env."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
# Answers of different lengths, so per-micro-batch means differ from the big batch's token mean.
ANSWERS = ("{c}", "it is {c}", "the whole picture is plain {c}", "{c} again")


@pytest.fixture(scope="session")
def models(teacher_student_checkpoints):
    return teacher_student_checkpoints


@pytest.fixture(scope="session")
def vqa_data(tmp_path_factory) -> Path:
    """12 colour pictures with questions and answers of 1-6 words, as LLaVA JSON."""
    root = tmp_path_factory.mktemp("vqa")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        name = list(COLOURS)[i % 3]
        pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        records.append({
            "id": f"c{i}", "image": f"img/{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour is the picture?"},
                              {"from": "gpt", "value": ANSWERS[i % 4].format(c=name)}],
        })
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path



