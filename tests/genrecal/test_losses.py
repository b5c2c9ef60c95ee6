"""L1/L2 through the teacher-head surrogate and L3, against plain autograd and transformers' own loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from genrecal.losses import answer_path_loss, kl_divergence, sft_head_calls, student_sft_loss, surrogate_loss
from genrecal.recalibrator import Recalibrator, RecalibratorInput, RecalibratorSpec
from tests.conftest import tiny_qwen2_config

D_S, D_L, VOCAB = 16, 24, 37


def reference_answer_loss(
    outputs: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher_states: torch.Tensor | None,
    ce_weight: float,
    kl_weight: float,
    normalizer: float | None,
) -> torch.Tensor:
    """ce_w * CE + kl_w * KL(P_teacher || Q) through the full head, written out; summed / normalizer."""
    scored = labels != -100
    log_q = torch.log_softmax(outputs @ head_weight.T + (0 if head_bias is None else head_bias), dim=-1)
    ce_rows = -log_q[scored].gather(1, labels[scored][:, None]).squeeze(1)
    loss = ce_weight * ce_rows.sum()
    if teacher_states is not None:
        log_p = torch.log_softmax(
            teacher_states @ head_weight.T + (0 if head_bias is None else head_bias), dim=-1
        )
        kl_rows = (log_p.exp() * (log_p - log_q)).sum(-1)[scored]
        loss = loss + kl_weight * kl_rows.sum()
    return loss / (normalizer if normalizer is not None else scored.sum())


def make_problem(seed: int, num_tokens: int = 9, with_bias: bool = True):
    generator = torch.Generator().manual_seed(seed)
    head_weight = torch.randn(VOCAB, D_L, generator=generator)
    head_bias = torch.randn(VOCAB, generator=generator) if with_bias else None
    outputs = torch.randn(num_tokens, D_L, generator=generator)
    labels = torch.randint(VOCAB, (num_tokens,), generator=generator)
    labels[[1, 4]] = -100
    teacher_states = torch.randn(num_tokens, D_L, generator=generator)
    return head_weight, head_bias, outputs, labels, teacher_states


@pytest.mark.parametrize(
    "ce_weight, kl_weight, with_bias, with_teacher, normalizer",
    [
        (1.0, 1.0, True, True, None),
        (1.0, 0.0, False, True, None),
        (0.5, 2.0, True, True, 13.0),
        (1.0, 1.0, False, False, None),
    ],
)
def test_surrogate_gradient_equals_autograd_through_the_head(
    ce_weight, kl_weight, with_bias, with_teacher, normalizer
):
    head_weight, head_bias, outputs, labels, teacher_states = make_problem(0, with_bias=with_bias)
    teacher_states = teacher_states if with_teacher else None
    # Something upstream of the outputs, so the surrogate's gradient has to travel further back.
    generator = torch.Generator().manual_seed(1)
    upstream = torch.nn.Linear(D_L, D_L)
    with torch.no_grad():
        upstream.weight.copy_(torch.randn(D_L, D_L, generator=generator) / D_L**0.5)

    surrogate, score = answer_path_loss(
        head_weight,
        upstream(outputs),
        labels,
        teacher_states,
        head_bias=head_bias,
        ce_weight=ce_weight,
        kl_weight=kl_weight,
        normalizer=normalizer,
        chunk_size=3,
    )
    surrogate.backward()
    got = upstream.weight.grad.clone()

    upstream.zero_grad()
    reference = reference_answer_loss(
        upstream(outputs), head_weight, head_bias, labels, teacher_states, ce_weight, kl_weight, normalizer
    )
    reference.backward()
    torch.testing.assert_close(got, upstream.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(surrogate.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    assert score.num_tokens == 7
    assert head_weight.grad is None


def test_surrogate_through_the_recalibrator_matches_autograd():
    torch.manual_seed(0)
    config = tiny_qwen2_config(D_S, VOCAB)
    recalibrator = Recalibrator(
        RecalibratorSpec(Qwen2DecoderLayer, config, Qwen2RotaryEmbedding, Qwen2RMSNorm), D_L
    )
    generator = torch.Generator().manual_seed(2)
    batch = [
        RecalibratorInput(
            [torch.randn(3, D_S, generator=generator)], [torch.randn(4, D_L, generator=generator)]
        ),
        RecalibratorInput(
            [torch.randn(5, D_S, generator=generator)], [torch.randn(2, D_L, generator=generator)]
        ),
    ]
    head_weight = torch.randn(VOCAB, D_L, generator=generator) / D_L**0.5
    labels = torch.randint(VOCAB, (6,), generator=generator)
    teacher_states = torch.randn(6, D_L, generator=generator)

    surrogate, _ = answer_path_loss(
        head_weight, torch.cat(recalibrator(batch, False)), labels, teacher_states
    )
    surrogate.backward()
    got = {name: p.grad.clone() for name, p in recalibrator.named_parameters()}
    recalibrator.zero_grad()
    reference = reference_answer_loss(
        torch.cat(recalibrator(batch, False)), head_weight, None, labels, teacher_states, 1.0, 1.0, None
    )
    reference.backward()
    for name, p in recalibrator.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_head_scores_fp32_outputs_and_returns_an_fp32_gradient():
    head_weight, _, outputs, labels, teacher_states = make_problem(3, with_bias=False)
    outputs.requires_grad_(True)
    surrogate, score = answer_path_loss(head_weight.bfloat16(), outputs, labels, teacher_states.bfloat16())
    surrogate.backward()
    assert outputs.grad.dtype == torch.float32
    torch.testing.assert_close(outputs.grad, score.grad_inputs.float())


def test_surrogate_loss_value_and_gradient():
    generator = torch.Generator().manual_seed(4)
    outputs = torch.randn(5, 3, generator=generator, requires_grad=True)
    grad = torch.randn(5, 3, generator=generator)
    loss = surrogate_loss(outputs, grad, value=2.5)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    torch.testing.assert_close(outputs.grad, grad)
    torch.testing.assert_close(surrogate_loss(outputs, grad).detach(), (outputs * grad).sum().detach())
    with pytest.raises(ValueError, match="shape"):
        surrogate_loss(outputs, grad[:4])


@pytest.fixture(scope="module")
def tiny_student() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = tiny_qwen2_config(D_S, VOCAB, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def test_student_sft_loss_equals_transformers_loss(tiny_student):
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, VOCAB, (3, 10), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # question
    labels[1, :6] = -100
    labels[1, 9:] = -100  # padding
    labels[2, :2] = -100
    expected = tiny_student(input_ids=input_ids, labels=labels).loss

    hidden_states = tiny_student.model(
        input_ids=input_ids
    ).last_hidden_state  # (B, L, D_s), after the final norm
    loss, num_tokens = student_sft_loss(hidden_states, tiny_student.lm_head, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert num_tokens == int((labels[:, 1:] != -100).sum())

    summed, _ = student_sft_loss(hidden_states, tiny_student.lm_head, labels, normalizer=1.0)
    torch.testing.assert_close(summed, expected * num_tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_calls", [None, 3])
def test_student_sft_loss_all_masked_is_zero_not_nan(tiny_student, head_calls):
    hidden_states = torch.randn(2, 6, D_S, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[:, 0] = 5  # position 0 is never predicted
    loss, num_tokens = student_sft_loss(hidden_states, tiny_student.lm_head, labels, head_calls=head_calls)
    assert num_tokens == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(hidden_states.grad, torch.zeros_like(hidden_states))


def random_labels(generator: torch.Generator, shape: tuple[int, int], vocab: int) -> torch.Tensor:
    """(B, L) labels with question / padding positions masked at random places (-100)."""
    labels = torch.randint(vocab, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.4] = -100
    return labels


@pytest.mark.parametrize("chunk_size, head_calls", [(1, None), (3, None), (1000, None), (4, 40)])
def test_chunked_sft_loss_and_gradients_equal_plain_autograd(tiny_student, chunk_size, head_calls):
    """Chunked, checkpointed L3 against the plain full-logits loss: the value and the gradients of every student
    parameter (body and head). ``head_calls`` above the token count: some chunks are empty (other ranks' count)."""
    generator = torch.Generator().manual_seed(11)
    input_ids = torch.randint(VOCAB, (3, 12), generator=generator)
    labels = random_labels(generator, (3, 12), VOCAB)
    params = dict(tiny_student.named_parameters())

    def loss_and_grads(fn):
        tiny_student.zero_grad(set_to_none=True)
        hidden = tiny_student.model(input_ids=input_ids).last_hidden_state  # (B, L, D_s)
        loss = fn(hidden)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in params.items()}

    def plain(hidden):  # full (B, L-1, V) logits, one CE
        logits = tiny_student.lm_head(hidden[:, :-1]).float()
        targets = labels[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum") / 7.0

    want, want_grads = loss_and_grads(plain)
    got, got_grads = loss_and_grads(lambda hidden: student_sft_loss(
        hidden, tiny_student.lm_head, labels, normalizer=7.0, chunk_size=chunk_size, head_calls=head_calls)[0])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert set(got_grads) == set(params) and "lm_head.weight" in got_grads
    for name in params:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sft_head_is_called_as_a_module_once_per_chunk_and_under_no_grad_too(tiny_student):
    """Each chunk calls the head *module* (ZeRO-3 gathers its weight in the module's hooks), equally often with
    and without gradients; the count is what ``sft_head_calls`` says, or ``head_calls`` when given."""
    generator = torch.Generator().manual_seed(12)
    hidden = torch.randn(2, 9, D_S, generator=generator, requires_grad=True)
    labels = random_labels(generator, (2, 9), VOCAB)
    tokens = int((labels[:, 1:] != -100).sum())
    calls = []
    hook = tiny_student.lm_head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        loss, _ = student_sft_loss(hidden, tiny_student.lm_head, labels, chunk_size=2)
        forward_calls = len(calls)
        loss.backward()  # the checkpoint recomputes each chunk through the module again
        with torch.no_grad():
            calls.clear()
            no_grad_loss, _ = student_sft_loss(hidden, tiny_student.lm_head, labels, chunk_size=2)
        assert len(calls) == forward_calls == sft_head_calls(tokens, 2) == -(-tokens // 2)
        torch.testing.assert_close(no_grad_loss, loss.detach())
        calls.clear()
        student_sft_loss(hidden, tiny_student.lm_head, labels, chunk_size=2, head_calls=tokens + 3)
        assert len(calls) == tokens + 3 and calls.count(0) == 3
    finally:
        hook.remove()
    assert sft_head_calls(0) == 1  # an all-masked micro-batch still calls the head once, as every rank does


def test_chunked_sft_loss_never_holds_tokens_by_vocab_logits():
    """Peak memory of L3's forward + backward with a 16k vocabulary and 1024 scored tokens: within ~14 bytes x
    chunk x V (plus the (T, D) states and the head gradient), far below one fp32 [tokens x vocab] tensor."""
    from tests.genrecal.test_head_scoring import peak_allocated_bytes

    tokens, vocab, hidden_size, chunk = 1024, 16384, 32, 16
    generator = torch.Generator().manual_seed(13)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(1, tokens + 1, hidden_size, generator=generator, requires_grad=True)
    labels = torch.randint(vocab, (1, tokens + 1), generator=generator)

    def step():
        loss, _ = student_sft_loss(hidden, head, labels, chunk_size=chunk)
        loss.backward()

    peak = peak_allocated_bytes(step)
    full_logits = tokens * vocab * 4
    weight_grad = vocab * hidden_size * 4  # autograd holds the running sum and one chunk's (V, D) gradient
    assert peak <= 14 * chunk * vocab + 3 * weight_grad + 4 * tokens * hidden_size * 4
    assert peak < full_logits / 4


def test_kl_divergence_identities():
    generator = torch.Generator().manual_seed(6)
    p_logits, q_logits = (
        torch.randn(2, 4, VOCAB, generator=generator),
        torch.randn(2, 4, VOCAB, generator=generator),
    )
    torch.testing.assert_close(kl_divergence(p_logits, p_logits), torch.zeros(2, 4))
    torch.testing.assert_close(kl_divergence(p_logits, p_logits + 3.0), torch.zeros(2, 4), atol=1e-6, rtol=0)
    expected = F.kl_div(
        F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(kl_divergence(p_logits, q_logits), expected)
    assert (kl_divergence(p_logits, q_logits) > 0).all()
