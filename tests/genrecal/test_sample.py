"""Samples: conversation validation (an optional leading system turn), chat messages, images that are missing or
corrupt. Records on disk become samples in student_trainer.records (tests/student_trainer/test_records.py)."""

from __future__ import annotations

import io

import pytest

from genrecal.errors import SampleError
from genrecal.sample import Sample, Turn, load_image
from tests.conftest import random_image


def png_bytes(rng) -> bytes:
    buffer = io.BytesIO()
    random_image(rng, 16).save(buffer, format="PNG")
    return buffer.getvalue()


def test_messages_place_images_at_their_placeholders(rng):
    sample = Sample("r1", [Turn("user", "<image>\nWhat is here?"), Turn("assistant", "A cat."),
                           Turn("user", "Colour?"), Turn("assistant", "Grey.")], [random_image(rng)])
    assert sample.answers == ["A cat.", "Grey."]
    messages = sample.messages()
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is here?"}]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]


def test_images_without_placeholder_go_first(rng):
    sample = Sample("s", [Turn("user", "Describe."), Turn("assistant", "Ok.")], [random_image(rng), random_image(rng)])
    assert sample.messages()[0]["content"][:2] == [{"type": "image"}, {"type": "image"}]


def test_system_turn_becomes_a_system_message(rng):
    sample = Sample("s", [Turn("system", "You answer in one word."), Turn("user", "Describe."),
                          Turn("assistant", "Noise."), Turn("user", "Again?"), Turn("assistant", "Noise.")],
                    [random_image(rng)])
    messages = sample.messages()
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "You answer in one word."}]}
    # images without a placeholder go to the first *user* turn, not into the system message
    assert messages[1] == {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sample.answers == ["Noise.", "Noise."]  # the system turn is question, never an answer


def test_missing_image_names_sample_and_file(tmp_path):
    with pytest.raises(SampleError, match=r"'r7'.*nope\.png.*does not exist"):
        load_image(tmp_path / "nope.png", sample_id="r7")


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
        ([Turn("robot", "q"), Turn("assistant", "a")], 0, "role 'robot'"),
        ([Turn("system", "s"), Turn("assistant", "a")], 0, "turn 1 is 'assistant'.*expected 'user'"),
        ([Turn("user", "q"), Turn("system", "s"), Turn("assistant", "a")], 0, "a system turn may only come first"),
        ([Turn("system", "s"), Turn("system", "t"), Turn("user", "q"), Turn("assistant", "a")], 0,
         "may only come first"),
        ([Turn("system", "s")], 0, "a system turn but no user and assistant turns"),
        ([Turn("system", "<image>"), Turn("user", "q"), Turn("assistant", "a")], 1, "system turn contains '<image>'"),
        ([], 0, "no turns"),
    ],
)
def test_malformed_conversations_name_the_sample(turns, images, message, rng):
    with pytest.raises(SampleError, match=f"'bad'.*{message}"):
        Sample("bad", turns, [random_image(rng) for _ in range(images)])

