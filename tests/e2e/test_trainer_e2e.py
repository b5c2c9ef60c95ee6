"""The student trainer end to end against real teacher_server processes.

- Two ranks under ``torchrun`` (ZeRO-3) train stages 1-3 against a teacher service; the final student loads and
  generates.
- The teacher is killed and restarted on the same port in the middle of stage 1; the run waits, re-encodes and
  finishes with every step logged once and the losses of a run that was never interrupted.
- Two runs share one teacher at the same time; each logs the losses it logs when it runs alone.

Tiny models (teacher: Qwen2-VL with the GPT-2 tokenizer; student: InternVL with the Llama-2 tokenizer), 3 steps
per stage of 2 micro-batches of 1 sample. The references ("the same run alone, never interrupted") run with an
in-process teacher (``--teacher-model``), which computes the same features as the service.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from teacher_server.launch import TeacherProcess, free_port
from tests.conftest import start_concurrently

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ZERO3 = REPO / "student_trainer" / "configs" / "zero3.json"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
STEPS = 3
# A high learning rate so that stage 1's L1_ce falls clearly within 3 steps; a checkpoint only at a stage's end.
FLAGS = ["--steps-per-stage", str(STEPS), "--grad-accum", "2", "--micro-batch-size", "1", "--lr", "1e-2",
         "--lr-end", "2e-3", "--save-every", "100", "--no-tensorboard",
         "--teacher-wire-dtype", "float32"]  # remote runs are compared with in-process ones: no bf16 rounding between
LOSS_KEYS = ("loss", "L1_ce", "L1_kl", "L2_ce", "L2_kl", "L3")


# ---- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(teacher_student_checkpoints):
    return teacher_student_checkpoints


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 solid-colour pictures (as examples/colours.py writes them), one-word answers, LLaVA JSON."""
    root = tmp_path_factory.mktemp("colours")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        name = list(COLOURS)[i % len(COLOURS)]
        pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-25, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        records.append({"id": f"colour-{i}", "image": f"images/{i}.png", "type": "colour", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": name}]})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def forwards(server: TeacherProcess) -> list[str]:
    """The server's teacher forwards so far (its DEBUG log has one line per batched Encode forward)."""
    return [line for line in list(server.lines) if "batcher: forward of" in line]


def scores(server: TeacherProcess) -> list[str]:
    """The Score calls the server has answered so far (DEBUG log)."""
    return [line for line in list(server.lines) if "device thread: scored" in line]


@pytest.fixture(scope="module")
def server(models):
    """One teacher service shared by the tests that do not restart it (DEBUG: it logs every forward)."""
    process = TeacherProcess(models[0], "--log-level", "DEBUG", "--batch-wait-ms", "20")
    yield process
    process.kill()


def train_args(models, data, output, seed, *, addr=None, stages="1,2"):
    teacher, student = models
    where = ["--teacher-addr", addr] if addr else ["--teacher-model", teacher]
    return ["-m", "student_trainer", *where, "--student", student, "--data", data, "--output", output,
            "--stages", stages, "--seed", str(seed), *FLAGS]


def start(env, args, log: Path, launcher=(sys.executable,)) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([*launcher, *map(str, args)], cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 420) -> str:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"timed out:\n{log.read_text()[-4000:]}") from None
    text = log.read_text()
    assert code == 0, text[-4000:]
    return text


def rows(output: Path, stage: int) -> list[dict]:
    path = output / "metrics" / f"stage{stage}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def assert_every_step_once(output: Path, stages) -> None:
    for stage in stages:
        assert [r["step"] for r in rows(output, stage)] == list(range(STEPS)), (output, stage)
        assert (output / f"stage{stage}" / "DONE").is_file()


def assert_same_losses(got: Path, want: Path, stages, rel: float) -> None:
    for stage in stages:
        for a, b in zip(rows(got, stage), rows(want, stage), strict=True):
            assert a["data_position"] == b["data_position"]
            for key in LOSS_KEYS:
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=rel), (stage, a["step"], key)


def loads_and_generates(final: Path, image: Path) -> None:
    from genrecal.families import load_vlm

    vlm = load_vlm(final)  # strict: no missing or unexpected keys
    prompt = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the picture?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    inputs = vlm.processor(text=[prompt], images=[[Image.open(image)]], return_tensors="pt")
    with torch.no_grad():
        generated = vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert 1 <= generated.shape[1] - inputs["input_ids"].shape[1] <= 3


@pytest.fixture(scope="module")
def alone(models, data, subprocess_env, tmp_path_factory) -> dict[int, Path]:
    """References: seeds 1 and 2, stages 1-2, each with its own in-process teacher (never shared, never restarted)."""
    root = tmp_path_factory.mktemp("alone")
    procs = {seed: start(subprocess_env, train_args(models, data, root / f"seed{seed}", seed), root / f"seed{seed}.log")
             for seed in (1, 2)}
    for seed, proc in procs.items():
        finish(proc, root / f"seed{seed}.log")
    return {seed: root / f"seed{seed}" for seed in procs}


