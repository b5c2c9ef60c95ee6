"""The GenRecal objective on real tiny VLMs: where gradients go, and equality with plain autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genrecal.distill import LossConfig, genrecal_objective, regularisation_path_inputs, student_path_inputs
from genrecal.families import load_vlm
from genrecal.recalibrator import Recalibrator
from genrecal.sample import Sample, Turn
from genrecal.stages import Stage, set_trainable
from genrecal.teacher import InProcessTeacher
from tests.conftest import random_image


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    teacher = InProcessTeacher(load_vlm(tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96)), chunk_size=3)
    student = load_vlm(tiny_checkpoint("qwen2_vl", tokenizer="llama2", seed=1))
    return teacher, student


def make_samples(rng, n=2):
    words = ["red", "blue", "green", "circle", "square"]
    return [
        Sample(f"s{i}", [Turn("user", "<image>\nWhat is it?"), Turn("assistant", " ".join(rng.choice(words, size=2)))],
               [random_image(rng)])
        for i in range(n)
    ]


def reference_path_loss(head, outputs, features, ce_weight=1.0, kl_weight=1.0):
    """Plain autograd through the teacher's full head: CE + forward KL averaged over answer tokens."""
    r = torch.cat(outputs)
    labels = torch.cat([f.answer_token_ids for f in features])
    target = F.log_softmax(head(torch.cat([f.prediction_states for f in features])).float(), dim=-1)
    log_q = F.log_softmax(head(r).float(), dim=-1)
    ce = F.nll_loss(log_q, labels)
    kl = (target.exp() * (target - log_q)).sum(-1).mean()
    return ce_weight * ce + kl_weight * kl


def test_student_gradient_arrives_only_through_question_features(pair, rng):
    teacher, student = pair
    samples = make_samples(rng)
    features = teacher.encode(samples)
    batch = student.encode(samples)
    torch.manual_seed(0)
    recalibrator = Recalibrator(student.adapter.recalibrator_spec(student.model), teacher.hidden_size)
    hidden = student.body_hidden_states(batch).detach().requires_grad_(True)  # stands for z_s
    outputs = recalibrator(student_path_inputs(hidden, batch, features), question_from_teacher=False)
    loss = reference_path_loss(teacher.vlm.head, outputs, features)
    loss.backward()
    for i in range(len(samples)):
        start = batch.answer_spans[i][0][0]
        grad_norm = hidden.grad[i].norm(dim=-1)  # (L_s,)
        assert grad_norm[start - 1] > 0, "the last question position predicts the first teacher answer token"
        assert (grad_norm[:start] > 0).all(), "causal attention lets every answer output see all of z_qs"
        assert (grad_norm[start:] == 0).all(), "the student's own answer tokens must get no gradient from L1"
    # The regularisation path does not involve the student at all.
    reg = recalibrator(regularisation_path_inputs(features), question_from_teacher=True)
    assert not any(r.requires_grad and r.grad_fn is None for r in reg)


@pytest.mark.parametrize("stage", [Stage.ALIGNMENT, Stage.DISTILLATION])
def test_objective_gradients_equal_plain_autograd(pair, rng, stage):
    teacher, student = pair
    samples = make_samples(rng, 3)
    features = teacher.encode(samples)
    batch = student.encode(samples)
    torch.manual_seed(1)
    recalibrator = Recalibrator(student.adapter.recalibrator_spec(student.model), teacher.hidden_size)
    params = set_trainable(stage, student.adapter.parameter_groups(student.model), recalibrator)
    losses = LossConfig(ce_weight=0.7, kl_weight=1.3)

    objective = genrecal_objective(stage, student, batch, recalibrator=recalibrator, teacher=teacher,
                                   features=features, losses=losses)
    objective.loss.backward()
    ours = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None

    hidden = student.body_hidden_states(batch)
    expected = sum(
        reference_path_loss(teacher.vlm.head, recalibrator(inputs, question_from_teacher=from_teacher), features,
                            losses.ce_weight, losses.kl_weight)
        for inputs, from_teacher in ((student_path_inputs(hidden, batch, features), False),
                                     (regularisation_path_inputs(features), True))
    )
    if stage == Stage.DISTILLATION:
        logits = student.head(hidden)[:, :-1].float()
        labels = batch.labels()[:, 1:]
        expected = expected + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert objective.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    student_ids = {id(p) for p in student.model.parameters()}
    for p, g in zip(params, ours, strict=True):
        torch.testing.assert_close(g, p.grad if p.grad is not None else torch.zeros_like(p), rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-9)
    trained_student = [p for p in params if id(p) in student_ids]
    if stage == Stage.ALIGNMENT:
        assert not trained_student
        assert all(p.grad is None for p in student.model.parameters())
    else:
        assert any(g.abs().sum() > 0 for p, g in zip(params, ours, strict=True) if id(p) in student_ids)
    for p in params:
        p.grad = None
    set_trainable(Stage.SFT, student.adapter.parameter_groups(student.model), None)


def test_mismatched_teacher_features_are_refused(pair, rng):
    teacher, student = pair
    samples = make_samples(rng, 2)
    features = teacher.encode(samples[::-1])
    batch = student.encode(samples)
    with pytest.raises(ValueError, match="teacher features are for sample"):
        student_path_inputs(student.body_hidden_states(batch), batch, features)


def test_loss_parts_add_reduce_and_name_their_metric_columns():
    from genrecal.distill import LossParts

    a, b = LossParts(l1_ce=1.0, l1_kl=0.5, l3=2.0), LossParts(l1_ce=0.25, l1_kl=0.125, l3=1.0)
    total = a + b
    assert total == LossParts(l1_ce=1.25, l1_kl=0.625, l3=3.0)  # the parts not computed stay None
    assert total.to_row() == {"L1_ce": 1.25, "L1_kl": 0.625, "L3": 3.0}
    assert LossParts(kd=0.1).to_row() == {"KD": 0.1} and LossParts(uld=0.2).to_row() == {"ULD": 0.2}
    assert total.with_values([2 * v for v in total.values()]) == LossParts(l1_ce=2.5, l1_kl=1.25, l3=6.0)
    with pytest.raises(AssertionError, match="l2_ce is computed on one side"):
        _ = a + LossParts(l1_ce=1.0, l1_kl=0.5, l2_ce=1.0, l3=2.0)


@pytest.mark.parametrize("stage", [Stage.ALIGNMENT, Stage.DISTILLATION, Stage.SFT])
def test_objective_parts_are_the_stage_losses(pair, rng, stage):
    """Each stage's objective reports exactly its own loss parts (the metric columns of its rows)."""
    teacher, student = pair
    samples = make_samples(rng, 2)
    torch.manual_seed(2)
    recalibrator = Recalibrator(student.adapter.recalibrator_spec(student.model), teacher.hidden_size)
    objective = genrecal_objective(stage, student, student.encode(samples), recalibrator=recalibrator,
                                   teacher=teacher, features=teacher.encode(samples),
                                   losses=LossConfig(regularisation=stage != Stage.DISTILLATION))
    expected = {Stage.ALIGNMENT: {"L1_ce", "L1_kl", "L2_ce", "L2_kl"}, Stage.DISTILLATION: {"L1_ce", "L1_kl", "L3"},
                Stage.SFT: {"L3"}}[stage]
    assert set(objective.parts.to_row()) == expected
    assert all(v > 0 for v in objective.parts.to_row().values())
    assert (objective.student_tokens is not None) == (stage != Stage.ALIGNMENT)
    assert (objective.teacher_tokens is not None) == (stage != Stage.SFT)
