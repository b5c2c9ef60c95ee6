"""benchmarks/teacher_binding.py: phases parsed, held-out groups drawn, and the command at toy size on a real tiny
checkpoint, its last phase a loadable checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genrecal.families import load_vlm
from tests.conftest import load_benchmark_script

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def load_script():
    return load_benchmark_script("teacher_binding", "bench_teacher_binding")


def record(split: str, i: int, question: str, value: str, kind: str) -> dict:
    return {"id": f"{split}-{i}", "image": f"images/{split}/{i}.png", "type": kind,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": value}]}


def write_data(root: Path, per_split: int = 24) -> Path:
    """Pictures of one colour each and, per picture, a colour question and a plain or negated yes/no question."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / "images" / split).mkdir(parents=True)
        rows = []
        for i in range(per_split):
            colour = list(COLOURS)[i % 2]
            pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / split / f"{i}.png")
            asked = list(COLOURS)[(i // 2) % 2]
            negated = (i // 4) % 2 == 1
            question = f"is there {'not ' if negated else ''}a {asked} shape?"
            truth = (asked == colour) != negated
            rows.append(record(split, i, question, "yes" if truth else "no", "yes_no") if i % 3
                        else record(split, i, "what color is the shape?", colour, "colour"))
        (root / f"{split}.json").write_text(json.dumps(rows))
    return root


def test_phases_parse_and_name_what_is_wrong():
    script = load_script()
    assert script.Phase.parse("plain:400") == script.Phase(False, 400, 0.67)
    assert script.Phase.parse("both:1200:0.75") == script.Phase(True, 1200, 0.75)
    with pytest.raises(ValueError, match="plain:STEPS"):
        script.Phase.parse("negated:10")


def test_held_out_groups_and_their_natural_shares():
    script = load_script()
    test = ([record("test", i, "is there a red shape?", "no" if i % 4 else "yes", "yes_no") for i in range(40)]
            + [record("test", 40 + i, "is there not a red shape?", "yes" if i % 4 else "no", "yes_no") for i in range(40)]
            + [record("test", 80 + i, "what color is the shape?", "red", "colour") for i in range(10)]
            + [record("test", 90 + i, "what shape is this?", "circle", "shape") for i in range(10)])
    assert script.natural_shares(test) == {"plain yes": 0.125, "plain no": 0.375, "negated yes": 0.375,
                                           "negated no": 0.125}
    held = script.held_out(test, 5, random.Random(0))
    assert {k: len(v) for k, v in held.items()} == {"plain yes": 5, "plain no": 5, "negated yes": 5, "negated no": 5,
                                                    "colour": 5, "shape": 5}
    assert all(r["conversations"][-1]["value"] == "yes" and "not" not in r["conversations"][0]["value"]
               for r in held["plain yes"])
    with pytest.raises(ValueError, match="10 'plain yes' questions, fewer than --held-out 11"):
        script.held_out(test, 11, random.Random(0))


@pytest.mark.slow
def test_the_command_continues_a_checkpoint_through_the_phases(tiny_checkpoint, tmp_path, capsys):
    script = load_script()
    data = write_data(tmp_path / "data")
    test = json.loads((data / "test.json").read_text())
    # every (negation, answer) group needs held-out questions: shape questions are absent here, so add two
    shapes = [record("test", 100 + i, "what shape is this?", "circle", "shape") for i in range(2)]
    for r in shapes:
        Image.new("RGB", (32, 32), "white").save(data / r["image"])
    (data / "test.json").write_text(json.dumps(test + shapes))
    teacher = tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96, intermediate_size=192)
    out = tmp_path / "out"
    script.main(["--teacher", str(teacher), "--data", str(data), "--phases", "plain:2,both:2:0.5", "--held-out", "1",
                 "--out", str(out)])
    report = json.loads((out / "history.json").read_text())
    assert [row["step"] for row in report["history"]] == [0, 2, 4]
    assert [row["phase"] for row in report["history"]] == ["start", "plain:2:0.67", "both:2:0.5"]
    for row in report["history"]:
        assert all(0 <= row[k] <= 1 for k in ("balanced", "natural", "plain yes", "negated no", "colour", "shape"))
    load_vlm(out / "model")  # the last phase's checkpoint, for benchmarks/distillation.py --teacher
    assert "| 4 | both:2:0.5 |" in capsys.readouterr().out
