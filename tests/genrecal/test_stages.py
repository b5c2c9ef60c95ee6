"""The stage table, stage parsing, and which parameters each stage trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from genrecal.losses import answer_path_loss, student_sft_loss
from genrecal.recalibrator import Recalibrator, RecalibratorInput, RecalibratorSpec
from genrecal.stages import STAGES, STUDENT_GROUPS, Stage, StageSpec, parse_stages, set_trainable
from tests.conftest import tiny_qwen2_config

D_S, D_L, VOCAB = 16, 24, 40


def test_the_stage_table_is_read_only_and_checks_its_rules():
    with pytest.raises(TypeError):
        STAGES[Stage.SFT] = STAGES[Stage.ALIGNMENT]
    with pytest.raises(ValueError, match="needs_teacher must be True exactly when the stage computes L1 or L2"):
        StageSpec(losses=frozenset({"L3"}), trainable=frozenset({"body"}), needs_teacher=True)
    with pytest.raises(ValueError, match=r"unknown losses \['L4'\] or groups \['decoder'\]"):
        StageSpec(losses=frozenset({"L4"}), trainable=frozenset({"decoder"}), needs_teacher=False)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,2,3", [Stage.ALIGNMENT, Stage.DISTILLATION, Stage.SFT]),
        (" 2 , 3 ", [Stage.DISTILLATION, Stage.SFT]),
        ("alignment,SFT", [Stage.ALIGNMENT, Stage.SFT]),
        ("3", [Stage.SFT]),
    ],
)
def test_parse_stages(text, expected):
    assert parse_stages(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "comma-separated"),
        ("1,,2", "comma-separated"),
        ("4", "unknown stage '4'"),
        ("x", "1=alignment"),
        ("3,1", "increasing"),
        ("1,1", "distinct"),
    ],
)
def test_parse_stages_rejects_bad_lists(text, message):
    with pytest.raises(ValueError, match=message):
        parse_stages(text)


class ToyStudent(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.vision_encoder = nn.Linear(4, 4)
        self.projector = nn.Linear(4, 4)
        self.embed = nn.Embedding(VOCAB, 4)
        self.layer = nn.Linear(4, 4)
        self.head = nn.Linear(4, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "vision_encoder": list(self.vision_encoder.parameters()),
            "projector": list(self.projector.parameters()),
            "body": [*self.embed.parameters(), *self.layer.parameters()],
            "head": list(self.head.parameters()),
        }


# What each stage trains (docs/method.md, "Stages"), as the toy student's modules: stage 1 the Recalibrator only,
# stage 2 the Recalibrator and the body (embed + layer), stage 3 projector, body and head; never the vision encoder.
# With tied embeddings the head's weight IS embed's: stage 2 (body trains, head frozen) trains it under "train" and
# keeps it frozen under "freeze"; stage 3 trains both groups, so it trains under either policy.
TRAINED_MODULES = {
    (Stage.ALIGNMENT, False, "train"): {"recalibrator"},
    (Stage.ALIGNMENT, False, "freeze"): {"recalibrator"},
    (Stage.DISTILLATION, False, "train"): {"recalibrator", "embed", "layer"},
    (Stage.DISTILLATION, False, "freeze"): {"recalibrator", "embed", "layer"},
    (Stage.SFT, False, "train"): {"projector", "embed", "layer", "head"},
    (Stage.SFT, False, "freeze"): {"projector", "embed", "layer", "head"},
    (Stage.ALIGNMENT, True, "train"): {"recalibrator"},
    (Stage.ALIGNMENT, True, "freeze"): {"recalibrator"},
    (Stage.DISTILLATION, True, "train"): {"recalibrator", "embed", "layer"},
    (Stage.DISTILLATION, True, "freeze"): {"recalibrator", "layer"},
    (Stage.SFT, True, "train"): {"projector", "embed", "layer"},  # head.weight is embed.weight
    (Stage.SFT, True, "freeze"): {"projector", "embed", "layer"},
}


@pytest.mark.parametrize(("stage", "tied", "policy"), list(TRAINED_MODULES))
def test_a_stage_trains_exactly_its_modules(stage, tied, policy):
    """One optimizer step on a loss that reaches every parameter: only the stage's modules get gradients and move."""
    torch.manual_seed(0)
    student, recalibrator = ToyStudent(tied), nn.Linear(4, 4)
    modules = {**dict(student.named_children()), "recalibrator": recalibrator}
    if tied:
        del modules["head"]  # its one parameter is embed's weight
    before = {name: [p.detach().clone() for p in module.parameters()] for name, module in modules.items()}
    trainable = set_trainable(stage, student.groups(), recalibrator, tied=policy)
    assert len(trainable) == len({id(p) for p in trainable})  # each parameter once, as an optimizer needs

    image, tokens = torch.randn(3, 4), torch.randint(0, VOCAB, (3,))
    hidden = student.layer(student.projector(student.vision_encoder(image)) + student.embed(tokens))  # (3, 4)
    loss = student.head(hidden).logsumexp(-1).sum() + recalibrator(hidden).square().sum()
    loss.backward()
    torch.optim.SGD(trainable, lr=0.1).step()

    with_gradient = {name for name, module in modules.items() if any(p.grad is not None for p in module.parameters())}
    moved = {name for name, module in modules.items()
             if any(not torch.equal(p, old) for p, old in zip(module.parameters(), before[name], strict=True))}
    expected = TRAINED_MODULES[stage, tied, policy]
    assert with_gradient == expected and moved == expected
    assert {id(p) for p in trainable} == {id(p) for m in expected for p in modules[m].parameters()}


