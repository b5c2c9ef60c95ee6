"""benchmarks/distillation.py at toy size: the rows are trained by the real trainer CLI (GenRecal against one real
teacher server, KD with an in-process teacher), evaluated, paired by seed, and written in the committed format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_benchmark_script

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def load_benchmark():
    return load_benchmark_script("distillation", "bench_distillation")


def write_data(root: Path, rng: np.random.Generator) -> Path:
    """easy-VQA's layout in miniature: pictures ``images/{split}/N.png``, typed colour and yes/no questions."""
    records = {"train": [], "test": []}
    for split, count in (("train", 16), ("test", 4)):
        (root / "images" / split).mkdir(parents=True)
        for i in range(count):
            colour = list(COLOURS)[i % len(COLOURS)]
            pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            name = f"images/{split}/{i}.png"
            Image.fromarray(pixels).save(root / name)
            question, answer, kind = (("what color is the shape?", colour, "colour") if i % 2 == 0
                                      else (f"is there a {colour} shape?", "yes", "yes_no"))
            records[split].append({"id": f"{split}-{i}", "image": name, "type": kind, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    for split, rows in records.items():
        (root / f"{split}.json").write_text(json.dumps(rows))
    return root


@pytest.mark.slow
def test_rows_train_through_the_trainer_and_pair_by_seed(tiny_checkpoint, tmp_path, rng):
    bench = load_benchmark()
    models = {"teacher": Path(tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96, intermediate_size=192)),
              "student": Path(tiny_checkpoint("internvl", tokenizer="llama2", hidden_size=64)),
              "student_same_tok": Path(tiny_checkpoint("qwen2_vl", tokenizer="gpt2", seed=7))}
    data = write_data(tmp_path / "data", rng)
    # The pair the test checks on seed 0 and, through the extra-seeds path, seed 1: four trainer runs, two at a time
    # (the KD rows' trainer CLI path: test_the_kd_and_uld_rows_give_the_trainer_an_in_process_teacher below).
    rows = ["sft", "genrecal"]
    cfg = bench.BenchConfig(seeds=[0], steps_per_stage=1, micro_batch_size=2, grad_accum=1, label_noise=0.5,
                            test_per_type=2, jobs=2, extra_seeds=[1], extra_rows=rows)
    results = bench.run_benchmark(cfg, tmp_path / "out", rows, data=data, models=models)

    assert set(results["variants"]) == {"teacher", "base_student", "base_student_same_tok", *rows}
    for name in rows:
        per_seed = results["variants"][name]["per_seed"]
        assert set(per_seed) == {"0", "1"}
        assert all(0.0 <= a <= 1.0 for a in per_seed.values())
    # Every row ran the trainer CLI; the student's steps: 3N for SFT, N in GenRecal's stages 2 and 3.
    runs = tmp_path / "out" / "runs" / "seed0"
    assert len((runs / "sft" / "metrics" / "stage3.jsonl").read_text().splitlines()) == 3
    steps = {s: len((runs / "genrecal" / "metrics" / f"stage{s}.jsonl").read_text().splitlines()) for s in (1, 2, 3)}
    assert steps == {1: 5, 2: 1, 3: 1}  # stage 1 aligns the Recalibrator for 5N steps
    assert "--teacher-addr" in (runs / "genrecal" / "bench.log").read_text().splitlines()[0]
    difference = results["paired_differences_points"]["genrecal - sft"]
    per_seed = {name: results["variants"][name]["per_seed"] for name in ("genrecal", "sft")}
    expected = [100 * (per_seed["genrecal"][s] - per_seed["sft"][s]) for s in ("0", "1")]
    assert difference["per_seed"] == pytest.approx(expected)
    assert difference["ci95"][0] <= difference["mean"] <= difference["ci95"][1]
    # The distillation labels are noisy: about half the answers changed, each to another of its type.
    distill = json.loads((data / "train_distill.json").read_text())
    changed = [r for r in distill if "clean_answer" in r]
    assert changed and all(r["conversations"][-1]["value"] != r["clean_answer"] for r in changed)
    assert "GenRecal" in bench.markdown(results)


def test_the_kd_and_uld_rows_give_the_trainer_an_in_process_teacher(tmp_path):
    """The logit-distillation rows run the trainer with --teacher-model and their loss option (the trainer's KD /
    ULD through its CLI: tests/student_trainer/test_recipe.py::test_logit_distillation_baselines_train_through_the_cli)."""
    bench = load_benchmark()
    cfg = bench.BenchConfig(steps_per_stage=40)
    student, teacher, data, test, out = (tmp_path / name for name in ("student", "teacher", "d.json", "t.json", "o"))
    for name, loss in (("same_tok_kd", "kd"), ("uld", "uld")):
        cmd = bench.trainer_command(bench.ROWS[name], student, teacher, None, data, test, out, 1, cfg)
        assert cmd[cmd.index("--logit-distillation") + 1] == loss and cmd[cmd.index("--teacher-model") + 1] == str(teacher)
        assert "--teacher-addr" not in cmd and cmd[cmd.index("--stages") + 1] == "3"
        assert cmd[cmd.index("--steps-per-stage") + 1] == "120" and cmd[cmd.index("--lr") + 1] == "0.001"


def test_the_positive_control_alone_runs_the_extra_seeds():
    bench = load_benchmark()
    cfg = bench.BenchConfig(seeds=[1, 2], extra_seeds=[2, 3, 4], extra_rows=["same_tok_sft", "same_tok_kd"])
    plan = bench.run_plan(cfg, ["sft", "same_tok_sft", "same_tok_kd"])
    assert plan[:6] == [(1, "sft"), (1, "same_tok_sft"), (1, "same_tok_kd"),
                        (2, "sft"), (2, "same_tok_sft"), (2, "same_tok_kd")]
    assert plan[6:] == [(3, "same_tok_sft"), (3, "same_tok_kd"), (4, "same_tok_sft"), (4, "same_tok_kd")]
    assert bench.run_plan(cfg, ["sft"]) == [(1, "sft"), (2, "sft")]  # extra rows that are not run: nothing more
    assert len(bench.run_plan(bench.BenchConfig(), list(bench.ROWS))) == 5 * len(bench.ROWS) + 5 * 2


def test_paired_differences_and_their_interval():
    bench = load_benchmark()
    a = {"0": 0.50, "1": 0.60, "2": 0.70}
    b = {"0": 0.40, "1": 0.55, "2": 0.60}
    d = bench.paired(a, b)
    assert d["per_seed"] == pytest.approx([10.0, 5.0, 10.0])
    assert d["mean"] == pytest.approx(25 / 3)
    sem = np.std([10, 5, 10], ddof=1) / math.sqrt(3)
    assert d["ci95"] == pytest.approx([25 / 3 - 4.303 * sem, 25 / 3 + 4.303 * sem])


def test_the_genrecal_rows_give_stage_1_its_own_steps_and_rate(tmp_path):
    bench = load_benchmark()
    cfg = bench.BenchConfig(steps_per_stage=40)
    paths = [tmp_path / name for name in ("student", "teacher", "data.json", "test.json", "out")]
    cmd = bench.trainer_command(bench.ROWS["genrecal"], paths[0], paths[1], "127.0.0.1:1", paths[2],
                                paths[3], paths[4], 1, cfg)
    assert cmd[cmd.index("--alignment-steps") + 1] == "200" and cmd[cmd.index("--alignment-lr") + 1] == "0.001"
    assert cmd[cmd.index("--steps-per-stage") + 1] == "40" and cmd[cmd.index("--stages") + 1] == "1,2,3"
    assert all(bench.ROWS[name].alignment_factor == 5 for name in bench.ROWS if name.startswith("genrecal"))
    plain = bench.trainer_command(bench.ROWS["sft"], paths[0], paths[1], None, paths[2], paths[3], paths[4], 1, cfg)
    assert "--alignment-steps" not in plain and "--alignment-lr" not in plain
