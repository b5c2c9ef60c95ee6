"""ULD and token-level KD baselines against reference math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genrecal.baselines import token_kd_loss, uld_distance, uld_loss


def test_uld_distance_against_a_direct_loop(rng):
    torch.manual_seed(int(rng.integers(1 << 31)))
    s = F.log_softmax(torch.randn(5, 11), -1)
    t = F.log_softmax(torch.randn(5, 17), -1)
    got = uld_distance(s, t)
    for k in range(5):
        ps = sorted(s[k].exp().tolist(), reverse=True) + [0.0] * 6
        pt = sorted(t[k].exp().tolist(), reverse=True)
        assert got[k].item() == pytest.approx(sum(abs(a - b) for a, b in zip(ps, pt, strict=True)), rel=1e-5)


def test_uld_is_zero_for_a_permuted_identical_distribution_and_aligns_by_position(rng):
    torch.manual_seed(int(rng.integers(1 << 31)))
    t = F.log_softmax(torch.randn(4, 9), -1)
    s = t[:, torch.randperm(9)].clone().requires_grad_(True)  # same probabilities, other token ids
    loss, count = uld_loss([s], [t])
    assert count == 4 and loss.item() == pytest.approx(0.0, abs=1e-6)
    longer = F.log_softmax(torch.randn(7, 9), -1)
    _, count = uld_loss([s], [longer])
    assert count == 4  # min(La_s, La_l) positions


def test_token_kd_equals_kl_div_and_refuses_other_tokenizers(rng):
    torch.manual_seed(int(rng.integers(1 << 31)))
    s = F.log_softmax(torch.randn(6, 13), -1).requires_grad_(True)
    t = F.log_softmax(torch.randn(6, 13), -1)
    loss, count = token_kd_loss([s], [t])
    expected = F.kl_div(s, t, log_target=True, reduction="sum") / 6
    assert count == 6 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    same, _ = token_kd_loss([t.clone()], [t])
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one tokenizer"):
        token_kd_loss([s[:5]], [t])


@pytest.mark.parametrize(("baseline", "student_tokenizer"), [("uld", "llama2"), ("kd", "gpt2")])
def test_baselines_train_in_process(tiny_checkpoint, tmp_path, rng, baseline, student_tokenizer):
    from genrecal.distill import LossConfig
    from genrecal.inprocess import StageRunConfig, run_stages
    from tests.genrecal.test_inprocess import colour_samples

    teacher = tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96)
    student = tiny_checkpoint("qwen2_vl", tokenizer=student_tokenizer, seed=3)
    config = StageRunConfig(stages=[3], steps_per_stage=3, batch_size=3, grad_accum=1, lr=2e-3, lr_end=2e-4,
                            losses=LossConfig(logit_distillation=baseline))
    history = run_stages(teacher, student, colour_samples(6, rng), tmp_path / "run", config)[3]
    name = baseline.upper()
    assert all(name in row and row[name] >= 0 for row in history)
    assert history[-1]["L3"] < history[0]["L3"]
    with pytest.raises(ValueError, match="logit_distillation must be one of"):
        LossConfig(logit_distillation="nope")
