"""Each batch formatted with ONE processor call: answer spans and token ids equal the old per-boundary algorithm's.

The old algorithm (kept below as the oracle, verbatim from genrecal/families/base.py before the change) ran the
processor, images included, for the full text of every sample and again for the prefix at every answer boundary.
The processor is counted by a subclass of its own class whose ``__call__`` counts and calls through
(instrumentation of the real processor, not a mock).
"""

from __future__ import annotations

import pytest
import torch

from genrecal.errors import SampleError
from genrecal.families import base, load_vlm
from genrecal.families.base import FamilyAdapter, _render
from genrecal.sample import Sample, Turn
from tests.conftest import random_image

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "internvl", "llava_onevision", "llava", "idefics3"]
TOKENIZER = {"qwen2_vl": "gpt2", "qwen2_5_vl": "llama2", "internvl": "gpt2", "llava_onevision": "llama2",
             "llava": "llama2", "idefics3": "gpt2"}


# ---- the oracle: the old algorithm, one processor call per sample and per answer boundary --------------------
def old_render_and_locate_answers(adapter: FamilyAdapter, processor, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
    """The text and each answer's token span, located as before: one processor call for the whole text and one
    per answer boundary. (The rendering and the character boundaries are unchanged: ``_render``.)"""
    rendered = _render(adapter, processor, sample)
    full, boundaries, image_counts = rendered.text, rendered.boundaries, rendered.image_counts
    full_ids = old_token_ids(processor, full, sample.images)
    spans = []
    for (start_char, end_char), n_images in zip(boundaries, image_counts, strict=True):
        start = old_prefix_length(processor, full, full_ids, start_char, sample.images[:n_images], sample.sample_id)
        end = old_prefix_length(processor, full, full_ids, end_char, sample.images[:n_images], sample.sample_id)
        if end <= start:
            raise SampleError(sample.sample_id, "an answer tokenises to no tokens")
        if start == 0:
            raise SampleError(sample.sample_id, "an answer starts at position 0: nothing predicts its first token")
        spans.append((start, end))
    return full, spans


def old_token_ids(processor, text: str, images: list) -> list[int]:
    kwargs = dict(text=[text], return_tensors="pt")
    if images:
        kwargs["images"] = [list(images)]
    return processor(**kwargs)["input_ids"][0].tolist()


def old_prefix_length(processor, full: str, full_ids: list[int], char_end: int, images: list, sample_id: str) -> int:
    """Number of tokens of ``full[:char_end]``; it must tokenise to a prefix of ``full_ids``."""
    if char_end == len(full):
        return len(full_ids)
    ids = old_token_ids(processor, full[:char_end], images)
    if full_ids[: len(ids)] != ids:
        raise SampleError(
            sample_id,
            "an answer boundary does not fall on a token boundary of the formatted conversation "
            f"(prefix of {len(ids)} tokens differs from the full sequence)",
        )
    return len(ids)


# ---- instrumentation ------------------------------------------------------------------------------------------
def count_processor_calls(processor) -> list:
    """Make ``processor`` record each ``__call__`` (the number of texts it was given); returns the record."""
    calls: list[int] = []
    original = type(processor)

    def counting_call(self, *args, **kwargs):
        text = kwargs.get("text", args[1] if len(args) > 1 else None)
        calls.append(len(text) if isinstance(text, list) else 1)
        return original.__call__(self, *args, **kwargs)

    processor.__class__ = type(f"Counting{original.__name__}", (original,), {"__call__": counting_call})
    return calls


def samples_for(rng) -> list[Sample]:
    """One image; several images in one turn and across turns; multi-turn; text only; a system turn."""
    image = lambda size=64: random_image(rng, size)  # noqa: E731
    return [
        Sample("one-image", [Turn("user", "<image>\nWhat colour is the square?"), Turn("assistant", "Red.")],
               [image()]),
        Sample("two-images-one-turn", [Turn("user", "<image><image>\nWhich is larger?"),
                                       Turn("assistant", "The left one, by far.")], [image(), image(48)]),
        Sample("images-across-turns", [Turn("user", "<image>\nWhat is this?"), Turn("assistant", "A circle."),
                                       Turn("user", "And this one? <image>"), Turn("assistant", "A small square.")],
               [image(56), image()]),
        Sample("multi-turn-system", [Turn("system", "Answer in one word."), Turn("user", "Shape?"),
                                     Turn("assistant", "Triangle"), Turn("user", "Colour?"),
                                     Turn("assistant", "Green"), Turn("user", "Size?"), Turn("assistant", "Large")],
               [image()]),
        Sample("text-only", [Turn("user", "Is red a colour?"), Turn("assistant", "Yes, red is a colour.")]),
        Sample("text-only-system", [Turn("system", "Be brief."), Turn("user", "Two plus two?"),
                                    Turn("assistant", "Four.")]),
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tiny_checkpoint):
    return load_vlm(tiny_checkpoint(request.param, tokenizer=TOKENIZER[request.param]))


# LLaVA-OneVision expands an image differently when its sample holds several (no anyres tiling then). The old
# algorithm processed the prefix before the first answer with the first image only, got the single-image
# expansion, and refused the sample although its boundaries are sound; the expanded text of the one call has
# the expansion the model is really given.
OLD_REFUSED_WRONGLY = {("llava_onevision", "images-across-turns")}


def test_one_processor_call_per_batch_and_the_old_spans_and_ids(vlm, rng):
    """Every family, every kind of sample: the batch's answer spans and each sample's input ids equal the old
    algorithm's, and formatting the whole batch calls the processor once."""
    samples = samples_for(rng)
    family = vlm.adapter.model_type
    calls = count_processor_calls(vlm.processor)
    batch = vlm.encode(samples)
    assert calls == [len(samples)]  # one call, with every sample's text
    lengths = batch.inputs["attention_mask"].sum(dim=1).tolist()
    tokenizer, eot = vlm.processor.tokenizer, vlm.adapter.end_of_turn_token(vlm.processor)
    for i, sample in enumerate(samples):
        if (family, sample.sample_id) in OLD_REFUSED_WRONGLY:
            with pytest.raises(SampleError, match="does not fall on a token boundary"):
                old_render_and_locate_answers(vlm.adapter, vlm.processor, sample)
            for (start, end), answer in zip(batch.answer_spans[i], sample.answers, strict=True):
                assert tokenizer.decode(batch.input_ids[i, start:end]).strip() == answer + eot
            continue
        text, spans = old_render_and_locate_answers(vlm.adapter, vlm.processor, sample)
        assert batch.texts[i] == text
        assert batch.answer_spans[i] == spans, sample.sample_id
        ids = old_token_ids(vlm.processor, text, sample.images)
        assert batch.input_ids[i, : lengths[i]].tolist() == ids, sample.sample_id
    assert base.REPLACEMENT_OFFSETS not in batch.inputs  # bookkeeping, not a model input
    calls.clear()
    single = vlm.encode(samples[:1])  # a batch of one: still one call
    assert calls == [1] and single.answer_spans[0] == batch.answer_spans[0]


def test_a_text_only_sample_first_in_a_batch_with_images(vlm, rng):
    """A batch led by a text-only sample (its empty offsets list trips the InternVL and Idefics3 processors' own
    tensor conversion, so the batch is converted outside them): the same spans and the same model inputs as the
    processor's own tensors, still one call."""
    samples = [samples_for(rng)[4], samples_for(rng)[1], samples_for(rng)[5]]
    calls = count_processor_calls(vlm.processor)
    batch = vlm.encode(samples)
    assert calls == [3]
    for i, sample in enumerate(samples):
        assert batch.answer_spans[i] == old_render_and_locate_answers(vlm.adapter, vlm.processor, sample)[1]
    texts, images = batch.texts, [list(s.images) for s in samples]
    want = vlm.processor(text=texts, images=images, return_tensors="pt", padding=True, **vlm.adapter.processor_kwargs)
    assert set(batch.inputs) == set(want)
    for key, value in want.items():
        assert batch.inputs[key].dtype == value.dtype and torch.equal(batch.inputs[key], value), key


def test_llava_template_gets_its_end_of_turn_inserted_and_spans_still_match(tiny_checkpoint, rng):
    """LLaVA-1.5's template leaves the end of turn to the tokenizer's eos: inserted after each answer."""
    vlm = load_vlm(tiny_checkpoint("llava", tokenizer="llama2"))
    samples = samples_for(rng)[2:4]
    batch = vlm.encode(samples)
    eos = vlm.processor.tokenizer.eos_token
    for i, sample in enumerate(samples):
        text, spans = old_render_and_locate_answers(vlm.adapter, vlm.processor, sample)
        assert batch.texts[i] == text and text.count(eos) == len(sample.answers)
        assert batch.answer_spans[i] == spans
        assert all(batch.input_ids[i, end - 1] == vlm.processor.tokenizer.eos_token_id for _, end in spans)


def test_without_replacement_offsets_each_boundary_is_processed_as_before(tiny_checkpoint, rng, monkeypatch):
    """A transformers that does not report its image expansions: the old per-boundary processor calls, same
    spans."""
    vlm = load_vlm(tiny_checkpoint("qwen2_vl", tokenizer="gpt2"))
    samples = samples_for(rng)[:3]
    fast = vlm.encode(samples)
    monkeypatch.setattr(base, "_reports_replacements", lambda: False)
    calls = count_processor_calls(vlm.processor)
    slow = vlm.encode(samples)
    assert slow.answer_spans == fast.answer_spans
    assert len(calls) > 1  # the batch, then a prefix call per boundary that is not the text's end


def test_a_boundary_inside_a_token_is_still_refused(tiny_checkpoint):
    """A template whose generation prompt ends mid-word ("...\\nbl" + "ue"): the prefix does not tokenise to a
    prefix of the full sequence, so the sample is refused, by the old and the new algorithm alike."""
    vlm = load_vlm(tiny_checkpoint("qwen2_vl", tokenizer="gpt2"))
    vlm.processor.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}bl{% endif %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\nbl{% endif %}"
    )
    sample = Sample("mid-word", [Turn("user", "Colour?"), Turn("assistant", "ue")])
    with pytest.raises(SampleError, match="does not fall on a token boundary"):
        old_render_and_locate_answers(vlm.adapter, vlm.processor, sample)
    with pytest.raises(SampleError, match="mid-word.*does not fall on a token boundary"):
        vlm.encode([sample])


def test_expanded_positions_skip_each_placeholder_growth():
    expanded = base._expanded_text("ab<i>cd<i>e", [{"span": (2, 5), "replacement": "XXXXXX"},
                                                   {"span": (7, 10), "replacement": "Y"}])
    assert expanded.text == "abXXXXXXcdYe"
    assert [expanded.position(c) for c in (0, 2, 5, 7, 10, 11)] == [0, 2, 8, 10, 11, 12]
    assert base._expanded_text("plain", []).text == "plain"

