"""The DeepSpeed student trainer: config, loss normalisation over accumulation and ranks, the CLI end to end,
resume after a crash, and the teacher-identity guard.

The slow tests run the real thing: ``python -m student_trainer`` as a subprocess (ZeRO-3, one process, in-process
teacher: a Qwen2-VL with the GPT-2 tokenizer; student: an InternVL with the Llama-2 tokenizer), and the recipe under
``torchrun`` with two gloo ranks. DeepSpeed JIT-compiles a shared-memory comm op on first use (~30-80 s); it is
cached in the pytest cache (``TORCH_EXTENSIONS_DIR``, one folder for the whole session: tests/conftest.py), so only
the first run ever pays for it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from genrecal.stages import Stage
from student_trainer.config import DEFAULT_DEEPSPEED_CONFIG, TrainConfig
from tests.conftest import concurrently

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "student_trainer" / "configs"
PROBE = Path(__file__).with_name("dist_grad_probe.py")
# Small but real: 4 steps per stage, 2 micro-batches of 1 sample per step, a checkpoint every 2 steps. Records are
# read in the prefetch thread (--data-workers 0): worker processes cost seconds at every stage's start on 2 cores;
# test_data_runs.py and the e2e tests run with them.
RUN_FLAGS = ["--steps-per-stage", "4", "--grad-accum", "2", "--micro-batch-size", "1", "--save-every", "2",
             "--lr", "2e-3", "--lr-end", "2e-4", "--seed", "0", "--no-tensorboard", "--data-workers", "0"]


# ---- fixtures -----------------------------------------------------------------------------------------------------
def train_cli(env, *args, timeout=420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "student_trainer", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_args(models, data, output, *extra):
    teacher, student = models
    return ["--teacher-model", teacher, "--student", student, "--data", data, "--output", output, *RUN_FLAGS, *extra]


def metric_rows(output: Path, stage: int) -> list[dict]:
    lines = (output / "metrics" / f"stage{stage}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def teacher_server(models):
    """One real teacher_server process (default options) for the tests that train against a server without
    restarting it: each start costs ~5-10 s on 2 cores."""
    from teacher_server.launch import TeacherProcess

    server = TeacherProcess(models[0])
    yield server
    server.terminate()


@pytest.fixture(scope="session")
def first_runs(models, vqa_data, subprocess_env, tmp_path_factory) -> dict:
    """Two independent runs trained at the same time, each checked by its own test: ``"uninterrupted"``, stages
    1-3 through the CLI in one single process (ZeRO-3, the shipped default), never interrupted; ``"interrupted"``,
    the same run stopped after 7 steps (the first half of the resume test). name -> (result, output)."""
    root = tmp_path_factory.mktemp("run")
    outputs = {"uninterrupted": root / "out", "interrupted": root / "interrupted"}
    extra = {"uninterrupted": [], "interrupted": ["--stop-after-steps", "7"]}
    results = concurrently(*(lambda name=name: train_cli(subprocess_env, *run_args(models, vqa_data, outputs[name]),
                                                          *extra[name]) for name in outputs))
    return {name: (result, outputs[name]) for name, result in zip(outputs, results, strict=True)}


@pytest.fixture(scope="session")
def uninterrupted_run(first_runs) -> Path:
    """Stages 1-3 through the CLI in one single process (ZeRO-3, the shipped default), never interrupted."""
    result, output = first_runs["uninterrupted"]
    assert result.returncode == 0, result.stderr[-4000:]
    return output


# ---- fast: configuration -----------------------------------------------------------------------------------------
def test_config_requires_exactly_one_teacher_for_stages_1_and_2(models, vqa_data, tmp_path):
    teacher, student = models
    base = dict(student=str(student), data=str(vqa_data), output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--teacher-addr HOST:PORT.*--teacher-model PATH.*--stages 3"):
        TrainConfig(**base)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(**base, teacher_addr="h:1", teacher_model=str(teacher))
    with pytest.raises(ValueError, match="HOST:PORT"):
        TrainConfig(**base, teacher_addr="no-port")
    assert TrainConfig(**base, stages="sft").stage_list == [3]  # stage 3 needs no teacher
    assert TrainConfig(**base, teacher_addr="[::1]:50051").teacher_addr == "[::1]:50051"
    with pytest.raises(ValueError, match="lr_end <= lr"):
        TrainConfig(**base, stages="3", lr=1e-5, lr_end=1e-4)
    with pytest.raises(ValueError, match="increasing"):
        TrainConfig(**base, stages="3,1", teacher_addr="h:1")


def test_stage_1_can_have_its_own_steps_and_learning_rate(models, vqa_data, tmp_path):
    teacher, student = models
    base = dict(student=str(student), data=str(vqa_data), output=str(tmp_path / "o"), teacher_model=str(teacher),
                steps_per_stage=40, lr=3e-4, lr_end=3e-5)
    plain = TrainConfig(**base)
    assert [plain.steps_for(s) for s in Stage] == [40, 40, 40]
    assert [plain.lr_for(s) for s in Stage] == [(3e-4, 3e-5)] * 3
    aligned = TrainConfig(**base, alignment_steps=200, alignment_lr=1e-3)
    assert [aligned.steps_for(s) for s in Stage] == [200, 40, 40]
    (peak, end), *others = [aligned.lr_for(s) for s in Stage]
    assert peak == 1e-3 and end == pytest.approx(1e-4) and others == [(3e-4, 3e-5)] * 2  # same 10x decay
    assert {"alignment_steps", "alignment_lr"} <= set(aligned.run_differences(plain.to_dict()))  # resume guard
    with pytest.raises(ValueError, match="alignment_steps must be a positive integer"):
        TrainConfig(**base, alignment_steps=0)
    with pytest.raises(ValueError, match="alignment_lr must be > 0"):
        TrainConfig(**base, alignment_lr=0.0)
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, 5\)"):
        TrainConfig(**base, alignment_steps=5, warmup_steps=5)


def test_the_end_of_stage_1_says_whether_the_recalibrator_is_aligned(caplog):
    from genrecal.distill import LossParts
    from student_trainer.distributed import DistContext
    from student_trainer.recipe import check_alignment

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with caplog.at_level("INFO"):
        check_alignment(ctx, LossParts(l1_ce=0.9, l1_kl=5.1, l2_ce=0.8, l2_kl=3.1))
    assert "NOT aligned" in caplog.text and "L1 5.10, L2 3.10" in caplog.text and "--alignment-steps" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        check_alignment(ctx, LossParts(l1_kl=0.2, l2_kl=0.09))
    assert "NOT aligned" not in caplog.text and "Recalibrator aligned" in caplog.text


def test_deepspeed_config_autos_are_filled_and_conflicts_refused(models, vqa_data, tmp_path):
    from student_trainer.deepspeed_config import resolve_deepspeed_config

    _, student = models
    config = TrainConfig(student=str(student), data=str(vqa_data), output=str(tmp_path / "o"), stages="3",
                         grad_accum=4, micro_batch_size=2, dtype="float32", grad_clip=0.5)
    ds = resolve_deepspeed_config(config, world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 4, 16)
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_force_ds_cpu_optimizer"] is False
    assert "optimizer" not in ds and "scheduler" not in ds

    conflicting = json.loads(DEFAULT_DEEPSPEED_CONFIG.read_text()) | {"gradient_accumulation_steps": 16}
    (tmp_path / "ds.json").write_text(json.dumps(conflicting))
    config.deepspeed = str(tmp_path / "ds.json")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=16.*\"auto\".*--grad-accum"):
        resolve_deepspeed_config(config, world_size=1)
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="remove that section"):
        resolve_deepspeed_config(config, world_size=1)


def test_teacher_identity_and_manifest_guard(models, tmp_path):
    from genrecal.families import load_vlm
    from genrecal.resilient_teacher import TeacherMismatchError
    from genrecal.teacher import InProcessTeacher
    from student_trainer.distributed import DistContext
    from student_trainer.layout import check_teacher_identity

    teacher_path, _ = models
    identity = InProcessTeacher(load_vlm(teacher_path)).identity()
    assert identity["model_name"] == Path(teacher_path).name
    assert (identity["model_type"], identity["hidden_size"]) == ("qwen2_vl", 96)
    assert identity["revision"].startswith("sha256:") and identity["tokenizer_size"] > 50257
    assert json.loads(json.dumps(identity)) == identity
    assert InProcessTeacher(load_vlm(teacher_path)).identity() == identity  # a stable fingerprint

    ctx = DistContext(0, 0, 1, torch.device("cpu"))
    check_teacher_identity(tmp_path, identity, ctx, "first")  # first contact: recorded
    assert json.loads((tmp_path / "manifest.json").read_text())["teacher"] == identity
    check_teacher_identity(tmp_path, identity, ctx, "again")  # the same teacher: accepted
    other = identity | {"model_name": "other-teacher", "revision": "sha256:0123"}
    with pytest.raises(TeacherMismatchError) as info:
        check_teacher_identity(tmp_path, other, ctx, "host:1234")
    message = str(info.value)
    assert identity["model_name"] in message and identity["revision"] in message
    assert "other-teacher" in message and "sha256:0123" in message and "host:1234" in message


# ---- slow: the real runs ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_single_process_zero3_three_stages_via_cli(uninterrupted_run, models, vqa_data):
    from genrecal.families import load_vlm

    output = uninterrupted_run
    _, student_path = models
    expected = {1: {"L1_ce", "L1_kl", "L2_ce", "L2_kl"}, 2: {"L1_ce", "L1_kl", "L2_ce", "L2_kl", "L3"}, 3: {"L3"}}
    for stage, parts in expected.items():
        rows = metric_rows(output, stage)
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        for row in rows:
            assert parts <= set(row) and not ({"L1_ce", "L2_ce", "L3"} - parts) & set(row)
            assert all(np.isfinite(row[p]) and row[p] > 0 for p in parts)
            assert row["tokens_per_s"] > 0 and row["samples"] == 2
            if stage < 3:
                assert 0 < row["teacher_wait_share"] < 1
                assert 0 < row["teacher_ce"] < 20  # the teacher's own CE on its answers (nats/token)
            else:
                assert "teacher_ce" not in row  # no teacher in stage 3
        assert [r["lr"] for r in rows] == pytest.approx(np.linspace(2e-3, 2e-4, 4).tolist())
        assert [r["data_position"] for r in rows] == [2, 4, 6, 8]
        stage_dir = output / f"stage{stage}"
        assert (stage_dir / "DONE").is_file() and (stage_dir / "loss_curves.png").stat().st_size > 0
        assert sorted(p.name for p in (stage_dir / "ds").glob("step*")) == ["step2", "step4"]
        assert (stage_dir / "recalibrator.safetensors").is_file() == (stage < 3)
    assert metric_rows(output, 1)[-1]["L1_ce"] < metric_rows(output, 1)[0]["L1_ce"]
    assert metric_rows(output, 3)[-1]["L3"] < metric_rows(output, 3)[0]["L3"]

    # Stage 1 trains only the Recalibrator; stage 2 changes the student's body.
    original = load_file(student_path / "model.safetensors")
    stage1, stage2 = (load_file(output / f"stage{s}" / "student" / "model.safetensors") for s in (1, 2))
    assert all(torch.equal(original[k], stage1[k]) for k in original)
    assert any(not torch.equal(original[k], stage2[k]) for k in original)

    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["teacher"]["model_type"] == "qwen2_vl" and manifest["world_size"] == 1
    saved = json.loads((output / "config.json").read_text())
    assert saved["grad_accum"] == 2 and saved["stages"] == "1,2,3" and saved["resolved_dtype"] == "float32"

    final = output / "final"
    with safe_open(final / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.startswith(("recalibrator", "proj_pre", "rec_body", "proj_post"))]
    vlm = load_vlm(final)  # strict: no missing or unexpected keys
    assert type(vlm.model).__name__ == "InternVLForConditionalGeneration"
    image = Image.open(vqa_data.parent / "img" / "0.png")
    prompt = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the picture?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    inputs = vlm.processor(text=[prompt], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        generated = vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert 1 <= generated.shape[1] - inputs["input_ids"].shape[1] <= 3


@pytest.fixture(scope="module")
def logit_distillation_runs(models, vqa_data, subprocess_env, tiny_checkpoint, tmp_path_factory) -> dict:
    """kind -> (result, output) of the KD and the ULD run (stage 3 + the term, in-process teacher), trained at the
    same time (independent runs; each test below checks its own)."""
    teacher, cross_student = models
    students = {"kd": tiny_checkpoint("qwen2_vl", tokenizer="gpt2", seed=5), "uld": cross_student}
    root = tmp_path_factory.mktemp("logit_distillation")

    def run(kind):
        output = root / kind
        return train_cli(subprocess_env, *run_args((teacher, students[kind]), vqa_data, output, "--stages", "3",
                                                   "--logit-distillation", kind, "--deepspeed",
                                                   CONFIGS / "zero2.json")), output

    return dict(zip(students, concurrently(*(lambda kind=kind: run(kind) for kind in students)), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kd", "uld"])
def test_logit_distillation_baselines_train_through_the_cli(kind, logit_distillation_runs):
    """Stage 3 + the KD / ULD term with an in-process teacher: the term is logged every step and training moves."""
    result, output = logit_distillation_runs[kind]
    assert result.returncode == 0, result.stderr[-4000:]
    rows = metric_rows(output, 3)
    name = kind.upper()
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(np.isfinite(r[name]) and r[name] > 0 and r["L3"] > 0 for r in rows)
    assert rows[-1]["L3"] + rows[-1][name] < rows[0]["L3"] + rows[0][name]
    assert json.loads((output / "config.json").read_text())["logit_distillation"] == kind


def test_logit_distillation_needs_a_teacher_and_a_known_kind(models, vqa_data, tmp_path):
    teacher, student = models
    base = dict(student=str(student), data=str(vqa_data), output=str(tmp_path / "o"), stages="3")
    with pytest.raises(ValueError, match="needs the teacher's distributions"):
        TrainConfig(**base, logit_distillation="kd")
    with pytest.raises(ValueError, match="logit_distillation must be one of"):
        TrainConfig(**base, teacher_model=str(teacher), logit_distillation="nope")
    assert not TrainConfig(**base).needs_teacher
    assert TrainConfig(**base, teacher_model=str(teacher), logit_distillation="uld").needs_teacher


@pytest.mark.slow
def test_two_rank_gradients_equal_one_big_batch(models, vqa_data, subprocess_env, tmp_path):
    """Normalisation: 2 gloo ranks x 3 accumulated micro-batches give the gradient of ONE 6-sample batch's mean,
    with the sequential and with the overlapped micro-batch loop (each Score in flight during the next forward).

    Three micro-batches, not two: with two, an extra ``1 / grad_accum`` paired with summing instead of averaging
    over the two ranks would cancel out and pass."""
    from genrecal.distill import LossConfig, genrecal_objective
    from genrecal.families import load_vlm
    from genrecal.recalibrator import Recalibrator
    from genrecal.stages import Stage, set_trainable
    from genrecal.teacher import InProcessTeacher
    from student_trainer.data import load_dataset_samples
    from student_trainer.distributed import seed_everything

    teacher_path, student_path = models
    out = tmp_path / "grads.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PROBE),
               out, teacher_path, student_path, vqa_data, tmp_path / "work", CONFIGS / "zero2.json",
               CONFIGS / "zero3.json"]
    result = subprocess.run(list(map(str, command)), cwd=REPO, env=subprocess_env, capture_output=True, text=True,
                            timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    probes = torch.load(out, weights_only=False)

    samples, _ = load_dataset_samples(vqa_data)
    by_id = {s.sample_id: s for s in samples}
    teacher = InProcessTeacher(load_vlm(teacher_path))
    student = load_vlm(student_path)
    seed_everything(3 + 2)  # the probe's seed + stage: the same fresh Recalibrator
    recalibrator = Recalibrator(student.adapter.recalibrator_spec(student.model), teacher.hidden_size, num_blocks=2)
    student.model.train()
    set_trainable(Stage.DISTILLATION, student.adapter.parameter_groups(student.model), recalibrator)

    def gradients(groups) -> dict:
        """Plain PyTorch: sum over ``groups`` of each group's own mean loss (no cross-group normalisation)."""
        student.model.zero_grad(set_to_none=True)
        recalibrator.zero_grad(set_to_none=True)
        for group in groups:
            objective = genrecal_objective(
                Stage.DISTILLATION, student, student.encode(group), recalibrator=recalibrator, teacher=teacher,
                features=teacher.encode(group), losses=LossConfig(),
            )
            objective.loss.backward()
        named = [(f"student.{n}", p) for n, p in student.model.named_parameters() if p.requires_grad]
        named += [(f"recalibrator.{n}", p) for n, p in recalibrator.named_parameters()]
        return {name: p.grad.detach().clone() for name, p in named}, float(objective.loss.detach())

    def worst_relative_error(a: dict, b: dict) -> float:
        assert set(a) == set(b)
        return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)

    assert set(probes) == {"zero2", "zero3", "zero2+overlap", "zero3+overlap"}
    for name, probe in probes.items():
        assert probe["overlap"] == name.endswith("+overlap")  # the overlapped loop ran where asked
        ids_per_rank = probe["sample_ids"]
        assert probe["world_size"] == 2 and not set(ids_per_rank[0]) & set(ids_per_rank[1])
        big_batch = [by_id[i] for ids in ids_per_rank for i in ids]
        reference, reference_loss = gradients([big_batch])  # ONE batch of all 6 samples
        assert worst_relative_error(probe["grads"], reference) < 1e-4, name
        assert probe["row"]["loss"] == pytest.approx(reference_loss, rel=1e-5)
        assert len(big_batch) == 6
        assert probe["row"]["student_answer_tokens"] != 6 * 2  # the answers differ in length
    # The check has teeth: averaging per-micro-batch means (the naive normalisation) is measurably different.
    naive, _ = gradients([[by_id[i]] for ids in ids_per_rank for i in ids])
    naive = {k: v / 6 for k, v in naive.items()}
    assert worst_relative_error(naive, reference) > 1e-2


