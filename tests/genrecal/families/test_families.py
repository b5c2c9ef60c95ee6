"""Every registered family, through its real processor and chat template, on a tiny checkpoint on disk."""

from __future__ import annotations

import json

import pytest
import torch

from genrecal.errors import SampleError, UnsupportedArchitectureError
from genrecal.families import (
    adapter_for_architecture,
    load_vlm,
    supported_architectures,
    supported_model_types,
)
from genrecal.sample import Sample, Turn
from tests.conftest import random_image

FAMILIES = supported_model_types()
# Each family is tested with one of the two offline tokenizers, so both are exercised through real templates.
TOKENIZER = {"qwen2_vl": "gpt2", "qwen2_5_vl": "llama2", "internvl": "gpt2", "llava_onevision": "llama2",
             "llava": "llama2", "idefics3": "gpt2"}
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "yes", "no", "large", "small", "left", "right"]


def random_text(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def random_samples(rng, n_images: int = 1) -> list[Sample]:
    answer = random_text(rng, int(rng.integers(1, 4))).capitalize() + "."
    single = Sample(
        "single",
        [Turn("user", "<image>\n" + random_text(rng, 5) + "?"), Turn("assistant", answer)],
        [random_image(rng) for _ in range(n_images)],
    )
    multi = Sample(  # with a system turn: every family's template renders it, and the spans still hold
        "multi",
        [Turn("system", "Answer with " + random_text(rng, 2) + "."),
         Turn("user", random_text(rng, 4) + "?"), Turn("assistant", random_text(rng, 2)),
         Turn("user", random_text(rng, 3) + "?"), Turn("assistant", random_text(rng, 1))],
        [random_image(rng)],
    )
    return [single, multi]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tiny_checkpoint):
    return load_vlm(tiny_checkpoint(request.param, tokenizer=TOKENIZER[request.param]))


def test_answer_spans_decode_to_answers_and_end_of_turn(vlm, rng):
    samples = random_samples(rng)
    batch = vlm.encode(samples)
    tokenizer = vlm.processor.tokenizer
    eot = vlm.adapter.end_of_turn_token(vlm.processor)
    for i, sample in enumerate(samples):
        spans = batch.answer_spans[i]
        assert len(spans) == len(sample.answers)
        assert all(t.text in batch.texts[i] for t in sample.turns if t.role == "system")  # rendered, as question
        for (start, end), answer in zip(spans, sample.answers, strict=True):
            decoded = tokenizer.decode(batch.input_ids[i, start:end])
            assert decoded.strip().endswith(eot), decoded
            assert decoded.strip()[: -len(eot)].strip() == answer
            # nothing of the question leaks in: the token before the span belongs to the prompt
            question = tokenizer.decode(batch.input_ids[i, :start])
            assert answer not in question[-len(answer) - 2:] or sample.sample_id == "multi"
        labels = batch.labels()[i]
        assert (labels != -100).sum() == sum(e - s for s, e in spans)


def test_question_tokens_never_in_answer_spans(vlm, rng):
    samples = random_samples(rng)
    batch = vlm.encode(samples)
    image_token_ids = set()
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(vlm.model.config, attr, None)
        if value is not None:
            image_token_ids.add(value)
    for i in range(len(samples)):
        answer_ids = set(batch.answer_token_ids(i).tolist())
        assert not answer_ids & image_token_ids
        # the prediction positions lie inside the real (unpadded) sequence
        assert batch.prediction_positions(i).max() < batch.inputs["attention_mask"][i].sum()


def test_body_hidden_states_through_head_reproduce_logits(vlm, rng):
    batch = vlm.encode(random_samples(rng))
    with torch.no_grad():
        hidden = vlm.body_hidden_states(batch)
        logits = vlm.model(**batch.inputs).logits
    assert hidden.shape[:2] == batch.input_ids.shape
    assert hidden.shape[-1] == vlm.model.config.get_text_config().hidden_size
    torch.testing.assert_close(vlm.head(hidden), logits, rtol=1e-5, atol=1e-5)


def test_parameter_groups_cover_every_parameter_once(vlm):
    groups = vlm.adapter.parameter_groups(vlm.model)
    assert all(groups[name] for name in ("vision_encoder", "projector", "body", "head")), {k: len(v) for k, v in groups.items()}
    grouped = {id(p) for params in groups.values() for p in params}
    assert grouped == {id(p) for p in vlm.model.parameters()}
    assert any(p is vlm.head.weight for p in groups["head"])


def test_recalibrator_spec_is_the_students_own_layer(vlm):
    spec = vlm.adapter.recalibrator_spec(vlm.model)
    text_model = vlm.adapter.text_model(vlm.model)
    assert isinstance(text_model.layers[0], spec.decoder_layer_cls)
    assert spec.text_config.hidden_size == vlm.model.config.get_text_config().hidden_size


def test_truncated_answer_names_the_sample(vlm, rng):
    samples = random_samples(rng)
    full = vlm.encode(samples[:1]).inputs["attention_mask"].sum().item()
    with pytest.raises(SampleError, match="'single'.*max_length"):
        vlm.encode(samples[:1], max_length=full - 1)


def test_empty_answer_names_the_sample():
    with pytest.raises(SampleError, match="'empty'.*empty"):
        Sample("empty", [Turn("user", "hi"), Turn("assistant", "  ")])


def test_unsupported_architecture_lists_supported(tmp_path, tiny_checkpoint):
    with pytest.raises(UnsupportedArchitectureError, match="Qwen2VLForConditionalGeneration"):
        adapter_for_architecture(["BertModel"])
    path = tiny_checkpoint("qwen2_vl")
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["MadeUpVLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_vlm(bad)
    for arch in supported_architectures():
        assert arch in str(info.value)
