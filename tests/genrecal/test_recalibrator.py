"""The Recalibrator built from real transformers decoder layers of three student families (tiny configs)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VLDecoderLayer,
    Qwen2VLRMSNorm,
    Qwen2VLRotaryEmbedding,
)

from genrecal.losses import answer_path_loss
from genrecal.recalibrator import (
    Recalibrator,
    RecalibratorInput,
    RecalibratorSpec,
    alignment_similarity,
    mean_pool,
    mrope_position_ids,
)
from genrecal.recalibrator_file import load_recalibrator, save_recalibrator

D_S = 32  # student hidden size
D_L = 48  # teacher hidden size
TEXT_KWARGS = dict(
    hidden_size=D_S,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_spec(family: str) -> RecalibratorSpec:
    if family == "qwen2":
        return RecalibratorSpec(
            Qwen2DecoderLayer, Qwen2Config(**TEXT_KWARGS), Qwen2RotaryEmbedding, Qwen2RMSNorm
        )
    if family == "llama":
        return RecalibratorSpec(
            LlamaDecoderLayer, LlamaConfig(**TEXT_KWARGS), LlamaRotaryEmbedding, LlamaRMSNorm
        )
    if family == "qwen2_vl":
        # head_dim 8 -> 4 rotary frequencies split over the (temporal, height, width) axes.
        config = Qwen2VLTextConfig(
            **TEXT_KWARGS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        )
        return RecalibratorSpec(
            Qwen2VLDecoderLayer,
            config,
            Qwen2VLRotaryEmbedding,
            Qwen2VLRMSNorm,
            rotary_position_ids=mrope_position_ids,
        )
    raise AssertionError(family)


FAMILIES = ["qwen2", "llama", "qwen2_vl"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def spec(family) -> RecalibratorSpec:
    return make_spec(family)


@pytest.fixture
def recalibrator(spec) -> Recalibrator:
    torch.manual_seed(0)
    return Recalibrator(spec, teacher_hidden_size=D_L).eval()


def make_sample(
    generator: torch.Generator, question_lengths: list[int], answer_lengths: list[int], question_width: int
) -> RecalibratorInput:
    return RecalibratorInput(
        question_segments=[torch.randn(n, question_width, generator=generator) for n in question_lengths],
        answer_segments=[torch.randn(n, D_L, generator=generator) for n in answer_lengths],
    )


# (question lengths, answer lengths) per sample: ragged, one to three answer spans.
LAYOUTS = [([5], [3]), ([2, 4], [1, 5]), ([7, 1, 2], [2, 3, 1])]


def make_batch(question_width: int, seed: int = 0) -> list[RecalibratorInput]:
    generator = torch.Generator().manual_seed(seed)
    return [make_sample(generator, q, a, question_width) for q, a in LAYOUTS]


def width(question_from_teacher: bool) -> int:
    return D_L if question_from_teacher else D_S


def test_structure_follows_the_student(spec, recalibrator):
    assert (recalibrator.proj_pre.in_features, recalibrator.proj_pre.out_features) == (D_L, D_S)
    assert (recalibrator.proj_post.in_features, recalibrator.proj_post.out_features) == (D_S, D_L)
    assert len(recalibrator.rec_body) == 2
    assert all(type(layer) is spec.decoder_layer_cls for layer in recalibrator.rec_body)
    assert isinstance(recalibrator.norm, spec.norm_cls)
    assert isinstance(recalibrator.rotary_emb, spec.rotary_embedding_cls)
    # Own attention backend and block count, on a copy.
    assert recalibrator.config._attn_implementation == "sdpa"
    assert recalibrator.config.num_hidden_layers == 2
    # The state dict holds the trained parts only (rotary buffers are not persistent).
    prefixes = {key.split(".")[0] for key in recalibrator.state_dict()}
    assert prefixes == {"proj_pre", "rec_body", "norm", "proj_post"}


def test_the_students_config_is_left_untouched(family):
    spec = make_spec(family)
    before = spec.text_config.to_dict()
    attn_before = spec.text_config._attn_implementation
    Recalibrator(spec, teacher_hidden_size=D_L, attn_implementation="eager")
    assert spec.text_config.to_dict() == before
    assert spec.text_config._attn_implementation == attn_before


@pytest.mark.parametrize("question_from_teacher", [False, True])
def test_one_output_row_per_teacher_answer_token(recalibrator, question_from_teacher):
    batch = make_batch(width(question_from_teacher))
    outputs = recalibrator(batch, question_from_teacher=question_from_teacher)
    assert [tuple(o.shape) for o in outputs] == [(sum(a), D_L) for _, a in LAYOUTS]
    assert all(torch.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize("question_from_teacher", [False, True])
def test_a_sample_gives_the_same_outputs_alone_and_in_a_padded_batch(recalibrator, question_from_teacher):
    batch = make_batch(width(question_from_teacher))
    with torch.no_grad():
        batched = recalibrator(batch, question_from_teacher=question_from_teacher)
        for sample, in_batch in zip(batch, batched, strict=True):
            (alone,) = recalibrator([sample], question_from_teacher=question_from_teacher)
            torch.testing.assert_close(in_batch, alone, rtol=1e-5, atol=1e-5)


def test_sdpa_and_eager_agree(spec, recalibrator):
    eager = Recalibrator(spec, teacher_hidden_size=D_L, attn_implementation="eager").eval()
    eager.load_state_dict(recalibrator.state_dict())
    batch = make_batch(D_S)
    with torch.no_grad():
        for sdpa_out, eager_out in zip(recalibrator(batch, False), eager(batch, False), strict=True):
            torch.testing.assert_close(sdpa_out, eager_out, rtol=1e-5, atol=1e-5)


def test_rotary_gets_fresh_positions_over_the_concatenated_sequence(family, recalibrator):
    seen = []
    recalibrator.rotary_emb.register_forward_hook(lambda module, args, output: seen.append(args[1]))
    batch = make_batch(D_S)
    recalibrator(batch, question_from_teacher=False)
    longest = max(sum(q) + sum(a) for q, a in LAYOUTS)
    expected = torch.arange(longest).expand(len(batch), -1)
    if family == "qwen2_vl":
        expected = expected.expand(3, -1, -1)  # M-RoPE: the same text position on all three axes
    assert torch.equal(seen[0], expected)


def perturbed(sample: RecalibratorInput, kind: str, segment: int, row: int) -> RecalibratorInput:
    question = [q.clone() for q in sample.question_segments]
    answer = [a.clone() for a in sample.answer_segments]
    target = question if kind == "question" else answer
    target[segment][row] += 1.0
    return RecalibratorInput(question, answer)


def changed_rows(reference: torch.Tensor, other: torch.Tensor) -> list[bool]:
    return [not torch.allclose(r, o, rtol=0, atol=1e-6) for r, o in zip(reference, other, strict=True)]


def test_answer_outputs_sit_at_the_prediction_positions(recalibrator):
    """Row j of answer k is predicted at c_k - 1 + j: it sees answer tokens before j only."""
    generator = torch.Generator().manual_seed(1)
    sample = make_sample(generator, [4, 3], [5, 2], D_S)
    first_len = 5
    with torch.no_grad():
        (reference,) = recalibrator([sample], False)
        for row in range(first_len):
            (out,) = recalibrator([perturbed(sample, "answer", 0, row)], False)
            # Rows 0..row of answer 0 are predicted from positions up to (and excluding) answer token `row`.
            assert changed_rows(reference, out) == [False] * (row + 1) + [True] * (len(reference) - row - 1)
        # The first output is predicted from the last question position: no teacher answer feature reaches it.
        (out,) = recalibrator([perturbed(sample, "answer", 1, 0)], False)
        assert changed_rows(reference, out) == [False] * (first_len + 1) + [True]
        # The last answer token is never an input of a prediction.
        (out,) = recalibrator([perturbed(sample, "answer", 1, 1)], False)
        assert changed_rows(reference, out) == [False] * len(reference)
        # The question before answer 1 changes all of answer 1 (its first token included), nothing of answer 0.
        (out,) = recalibrator([perturbed(sample, "question", 1, 0)], False)
        assert changed_rows(reference, out) == [False] * first_len + [True] * 2
        # The last question position before answer 0 changes every output.
        (out,) = recalibrator([perturbed(sample, "question", 0, 3)], False)
        assert all(changed_rows(reference, out))


def test_student_features_get_gradient_only_on_the_student_path(recalibrator):
    generator = torch.Generator().manual_seed(2)
    question_student = [torch.randn(4, D_S, generator=generator, requires_grad=True)]  # z_qs
    question_teacher = [torch.randn(6, D_L, generator=generator)]  # z_ql
    answer_teacher = [torch.randn(3, D_L, generator=generator)]  # z_al
    vocab = 40
    head_weight = torch.randn(vocab, D_L, generator=generator)
    labels = torch.randint(vocab, (3,), generator=generator)
    teacher_states = torch.randn(3, D_L, generator=generator)

    # The first answer output alone (predicted at z_qs's last position) reaches every z_qs position.
    (outputs,) = recalibrator(
        [RecalibratorInput(question_student, answer_teacher)], question_from_teacher=False
    )
    (grad_first,) = torch.autograd.grad(outputs[0].square().sum(), question_student, retain_graph=True)
    assert (grad_first.abs().sum(dim=1) > 0).all()

    loss, _ = answer_path_loss(head_weight, outputs, labels, teacher_states)  # L1
    loss.backward()
    assert (question_student[0].grad.abs().sum(dim=1) > 0).all()
    assert question_student[0].grad[-1].abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in recalibrator.parameters())

    question_student[0].grad = None
    recalibrator.zero_grad(set_to_none=True)
    (outputs,) = recalibrator(
        [RecalibratorInput(question_teacher, answer_teacher)], question_from_teacher=True
    )
    loss, _ = answer_path_loss(head_weight, outputs, labels, teacher_states)  # L2
    loss.backward()
    assert question_student[0].grad is None
    assert recalibrator.proj_pre.weight.grad.abs().sum() > 0


def test_bf16_recalibrator_takes_fp32_features():
    torch.manual_seed(0)
    recalibrator = Recalibrator(make_spec("qwen2"), teacher_hidden_size=D_L).to(torch.bfloat16)
    outputs = recalibrator(make_batch(D_S), question_from_teacher=False)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in outputs)


def test_bad_inputs_raise_clear_errors(recalibrator):
    q = torch.randn(3, D_S)
    a = torch.randn(2, D_L)
    with pytest.raises(ValueError, match="2 question segments but 1 answer"):
        recalibrator([RecalibratorInput([q, q], [a])], False)
    with pytest.raises(ValueError, match=rf"expected shape \(Lq, {D_L}\).*got \(3, {D_S}\)"):
        recalibrator([RecalibratorInput([q], [a])], True)
    with pytest.raises(ValueError, match=rf"\(La, {D_L}\), got \(2, {D_S}\)"):
        recalibrator([RecalibratorInput([q], [torch.randn(2, D_S)])], False)
    with pytest.raises(ValueError, match="no prediction position"):
        recalibrator([RecalibratorInput([torch.randn(0, D_S)], [a])], False)
    with pytest.raises(ValueError, match="answer segment 1 is empty"):
        recalibrator([RecalibratorInput([q, q], [a, torch.randn(0, D_L)])], False)
    with pytest.raises(ValueError, match="no answer segments"):
        recalibrator([RecalibratorInput([], [])], False)
    with pytest.raises(ValueError, match="empty batch"):
        recalibrator([], False)
    with pytest.raises(ValueError, match="attn_implementation"):
        Recalibrator(make_spec("qwen2"), D_L, attn_implementation="flash_attention_2")


def test_mean_pooling_and_alignment_similarity(recalibrator):
    batch = make_batch(D_S)
    with torch.no_grad():
        outputs = recalibrator(batch, False)
        pooled = recalibrator.mean_pooled_outputs(batch, False)
    assert pooled.shape == (len(batch), D_L)
    torch.testing.assert_close(pooled, torch.stack([o.mean(0) for o in outputs]))

    similarity = alignment_similarity(outputs, outputs)  # per-sample outputs are pooled inside
    assert similarity.shape == (len(batch), len(batch))
    torch.testing.assert_close(similarity.diagonal(), torch.ones(len(batch)))

    generator = torch.Generator().manual_seed(3)
    student, regularisation = (
        torch.randn(4, D_L, generator=generator),
        torch.randn(4, D_L, generator=generator),
    )
    similarity = alignment_similarity(student, regularisation)
    expected = F.cosine_similarity(student[:, None, :], regularisation[None, :, :], dim=-1)  # [i, j]
    torch.testing.assert_close(similarity, expected)
    with pytest.raises(ValueError, match="same N pairs"):
        alignment_similarity(student, regularisation[:3])
    with pytest.raises(ValueError):
        mean_pool([])


# ---- saving and loading ------------------------------------------------------------------------------------


def test_a_saved_recalibrator_loads_with_its_own_block_count_and_gives_the_same_outputs(tmp_path):
    spec = make_spec("qwen2_vl")
    torch.manual_seed(0)
    trained = Recalibrator(spec, teacher_hidden_size=D_L, num_blocks=3).eval()
    path = save_recalibrator(tmp_path / "stage1" / "recalibrator.safetensors", trained)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert {k: metadata[k] for k in ("num_blocks", "teacher_hidden_size", "student_hidden_size")} == {
        "num_blocks": "3", "teacher_hidden_size": str(D_L), "student_hidden_size": str(D_S)}

    torch.manual_seed(1)  # another fresh initialisation underneath: the file's weights must replace all of it
    loaded = load_recalibrator(path, spec, D_L).eval()
    assert len(loaded.rec_body) == 3
    batch = make_batch(D_S)
    with torch.no_grad():
        for got, want in zip(loaded(batch, False), trained(batch, False), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(load_recalibrator(path, spec, D_L, num_blocks=3).rec_body) == 3  # the run's count agrees


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_blocks=2), r"num_blocks=3, but 2 was asked for \(set the run's Recalibrator block count"),
        (dict(teacher_hidden_size=D_L + 8), rf"teacher_hidden_size={D_L}, but {D_L + 8} .*another teacher"),
        (dict(student_hidden_size=D_S * 2), rf"student_hidden_size={D_S}, but {2 * D_S} .*another student"),
    ],
)
def test_loading_into_another_student_teacher_or_block_count_is_refused(tmp_path, change, message):
    path = save_recalibrator(tmp_path / "r.safetensors", Recalibrator(make_spec("qwen2"), D_L, num_blocks=3))
    spec = make_spec("qwen2")
    if "student_hidden_size" in change:
        spec = RecalibratorSpec(Qwen2DecoderLayer, Qwen2Config(**{**TEXT_KWARGS, "hidden_size": 2 * D_S}),
                                Qwen2RotaryEmbedding, Qwen2RMSNorm)
    with pytest.raises(ValueError, match=message):
        load_recalibrator(path, spec, change.get("teacher_hidden_size", D_L), num_blocks=change.get("num_blocks"))


def test_a_file_without_metadata_loads_by_counting_its_blocks_and_says_so(tmp_path, caplog):
    spec = make_spec("llama")
    old = Recalibrator(spec, D_L, num_blocks=3)
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, path)  # as runs before the metadata did
    with caplog.at_level(logging.WARNING, logger="genrecal.recalibrator"):
        loaded = load_recalibrator(path, spec, D_L)
    assert len(loaded.rec_body) == 3
    torch.testing.assert_close(loaded.proj_post.weight, old.proj_post.weight, rtol=0, atol=0)
    assert "no Recalibrator metadata" in caplog.text and "num_blocks=3" in caplog.text
    # The teacher width is still checked, by the strict load: proj_pre's shape does not fit.
    with pytest.raises(RuntimeError, match="proj_pre.weight"):
        load_recalibrator(path, spec, D_L + 8)


def test_bad_files_and_states_are_refused_with_a_fix(tmp_path):
    spec = make_spec("qwen2")
    recalibrator = Recalibrator(spec, D_L)
    with pytest.raises(ValueError, match="no Recalibrator file at .*recalibrator.safetensors"):
        load_recalibrator(tmp_path / "missing.safetensors", spec, D_L)
    partial = dict(recalibrator.state_dict())
    del partial["proj_post.bias"]
    with pytest.raises(ValueError, match=r"exactly the Recalibrator's keys .*proj_post.bias"):
        save_recalibrator(tmp_path / "partial.safetensors", recalibrator, state_dict=partial)
    future = tmp_path / "future.safetensors"
    save_file({k: v.contiguous() for k, v in recalibrator.state_dict().items()}, future,
              metadata={"genrecal.recalibrator": "9"})
    with pytest.raises(ValueError, match="format '9'; this genrecal reads format '1'"):
        load_recalibrator(future, spec, D_L)