@pytest.mark.slow
def test_resume_after_a_crash_repeats_and_skips_no_step(uninterrupted_run, first_runs, models, vqa_data,
                                                       subprocess_env):
    first, output = first_runs["interrupted"]
    args = run_args(models, vqa_data, output)
    # Stage 1 (4 steps) and 3 steps of stage 2: its checkpoint at step 2, step 3 logged but never checkpointed.
    assert first.returncode == 0, first.stderr[-4000:]
    assert (output / "stage1" / "DONE").is_file() and not (output / "stage2" / "DONE").exists()
    assert [r["step"] for r in metric_rows(output, 2)] == [0, 1, 2]
    assert (output / "stage2" / "ds" / "latest").read_text().strip() == "step2"

    second = train_cli(subprocess_env, *args)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "stage 1 is done" in second.stderr and "resuming at step 2/4" in second.stderr
    for stage in (1, 2, 3):
        resumed, reference = metric_rows(output, stage), metric_rows(uninterrupted_run, stage)
        assert [r["step"] for r in resumed] == [0, 1, 2, 3]  # each step exactly once
        assert [r["data_position"] for r in resumed] == [r["data_position"] for r in reference]
        for got, want in zip(resumed, reference, strict=True):
            for key in ("loss", "L1_ce", "L2_kl", "L3", "lr"):
                if key in want:
                    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (stage, got["step"], key)
    final, reference = (load_file(o / "final" / "model.safetensors") for o in (output, uninterrupted_run))
    assert set(final) == set(reference)
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_different_teacher_is_refused_naming_both(models, vqa_data, subprocess_env, tmp_path):
    teacher_path, _ = models
    output = tmp_path / "out"
    output.mkdir()
    recorded = {"model_name": "teacher-72b", "architecture": "Qwen2VLForConditionalGeneration",
                "model_type": "qwen2_vl", "hidden_size": 8192, "vocab_size": 152064, "tokenizer_size": 151665,
                "revision": "sha256:feedbeef"}
    (output / "manifest.json").write_text(json.dumps({"teacher": recorded, "world_size": 1}))
    result = train_cli(subprocess_env, *run_args(models, vqa_data, output))
    assert result.returncode == 2
    assert "'teacher-72b' (revision sha256:feedbeef)" in result.stderr
    assert f"'{Path(teacher_path).name}' (revision sha256:" in result.stderr
    assert not (output / "stage1").exists()


