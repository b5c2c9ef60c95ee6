"""Samples: conversation validation, LLaVA-style records, images that are missing or corrupt."""

from __future__ import annotations

import io

import pytest

from genrecal.errors import SampleError
from genrecal.sample import Sample, Turn, load_image, sample_from_llava
from tests.conftest import random_image


def png_bytes(rng) -> bytes:
    buffer = io.BytesIO()
    random_image(rng, 16).save(buffer, format="PNG")
    return buffer.getvalue()


def test_llava_record_round_trip(tmp_path, rng):
    image = random_image(rng, 20)
    image.save(tmp_path / "a.png")
    record = {"id": "r1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]}
    sample = sample_from_llava(record, tmp_path)
    assert sample.sample_id == "r1" and sample.answers == ["A cat.", "Grey."]
    assert list(sample.images[0].getdata()) == list(image.getdata())
    messages = sample.messages()
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is here?"}]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]


def test_images_without_placeholder_go_first(rng):
    sample = Sample("s", [Turn("user", "Describe."), Turn("assistant", "Ok.")], [random_image(rng), random_image(rng)])
    assert sample.messages()[0]["content"][:2] == [{"type": "image"}, {"type": "image"}]


def test_missing_image_names_sample_and_file(tmp_path):
    record = {"id": "r7", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
    with pytest.raises(SampleError, match=r"'r7'.*nope\.png.*does not exist"):
        sample_from_llava(record, tmp_path)


def test_corrupt_image_names_sample(tmp_path, rng):
    data = png_bytes(rng)
    (tmp_path / "bad.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(SampleError, match=r"'r8'.*bad\.png.*cannot be decoded"):
        load_image(tmp_path / "bad.png", sample_id="r8")
    with pytest.raises(SampleError, match=r"'r9'.*image bytes cannot be decoded"):
        load_image(b"not an image at all", sample_id="r9")
    assert load_image(data, sample_id="ok").size == (16, 16)


@pytest.mark.parametrize(
    ("turns", "images", "message"),
    [
        ([Turn("user", "q")], 0, "must end with an assistant turn"),
        ([Turn("assistant", "a")], 0, "must alternate"),
        ([Turn("user", "q"), Turn("assistant", "")], 0, "empty"),
        ([Turn("user", "<image> <image>"), Turn("assistant", "a")], 1, "2 '<image>' placeholders but 1 images"),
        ([Turn("system", "q"), Turn("assistant", "a")], 0, "role 'system'"),
        ([], 0, "no turns"),
    ],
)
def test_malformed_conversations_name_the_sample(turns, images, message, rng):
    with pytest.raises(SampleError, match=f"'bad'.*{message}"):
        Sample("bad", turns, [random_image(rng) for _ in range(images)])


def test_llava_record_with_unknown_speaker():
    with pytest.raises(SampleError, match="'x'.*'from'='robot'"):
        sample_from_llava({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]})
