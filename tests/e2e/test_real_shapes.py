"""The trainer against the real server at real widths and vocabularies: a teacher as wide as Qwen2-VL-2B (hidden
1536, 151,936 vocabulary rows, tied) and a student as wide as SmolVLM-256M (hidden 576, 49,280 rows), one decoder
layer each, on a native-resolution photo with a long answer, the resolution set by flags on both sides.

- Through the service with an fp32 wire, stages 1-2 log the losses of the same run with an in-process teacher.
- With the default bf16 wire the losses stay within bf16 rounding of those, and the bytes each step carried equal
  what the losses need (``docs/student_trainer.md``, "Wire volume"): answer and question features, the outputs of
  both paths and their gradients, at 2 bytes an element, plus the small headers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from genrecal.tiny import TinySizes, write_tiny_checkpoint
from teacher_server.launch import TeacherProcess
from tests.conftest import concurrently

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TEACHER_OPTIONS = "max_pixels=200704"  # Qwen-VL: a 512-px photo -> 16 x 16 = 256 image tokens
STUDENT_OPTIONS = "do_image_splitting=true,longest_edge=1024"  # SmolVLM-style: 2 x 2 tiles + a global view
ANSWER = " ".join(["The astronaut wears a white suit with patches on the sleeves and stands in front of a flag,"
                   " smiling at the camera while the light comes from the left."] * 5)  # ~150 teacher tokens
FLAGS = ["--stages", "1,2", "--steps-per-stage", "1", "--grad-accum", "1", "--micro-batch-size", "1",
         "--dtype", "float32", "--save-every", "100", "--no-tensorboard", "--data-workers", "0",
         "--image-options", STUDENT_OPTIONS]
LOSS_KEYS = ("loss", "L1_ce", "L1_kl", "L2_ce", "L2_kl", "L3")


@pytest.fixture(scope="module")
def real_width(tmp_path_factory):
    """(teacher, student, data): checkpoints at real widths and vocabularies, one photo record."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("real_width")
    teacher = write_tiny_checkpoint(
        "qwen2_vl", root / "teacher", tokenizer="gpt2", vocab_size=151936, tie_word_embeddings=True,
        sizes=TinySizes(hidden_size=1536, num_layers=1, num_heads=12, num_kv_heads=2, intermediate_size=2048,
                        vision_hidden_size=64, vision_heads=2))
    student = write_tiny_checkpoint(
        "idefics3", root / "student", tokenizer="llama2", vocab_size=49280, tie_word_embeddings=True,
        sizes=TinySizes(hidden_size=576, num_layers=1, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                        vision_hidden_size=64, vision_heads=2, image_size=256))
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.jpg", quality=90)  # 512 x 512
    records = [{"id": f"photo-{k}", "image": "astronaut.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nDescribe the photo ({k})."}, {"from": "gpt", "value": ANSWER}]}
        for k in range(2)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return teacher, student, data


def train(env, output: Path, where: list[str], *extra: str) -> list[dict]:
    command = [sys.executable, "-m", "student_trainer", *where, *extra, "--output", str(output), *FLAGS]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return [json.loads(line) for stage in (1, 2)
            for line in (output / "metrics" / f"stage{stage}.jsonl").read_text().splitlines()]


def test_real_widths_remote_equals_in_process_and_the_wire_carries_what_the_losses_need(
        real_width, subprocess_env, tmp_path):
    teacher, student, data = real_width
    common = ["--student", str(student), "--data", str(data)]
    server = TeacherProcess(teacher, "--image-options", TEACHER_OPTIONS)
    try:
        in_process, remote, remote_bf16 = concurrently(
            lambda: train(subprocess_env, tmp_path / "inprocess", [*common, "--teacher-model", str(teacher)],
                          "--teacher-image-options", TEACHER_OPTIONS),
            lambda: train(subprocess_env, tmp_path / "remote", [*common, "--teacher-addr", server.address],
                          "--teacher-wire-dtype", "float32"),
            lambda: train(subprocess_env, tmp_path / "bf16", [*common, "--teacher-addr", server.address]),
        )
    finally:
        server.kill()
    assert [r["stage"] for r in remote] == [r["stage"] for r in remote_bf16] == [r["stage"] for r in in_process]
    for got, got_bf16, want in zip(remote, remote_bf16, in_process, strict=True):
        keys = [key for key in LOSS_KEYS if key in want]  # stage 1 has no L3
        assert len(keys) == (5 if want["stage"] == 1 else 6)
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-4), (got["stage"], key)
            assert got_bf16[key] == pytest.approx(want[key], rel=2e-2, abs=1e-3), (got["stage"], key)

    # What the losses need: the teacher's answer and question features once, then per path (L1, L2) the outputs
    # and their gradients, La x D_l each; 2 bytes an element on the bf16 wire, 4 on the fp32 one.
    from genrecal.families import load_vlm
    from genrecal.families.resolution import parse_image_options
    from student_trainer.data import load_dataset_samples

    vlm = load_vlm(teacher, image_options=parse_image_options(TEACHER_OPTIONS))
    sample = load_dataset_samples(data)[0][0]
    batch = vlm.encode([sample])
    la = sum(e - s for s, e in batch.answer_spans[0])
    lq = batch.answer_spans[0][-1][1] - la
    assert la >= 100 and batch.input_ids.shape[1] > 256  # a long answer, a photo of 256 image tokens
    for rows, itemsize in ((remote, 4), (remote_bf16, 2)):
        need = {"encode_received": (la + lq) * 1536 * itemsize, "score_sent": 2 * la * 1536 * itemsize,
                "score_received": 2 * la * 1536 * itemsize}
        for key, n in need.items():
            got = sum(r[f"wire_{key}_bytes"] for r in rows) / len(rows)  # one sample a step
            assert n <= got <= 1.05 * n, (itemsize, key, got, n)