@pytest.mark.slow
def test_remote_teacher_trains_like_the_in_process_one(uninterrupted_run, models, vqa_data, subprocess_env,
                                                       teacher_server, tmp_path):
    """The CLI against a real teacher_server process: stages 1-2 log the same losses as the in-process teacher."""
    teacher_path, student_path = models
    output = tmp_path / "out"
    result = train_cli(subprocess_env, "--teacher-addr", teacher_server.address, "--student", student_path,
                       "--data", vqa_data, "--output", output, "--stages", "1,2", *RUN_FLAGS,
                       "--teacher-wire-dtype", "float32")  # compared with the in-process teacher: no bf16 rounding
    assert result.returncode == 0, result.stderr[-4000:]
    teacher = json.loads((output / "manifest.json").read_text())["teacher"]
    assert teacher["model_name"] == Path(teacher_path).name and teacher["hidden_size"] == 96
    for stage in (1, 2):
        remote, local = metric_rows(output, stage), metric_rows(uninterrupted_run, stage)
        assert [r["step"] for r in remote] == [0, 1, 2, 3]
        for got, want in zip(remote, local, strict=True):
            for key in ("L1_ce", "L1_kl", "L2_ce", "L2_kl", "L3", "teacher_ce"):
                if key in want:
                    assert got[key] == pytest.approx(want[key], rel=1e-4), (stage, got["step"], key)
            assert "teacher_ce" in got  # Encode's teacher_ce reached the trainer through gRPC
    assert (output / "final" / "config.json").is_file()
    assert not list((output / "final").glob("recalibrator*"))