def test_tied_embeddings_in_stage2():
    """Stage 2 trains the body, not the head: with tied weights, "freeze" keeps the shared matrix frozen."""
    student = ToyStudent(tied=True)
    set_trainable(Stage.DISTILLATION, student.groups(), nn.Linear(3, 3), tied="freeze")
    assert not student.embed.weight.requires_grad and all(p.requires_grad for p in student.layer.parameters())
    set_trainable(Stage.DISTILLATION, student.groups(), nn.Linear(3, 3), tied="train")
    assert student.embed.weight.requires_grad
    with pytest.raises(ValueError, match="tied must be one of"):
        set_trainable(Stage.DISTILLATION, student.groups(), nn.Linear(3, 3), tied="sometimes")


def test_set_trainable_rejects_missing_pieces():
    student = ToyStudent(tied=False)
    groups = student.groups()
    del groups["head"]
    with pytest.raises(ValueError, match="head"):
        set_trainable(Stage.SFT, groups, None)
    with pytest.raises(ValueError, match="Recalibrator"):
        set_trainable(Stage.DISTILLATION, student.groups(), None)
    assert set(STUDENT_GROUPS) == set(student.groups())


def run_step(student: Qwen2ForCausalLM, recalibrator: Recalibrator, with_l3: bool) -> None:
    """One L1 step (plus L3 when asked) from a real student body's question features."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (1, 7), generator=generator)
    hidden_states = student.model(input_ids=input_ids).last_hidden_state  # (1, 7, D_s)
    question_features = hidden_states[0, :5]  # z_qs
    answer_features = torch.randn(3, D_L, generator=generator)  # z_al
    (outputs,) = recalibrator([RecalibratorInput([question_features], [answer_features])], False)
    head_weight = torch.randn(VOCAB, D_L, generator=generator)
    loss, _ = answer_path_loss(
        head_weight, outputs, torch.tensor([4, 5, 6]), torch.randn(3, D_L, generator=generator)
    )
    if with_l3:
        labels = input_ids.clone()
        labels[:, :5] = -100
        loss = loss + student_sft_loss(hidden_states, student.lm_head, labels)[0]
    loss.backward()


def tiny_student_and_recalibrator() -> tuple[Qwen2ForCausalLM, Recalibrator]:
    torch.manual_seed(0)
    config = tiny_qwen2_config(D_S, VOCAB, tie_word_embeddings=False)
    student = Qwen2ForCausalLM(config)
    spec = RecalibratorSpec(Qwen2DecoderLayer, config, Qwen2RotaryEmbedding, Qwen2RMSNorm)
    return student, Recalibrator(spec, D_L)


def student_groups(student: Qwen2ForCausalLM) -> dict[str, list[nn.Parameter]]:
    return {
        "vision_encoder": [],
        "projector": [],
        "body": list(student.model.parameters()),
        "head": list(student.lm_head.parameters()),
    }


def test_a_stage_1_step_leaves_the_student_without_gradients():
    student, recalibrator = tiny_student_and_recalibrator()
    trainable = set_trainable(Stage.ALIGNMENT, student_groups(student), recalibrator)
    assert {id(p) for p in trainable} == {id(p) for p in recalibrator.parameters()}
    run_step(student, recalibrator, with_l3=False)
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is not None for p in recalibrator.parameters())


def test_a_stage_2_step_trains_the_body_through_l1_and_l3_but_not_the_head():
    student, recalibrator = tiny_student_and_recalibrator()
    set_trainable(Stage.DISTILLATION, student_groups(student), recalibrator)
    run_step(student, recalibrator, with_l3=True)
    assert student.lm_head.weight.grad is None
    assert all(p.grad is not None for p in student.model.layers.parameters())
    assert all(p.grad is not None for p in recalibrator.parameters())


@pytest.mark.parametrize("stage", [Stage.ALIGNMENT, Stage.SFT])
def test_frozen_parts_run_in_eval_mode(tiny_checkpoint, stage):
    from genrecal.families import load_vlm
    from genrecal.stages import frozen_modules_to_eval

    vlm = load_vlm(tiny_checkpoint("internvl", tokenizer="llama2"))
    vlm.model.train()
    set_trainable(stage, vlm.adapter.parameter_groups(vlm.model), None if stage == Stage.SFT else nn.Linear(2, 2))
    assert frozen_modules_to_eval(vlm.model) > 0
    vision = vlm.model.get_submodule(vlm.adapter.vision_encoder_prefixes[0].rstrip("."))
    assert not any(m.training for m in vision.modules())  # the vision encoder never trains
    body = vlm.adapter.text_model(vlm.model)
    assert body.training == (stage == Stage.SFT)  # stage 1 freezes the whole student
