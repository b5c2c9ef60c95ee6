"""The Fig. 7 alignment check on tiny real VLMs of different families and tokenizers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from genrecal.distill import regularisation_path_inputs, student_path_inputs
from genrecal.families import load_vlm
from genrecal.recalibrator import Recalibrator
from genrecal.sample import Sample, Turn
from genrecal.teacher import InProcessTeacher
from student_trainer.alignment import alignment_matrix, diagonal_gap, plot_alignment
from tests.conftest import random_image


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    teacher = InProcessTeacher(load_vlm(tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96)))
    student = load_vlm(tiny_checkpoint("internvl", tokenizer="llama2"))
    torch.manual_seed(0)
    recalibrator = Recalibrator(student.adapter.recalibrator_spec(student.model), teacher.hidden_size)
    return teacher, student, recalibrator


def make_samples(rng, n):
    answers = ["red", "a blue square", "two", "green circle", "yes"]
    samples = [
        Sample(f"p{i}", [Turn("user", "<image>\nWhat is shown?"), Turn("assistant", answers[i % len(answers)])],
               [random_image(rng, size=32)])
        for i in range(n - 1)
    ]
    samples.append(Sample("text", [Turn("user", "Name a shape."), Turn("assistant", "triangle"),
                                   Turn("user", "Another?"), Turn("assistant", "a circle")]))
    return samples


def test_alignment_matrix_equals_a_direct_computation(models, rng, tmp_path):
    teacher, student, recalibrator = models
    samples = make_samples(rng, 5)
    recalibrator.train()
    matrix = alignment_matrix(student, teacher, recalibrator, samples, batch_size=2)
    assert recalibrator.training, "the caller's training mode is restored"

    assert matrix.shape == (5, 5) and matrix.dtype == torch.float32
    assert torch.isfinite(matrix).all()
    assert (matrix.abs() <= 1 + 1e-5).all()

    # Directly: both paths over the whole batch at once, mean-pooled, cosine similarity.
    recalibrator.eval()
    with torch.no_grad():
        features = teacher.encode(samples)
        batch = student.encode(samples)
        hidden = student.body_hidden_states(batch)
        student_pooled = torch.stack([r.mean(0) for r in recalibrator(student_path_inputs(hidden, batch, features), False)])
        teacher_pooled = torch.stack([r.mean(0) for r in recalibrator(regularisation_path_inputs(features), True)])
    expected = torch.nn.functional.cosine_similarity(student_pooled[:, None, :], teacher_pooled[None, :, :], dim=-1)
    uncentred = alignment_matrix(student, teacher, recalibrator, samples, batch_size=2, centre=False)
    torch.testing.assert_close(uncentred, expected, atol=1e-4, rtol=1e-4)
    # Centred (the default): each path's mean over the pairs removed first.
    student_pooled, teacher_pooled = student_pooled - student_pooled.mean(0), teacher_pooled - teacher_pooled.mean(0)
    expected = torch.nn.functional.cosine_similarity(student_pooled[:, None, :], teacher_pooled[None, :, :], dim=-1)
    torch.testing.assert_close(matrix, expected, atol=1e-4, rtol=1e-4)

    png = plot_alignment(matrix, tmp_path / "alignment.png", title="stage 1")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_diagonal_gap():
    assert diagonal_gap(torch.eye(4)) == pytest.approx(1.0)
    assert diagonal_gap(torch.ones(3, 3)) == pytest.approx(0.0)
    matrix = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.0], [0.4, -0.2, 0.7]])
    assert diagonal_gap(matrix) == pytest.approx(0.8 - 0.8 / 6)
    with pytest.raises(ValueError, match="square"):
        diagonal_gap(torch.ones(1, 1))