@pytest.mark.slow
def test_eval_and_align_commands(uninterrupted_run, models, vqa_data, tmp_path, capsys):
    from student_trainer.__main__ import main

    teacher_path, _ = models
    stage1 = uninterrupted_run / "stage1"
    assert main(["eval", "--model", str(uninterrupted_run / "final"), "--data", str(vqa_data), "--limit", "3",
                 "--max-new-tokens", "3", "--metric", "exact_match", "--output", str(tmp_path / "eval.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["type", "exact_match*", "f1", "rouge_l", "count"]
    assert [line.split()[-1] for line in table if line.startswith("overall")] == ["3"]
    assert json.loads((tmp_path / "eval.json").read_text())["count"] == 3

    png = tmp_path / "fig7.png"
    assert main(["align", "--student", str(stage1 / "student"), "--recalibrator",
                 str(stage1 / "recalibrator.safetensors"), "--teacher-model", str(teacher_path), "--data",
                 str(vqa_data), "--limit", "4", "--output", str(png)]) == 0
    assert "diagonal gap" in capsys.readouterr().out and png.stat().st_size > 0


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_linear_schedule_is_the_closed_form_and_resumes_from_its_state(steps):
    from student_trainer.recipe import linear_schedule

    def rates(optimizer, scheduler, n):
        out = []
        for _ in range(n):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    lr, lr_end = 1e-4, 1e-5
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=lr)
    scheduler = linear_schedule(optimizer, steps, lr, lr_end)
    span = max(steps - 1, 1)
    expected = [lr + (lr_end - lr) * min(k, span) / span for k in range(steps + 2)]  # stays at lr_end after
    half = (steps + 2) // 2
    first = rates(optimizer, scheduler, half)
    resumed_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    resumed_opt.load_state_dict(optimizer.state_dict())
    resumed = linear_schedule(resumed_opt, steps, lr, lr_end)
    resumed.load_state_dict(scheduler.state_dict())
    second = rates(resumed_opt, resumed, steps + 2 - half)
    assert first + second == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("steps, warmup", [(5, 1), (10, 3)])
def test_linear_schedule_with_warmup_rises_then_decays_and_resumes(steps, warmup):
    from student_trainer.recipe import linear_schedule

    lr, lr_end = 1e-3, 1e-4
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=lr)
    scheduler = linear_schedule(optimizer, steps, lr, lr_end, warmup_steps=warmup)
    span = max(steps - 1 - warmup, 1)
    expected = [lr * (k + 1) / (warmup + 1) if k < warmup else lr + (lr_end - lr) * min(k - warmup, span) / span
                for k in range(steps)]
    seen = []
    for k in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        if k == warmup - 1:  # resume across the warm-up/decay boundary from the saved states
            state, opt_state = scheduler.state_dict(), optimizer.state_dict()
            optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
            scheduler = linear_schedule(optimizer, steps, lr, lr_end, warmup_steps=warmup)
            optimizer.load_state_dict(opt_state)
            scheduler.load_state_dict(state)
    assert seen == pytest.approx(expected, rel=1e-9)
    assert seen[warmup] == pytest.approx(lr) and seen[-1] == pytest.approx(lr_end)


def test_two_different_samples_under_one_id_are_refused():
    from genrecal.resilient_teacher import unique_samples
    from genrecal.sample import Sample, Turn

    def sample(answer):
        return Sample("same", [Turn("user", "What colour?"), Turn("assistant", answer)])

    first, again = sample("red"), sample("red")
    assert list(unique_samples([first, again, sample("red")]).values()) == [first]  # equal content: one entry
    with pytest.raises(ValueError, match="two different samples share the id 'same'"):
        unique_samples([first, sample("blue")])


@pytest.mark.slow
def test_data_smaller_than_one_step_trains_all_stages_against_the_server(models, vqa_data, subprocess_env,
                                                                        teacher_server, tmp_path):
    """3 samples, 4 per step: every step holds a sample twice (an epoch boundary inside the step). Against a
    real teacher_server (one Encode per step, which may not repeat a sample id) stages 1-3 run and log the
    losses of the in-process teacher, which encodes every occurrence on its own."""
    teacher_path, student_path = models
    small = tmp_path / "small.json"
    small.write_text(json.dumps(json.loads(vqa_data.read_text())[:3]))
    (tmp_path / "img").symlink_to(vqa_data.parent / "img")
    flags = ["--student", student_path, "--data", small, "--steps-per-stage", "2", "--grad-accum", "4",
             "--micro-batch-size", "1", "--save-every", "100", "--lr", "2e-3", "--lr-end", "2e-4", "--seed", "0",
             "--no-tensorboard", "--data-workers", "0"]
    remote, local = concurrently(  # independent runs
        lambda: train_cli(subprocess_env, "--teacher-addr", teacher_server.address, "--output", tmp_path / "remote",
                          *flags, "--teacher-wire-dtype", "float32"),  # compared with the in-process teacher
        lambda: train_cli(subprocess_env, "--teacher-model", teacher_path, "--output", tmp_path / "local", *flags),
    )
    assert remote.returncode == 0, remote.stderr[-4000:]
    assert local.returncode == 0, local.stderr[-4000:]
    for stage in (1, 2, 3):
        got, want = metric_rows(tmp_path / "remote", stage), metric_rows(tmp_path / "local", stage)
        assert [r["step"] for r in got] == [0, 1] and [r["samples"] for r in got] == [4, 4]
        for a, b in zip(got, want, strict=True):
            for key in ("loss", "L1_ce", "L1_kl", "L2_ce", "L2_kl", "L3", "teacher_answer_tokens"):
                assert (key in a) == (key in b)
                if key in a:
                    assert a[key] == pytest.approx(b[key], rel=1e-4), (stage, a["step"], key)
    assert (tmp_path / "remote" / "final" / "config.json").is_file()


@pytest.mark.slow
def test_zero_offload_steps_with_deepspeed_cpu_adam_like_adamw(models, vqa_data, subprocess_env, tmp_path):
    """A DeepSpeed config that offloads the optimizer gets DeepSpeed's CPU Adam (AdamW mode); two steps give the
    weights that torch's AdamW gives without offload."""
    _, student = models
    flags = ["--stages", "3", "--student", student, "--data", vqa_data, "--steps-per-stage", "2", "--grad-accum", "2",
             "--micro-batch-size", "1", "--save-every", "100", "--lr", "2e-3", "--lr-end", "2e-4", "--seed", "0",
             "--weight-decay", "0.1", "--no-tensorboard", "--dtype", "float32", "--data-workers", "0"]
    offload, plain = concurrently(  # independent runs (the plain one while CPU Adam's op builds on first use)
        lambda: train_cli(subprocess_env, *flags, "--deepspeed", CONFIGS / "zero2_offload.json",
                          "--output", tmp_path / "offload", timeout=900),
        lambda: train_cli(subprocess_env, *flags, "--deepspeed", CONFIGS / "zero2.json", "--output", tmp_path / "plain"),
    )
    assert offload.returncode == 0, offload.stderr[-4000:]
    assert plain.returncode == 0, plain.stderr[-4000:]
    assert "ZeRO-2, DeepSpeedCPUAdam, float32" in offload.stderr and "ZeRO-2, AdamW, float32" in plain.stderr
    original = load_file(Path(student) / "model.safetensors")
    got, want = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("offload", "plain"))
    assert any(not torch.equal(original[k], want[k]) for k in original)  # the steps moved the weights
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_overlapped_score_trains_exactly_like_the_sequential_loop(models, vqa_data, subprocess_env, teacher_server,
                                                                  tmp_path):
    """Against a real teacher_server (ZeRO-3, 2 micro-batches per step: the last backward follows another
    backward): with each Score in flight during the next micro-batch's forward, stage 2 logs the same losses and
    ends with the same weights as with --no-score-overlap, bit for bit. (Stage 1 overlapped, against the in-process
    teacher: test_remote_teacher_trains_like_the_in_process_one.)"""
    _, student_path = models
    flags = ["--student", student_path, "--data", vqa_data, "--stages", "2", "--steps-per-stage", "2",
             "--grad-accum", "2", "--micro-batch-size", "1", "--save-every", "100", "--lr", "2e-3", "--lr-end",
             "2e-4", "--seed", "0", "--no-tensorboard", "--data-workers", "0"]
    sides = {"overlap": [], "sequential": ["--no-score-overlap"]}
    results = concurrently(*(lambda name=name, extra=extra: train_cli(
        subprocess_env, "--teacher-addr", teacher_server.address, "--output", tmp_path / name, *flags, *extra)
        for name, extra in sides.items()))
    runs = dict(zip(sides, results, strict=True))
    for name, result in runs.items():
        assert result.returncode == 0, result.stderr[-4000:]
        assert ("each Score overlaps the next micro-batch's forward" in result.stderr) == (name == "overlap")
    got, want = metric_rows(tmp_path / "overlap", 2), metric_rows(tmp_path / "sequential", 2)
    assert [r["step"] for r in got] == [0, 1]  # step 1's losses see step 0's update
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "L1_ce", "L1_kl", "L2_ce", "L2_kl", "L3", "student_answer_tokens",
                    "teacher_answer_tokens", "teacher_ce"):
            assert key in a and a[key] == b[key], (a["step"], key)
        assert 0 < a["teacher_wait_share"] < 1
    for file in ("student/model.safetensors", "recalibrator.safetensors"):
        overlapped, sequential = (load_file(tmp_path / run / "stage2" / file) for run in runs)
        assert set(overlapped) == set(sequential)
        assert all(torch.equal(overlapped[k], sequential[k]) for k in sequential), file
