"""Evaluating the trainer's result with lmms-eval: its model class for the student's family loads ``OUTPUT/final`` and,
on the shipped local task (``examples/lmms_eval_tasks/genrecal_vqa``), answers each question as ``genrecal-eval``
does.

A tiny InternVL student (the demo student's family and Llama-2 tokenizer) is trained by the trainer CLI (stage 3,
150 steps: enough to name the colours, so the answers differ), so ``final`` is exactly what a run writes. lmms-eval
runs in its own venv (``$GENRECAL_LMMS_EVAL_PYTHON``, ``.ci/lmms-eval-venv``; this test skips without it), offline,
through its command line as docs/evaluate.md gives it; its ``--log_samples`` file holds each answer, compared with
``genrecal-eval``'s on the same questions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from student_trainer.evaluate import evaluate
from tests.student_trainer.test_serve_final import train_final_student

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TASK = REPO / "examples" / "lmms_eval_tasks" / "genrecal_vqa"
NEW_TOKENS = 8  # the task's max_new_tokens


def test_lmms_eval_internvl_hf_loads_the_final_student_and_answers_as_genrecal_eval(
        tiny_checkpoint, vqa_data, lmms_eval_python, subprocess_env, tmp_path):
    student = tiny_checkpoint("internvl", tokenizer="llama2")
    # 150 steps: the student learns to name the colours, so its answers differ from question to question.
    final = train_final_student(student, vqa_data, subprocess_env, tmp_path / "run", steps=150, lr=5e-3)

    # The evaluation set in the task's format: one JSONL row per question of the trainer's data.
    rows = []
    for record in json.loads(vqa_data.read_text()):
        question, answer = (turn["value"] for turn in record["conversations"])
        rows.append({"id": record["id"], "image": str(vqa_data.parent / record["image"]),
                     "question": question.replace("<image>", "").strip(), "answer": answer})
    test_jsonl = tmp_path / "test.jsonl"
    test_jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = tmp_path / "tasks"
    shutil.copytree(TASK, tasks / TASK.name)
    task_yaml = tasks / TASK.name / "genrecal_vqa.yaml"
    task_yaml.write_text(task_yaml.read_text().replace("/path/to/test.jsonl", str(test_jsonl)))

    max_patches = json.loads((final / "processor_config.json").read_text())["image_processor"]["max_patches"]
    env = subprocess_env | {"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [lmms_eval_python, "-m", "lmms_eval", "eval", "--model", "internvl_hf",
               "--model_args", f"pretrained={final},device=cpu,device_map=cpu,max_patches={max_patches}",
               "--tasks", "genrecal_vqa", "--include_path", str(tasks), "--batch_size", "1",
               "--output_path", str(tmp_path / "lmms_logs"), "--log_samples"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (samples_file,) = (tmp_path / "lmms_logs").rglob("*genrecal_vqa*.jsonl")
    logged = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    by_question = {rows[s["doc_id"]]["id"]: s for s in logged}
    assert sorted(by_question) == sorted(row["id"] for row in rows)  # every question answered once

    report = evaluate(final, vqa_data, max_new_tokens=NEW_TOKENS, batch_size=4, progress=False)
    assert len(report.predictions) == len(rows)
    for prediction in report.predictions:  # the same answer to every question (the student learnt the colours)
        assert by_question[prediction.sample_id]["filtered_resps"].strip() == prediction.prediction, prediction
    assert len({p.prediction for p in report.predictions}) == 3  # red, green, blue: not one answer to everything
    # ... and the same score: the task's exact match is genrecal-eval's on these one-word answers.
    (results_file,) = (tmp_path / "lmms_logs").rglob("*_results.json")
    score = json.loads(results_file.read_text())["results"]["genrecal_vqa"]["exact_match,none"]
    assert score == pytest.approx(report.scores["exact_match"]) and score > 0