# ---- the tests ----------------------------------------------------------------------------------------------------
def test_two_ranks_zero3_against_a_teacher_server(models, data, subprocess_env, server, tmp_path):
    """torchrun, 2 ranks, ZeRO-3, stages 1-3 against the service: losses fall, the final student works."""
    output, log = tmp_path / "out", tmp_path / "train.log"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    args = train_args(models, data, output, 0, addr=server.address, stages="1,2,3")[2:]  # no "-m student_trainer"
    finish(start(subprocess_env, ["-m", "student_trainer", *args, "--deepspeed", ZERO3], log, launcher=launcher), log)

    assert_every_step_once(output, (1, 2, 3))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["teacher"]["hidden_size"] == 96
    for row in rows(output, 1) + rows(output, 2):
        assert row["samples"] == 4 and 0 < row["teacher_wait_share"] < 1
    l1_ce = [r["L1_ce"] for r in rows(output, 1)]  # about log(teacher vocab) = 10.8 at the start
    assert l1_ce == sorted(l1_ce, reverse=True) and l1_ce[-1] < 0.97 * l1_ce[0], f"L1_ce did not fall: {l1_ce}"
    assert rows(output, 3)[-1]["L3"] < rows(output, 3)[0]["L3"]

    loads_and_generates(output / "final", data.parent / "images" / "0.png")  # (the eval command on a final
    # student: tests/student_trainer/test_recipe.py::test_eval_and_align_commands)


def test_a_teacher_restart_mid_stage_loses_and_repeats_no_step(models, data, subprocess_env, alone, tmp_path):
    """The teacher dies mid-step and a new one starts on the same port: the run waits, re-encodes, goes on."""
    port = free_port()
    output, log = tmp_path / "out", tmp_path / "train.log"
    first = TeacherProcess(models[0], "--log-level", "DEBUG", port=port)
    servers = [first]
    try:
        proc = start(subprocess_env, train_args(models, data, output, 1, addr=f"127.0.0.1:{port}"), log)
        # Step 0 logged (2 scores: one per micro-batch, both the L1 and L2 paths in it) and step 1's first score
        # answered: the trainer holds this server's handles for step 1's micro-batches (and, prefetched, step 2's)
        # and has not scored micro-batch 1 yet.
        deadline = time.monotonic() + 300
        while (not rows(output, 1) or len(scores(first)) < 3) and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.01)
        first.kill()
        assert [r["step"] for r in rows(output, 1)] == [0], log.read_text()[-4000:]
        servers.append(TeacherProcess(models[0], port=port))
        text = finish(proc, log)
    finally:
        for server in servers:
            server.kill()

    assert "unavailable" in text and "re-encoding and retrying the score" in text and "teacher recovered" in text
    assert_every_step_once(output, (1, 2))
    assert_same_losses(output, alone[1], (1, 2), rel=1e-4)
    loads_and_generates(output / "final", data.parent / "images" / "1.png")


def test_two_replicas_one_killed_mid_stage_loses_and_repeats_no_step(models, data, subprocess_env, alone, tmp_path):
    """--teacher-addr names two replicas; one dies mid-stage 1: its work moves to the other, no step lost or
    repeated, and the run goes on through stages 2 and 3 to a loadable student."""
    ports = [free_port(), free_port()]
    output, log = tmp_path / "out", tmp_path / "train.log"
    replicas = start_concurrently(*(lambda port=port: TeacherProcess(models[0], "--log-level", "DEBUG", port=port)
                                    for port in ports))
    try:
        addr = ",".join(f"127.0.0.1:{port}" for port in ports)
        proc = start(subprocess_env, train_args(models, data, output, 1, addr=addr, stages="1,2,3"), log)
        deadline = time.monotonic() + 300
        while (not rows(output, 1) or sum(len(scores(r)) for r in replicas) < 5) and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.01)
        replicas[0].kill()  # mid-stage 1; replica 1 stays up
        text = finish(proc, log)
    finally:
        for replica in replicas:
            replica.kill()

    assert "dropping it, 1 replica(s) left" in text
    assert forwards(replicas[1])  # the survivor did the rest
    assert_every_step_once(output, (1, 2, 3))
    assert_same_losses(output, alone[1], (1, 2), rel=1e-4)
    loads_and_generates(output / "final", data.parent / "images" / "1.png")


def test_two_runs_share_one_teacher_without_mixing_results(models, data, subprocess_env, server, alone, tmp_path):
    """Two runs (other seeds, other outputs) against ONE service at once: each logs exactly its solo losses."""
    before = len(forwards(server))
    procs = {seed: start(subprocess_env, train_args(models, data, tmp_path / f"seed{seed}", seed, addr=server.address),
                         tmp_path / f"seed{seed}.log") for seed in (1, 2)}
    for seed, proc in procs.items():
        finish(proc, tmp_path / f"seed{seed}.log")
    for seed in procs:
        output = tmp_path / f"seed{seed}"
        assert_every_step_once(output, (1, 2))
        assert rows(output, 1)[0]["L1_ce"] == pytest.approx(rows(alone[seed], 1)[0]["L1_ce"], rel=1e-5)
        assert_same_losses(output, alone[seed], (1, 2), rel=1e-4)
        loads_and_generates(output / "final", data.parent / "images" / "2.png")
    # The check has teeth: the two seeds see different data, so their losses differ well beyond the tolerance.
    one, two = ([r["L1_ce"] for r in rows(alone[seed], 1)] for seed in (1, 2))
    assert abs(one[0] - two[0]) > 1e-5 * abs(two[0]) and max(abs(a - b) / b for a, b in zip(one, two, strict=True)) > 1e-2
    ours = forwards(server)[before:]
    merged = [line for line in ours if "from 1 request(s)" not in line]
    print(f"teacher forwards that batched both runs' requests together: {len(merged)} of {len(ours)}")
