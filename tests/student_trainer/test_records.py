"""Records as users have them, each through the real loaders (``LazySamples`` and ``load_dataset_samples``):
LLaVA / ShareGPT with system turns, OpenAI / HF messages (an ``images`` list with placeholders, inline parts),
text-only records, several images per turn, datasets on disk and by Hub id (offline, from the cache), all mixed in
one file; and a source in no known format refused when it is opened."""

from __future__ import annotations

import base64
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from genrecal.errors import SampleError
from genrecal.families import load_vlm
from genrecal.sample import Turn, source_bytes
from student_trainer.data import load_dataset_samples
from student_trainer.dataset import BadRecord, LazySamples
from student_trainer.records import record_to_sample
from tests.conftest import random_image

SYSTEM = "You answer in one word."


@pytest.fixture
def pictures(tmp_path, rng):
    """Three pictures on disk (two PNGs, one JPEG) and their pixels."""
    folder = tmp_path / "images"
    folder.mkdir()
    random_image(rng, size=16).save(folder / "a.png")
    random_image(rng, size=24).save(folder / "b.png")
    random_image(rng, size=32).save(folder / "c.jpg", quality=85)
    return {name: np.asarray(Image.open(folder / name).convert("RGB")) for name in ("a.png", "b.png", "c.jpg")}


def pixels(sample) -> list[np.ndarray]:
    return [np.asarray(image) for image in sample.images]


def load_both(path, **options) -> list:
    """The samples of ``path`` through the lazy data set and the eager loader, checked to agree."""
    lazy = LazySamples(path, **options)
    from_lazy = [lazy[i] for i in range(len(lazy))]
    assert not [item for item in from_lazy if isinstance(item, BadRecord)], from_lazy
    eager, report = load_dataset_samples(path, **options)
    assert report.count == 0
    assert [(s.sample_id, s.turns) for s in eager] == [(s.sample_id, s.turns) for s in from_lazy]
    for a, b in zip(eager, from_lazy, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b), strict=True))
    return from_lazy


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_llava_record_multi_turn(tmp_path, pictures):
    records = [{"id": "r1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    [sample] = load_both(tmp_path / "data.json", image_folder=tmp_path / "images")
    assert sample.sample_id == "r1" and sample.answers == ["A cat.", "Grey."]
    np.testing.assert_array_equal(pixels(sample)[0], pictures["a.png"])
    assert sample.messages()[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is here?"}]
    with pytest.raises(SampleError, match=r"'x'.*'from'='robot'"):
        record_to_sample({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}, 0, tmp_path)
    with pytest.raises(SampleError, match=r"'r7'.*nope\.png.*does not exist"):
        record_to_sample({**records[0], "id": "r7", "image": "nope.png"}, 0, tmp_path)


def test_sharegpt_system_turn_reaches_the_chat_template(tmp_path, pictures, tiny_checkpoint):
    records = [
        {"id": "in-turns", "image": "a.png", "conversations": [
            {"from": "system", "value": SYSTEM}, {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "Red."}]},
        {"id": "top-level", "system": SYSTEM, "conversations": [  # LLaMA-Factory's ShareGPT: a "system" key
            {"from": "human", "value": "Is grass green?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "empty-system", "conversations": [
            {"from": "system", "value": ""}, {"from": "human", "value": "Is snow black?"},
            {"from": "gpt", "value": "No."}]},
    ]
    write_jsonl(tmp_path / "data.jsonl", records)
    with_image, top_level, without = load_both(tmp_path / "data.jsonl", image_folder=tmp_path / "images")
    assert with_image.turns[0] == Turn("system", SYSTEM) and top_level.turns[0] == Turn("system", SYSTEM)
    assert [t.role for t in without.turns] == ["user", "assistant"]  # an empty system prompt is dropped
    assert with_image.messages()[:2] == [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
    ]

    # Through a real family's processor and chat template: the system message replaces Qwen2-VL's default one,
    # and the answer spans still decode to the answers.
    vlm = load_vlm(tiny_checkpoint("qwen2_vl", tokenizer="gpt2"))
    batch = vlm.encode([with_image, top_level])
    for i, sample in enumerate((with_image, top_level)):
        assert batch.texts[i].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
        assert "You are a helpful assistant." not in batch.texts[i]
        [(start, end)] = batch.answer_spans[i]
        decoded = vlm.processor.tokenizer.decode(batch.input_ids[i, start:end])
        assert decoded == sample.answers[0] + "<|im_end|>"
        assert SYSTEM in vlm.processor.tokenizer.decode(batch.input_ids[i, :start])  # the system text is question


def test_openai_messages_with_an_images_list(tmp_path, pictures):
    """TRL's layout: ``{"type": "image"}`` placeholders take the ``images`` beside ``messages`` in order; several
    images in one turn; a string system message; a text-only record."""
    records = [
        {"id": "two-turns", "images": ["a.png", "b.png", "c.jpg"], "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
            {"role": "user", "content": [{"type": "text", "text": "And this one"}, {"type": "image"},
                                         {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "Neither."}]},
        {"id": "indexed", "images": ["a.png", "b.png"], "messages": [  # Hub sets number their placeholders
            {"role": "user", "content": [{"type": "image", "index": 1}, {"type": "image", "index": 0},
                                         {"type": "text", "text": "Order?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "b then a"}]}]},
        {"id": "string-content", "images": ["c.jpg"], "messages": [
            {"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "Noise."}]},
        {"id": "text-only", "messages": [
            {"role": "developer", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]},
    ]
    write_jsonl(tmp_path / "data.jsonl", records)
    two_turns, indexed, string_content, text_only = load_both(tmp_path / "data.jsonl",
                                                              image_folder=tmp_path / "images")
    assert [t.role for t in two_turns.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert two_turns.answers == ["No.", "Neither."]
    for got, name in zip(pixels(two_turns), ("a.png", "b.png", "c.jpg"), strict=True):
        np.testing.assert_array_equal(got, pictures[name])
    messages = two_turns.messages()
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": SYSTEM}]}
    assert messages[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]
    assert messages[3]["content"] == [{"type": "text", "text": "And this one"}, {"type": "image"},
                                      {"type": "text", "text": "?"}]
    for got, name in zip(pixels(indexed), ("b.png", "a.png"), strict=True):
        np.testing.assert_array_equal(got, pictures[name])
    assert string_content.messages()[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert source_bytes(string_content.images[0]) == (tmp_path / "images" / "c.jpg").read_bytes()  # JPEG kept
    assert text_only.images == [] and text_only.turns[0] == Turn("system", "Be terse.")

    too_few = {"id": "short", "images": ["a.png"], "messages": records[0]["messages"]}
    with pytest.raises(SampleError, match="'short'.*refers to image 1, but the record lists 1"):
        record_to_sample(too_few, 0, tmp_path / "images")
    unused = {"id": "unused", "images": ["a.png", "b.png", "c.jpg", "a.png"], "messages": records[0]["messages"]}
    with pytest.raises(SampleError, match=r"'unused'.*lists 4 images.*place only 3.*\[3\]"):
        record_to_sample(unused, 0, tmp_path / "images")


def test_openai_messages_with_inline_images(tmp_path, pictures):
    """Inline parts: a relative name, an absolute path, a file:// URL, a data: URL, OpenAI's image_url; an http URL
    cannot be fetched offline."""
    folder = tmp_path / "images"
    jpeg = (folder / "c.jpg").read_bytes()
    data_url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    question = [{"type": "image", "image": "a.png"}, {"type": "image", "path": str(folder / "b.png")},
                {"type": "text", "text": "Compare"}, {"type": "image", "url": (folder / "c.jpg").as_uri()},
                {"type": "image_url", "image_url": {"url": data_url}}]
    records = [{"id": "inline", "messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]},
               {"id": "web", "messages": [
                   {"role": "user", "content": [{"type": "image", "url": "https://example.com/cat.png"},
                                                {"type": "text", "text": "What?"}]},
                   {"role": "assistant", "content": "cat"}]}]
    write_jsonl(tmp_path / "data.jsonl", records)
    lazy = LazySamples(tmp_path / "data.jsonl", image_folder=folder)
    sample = lazy[0]
    for got, name in zip(pixels(sample), ("a.png", "b.png", "c.jpg", "c.jpg"), strict=True):
        np.testing.assert_array_equal(got, pictures[name])
    assert source_bytes(sample.images[3]) == jpeg  # sent to the teacher as the JPEG it was
    assert [c["type"] for c in sample.messages()[0]["content"]] == ["image", "image", "text", "image", "image"]
    web = lazy[1]
    assert isinstance(web, BadRecord) and web.sample_id == "web"
    assert "https URL, which this loader cannot fetch" in web.reason and "download the images" in web.reason


def test_hub_style_dataset_on_disk(tmp_path, rng):
    """A set stored as HuggingFaceH4/llava-instruct-mix-vsft stores it: ``messages`` whose content parts are Arrow
    structs (every key present, unused ones null) and an ``images`` column of ``datasets.Image`` features; as a
    ``save_to_disk`` folder and as parquet; a text-only row among them."""
    photos = [random_image(rng, size=20), random_image(rng, size=12)]
    part = {"type": datasets.Value("string"), "text": datasets.Value("string"), "index": datasets.Value("int64")}
    features = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)}),
        "images": datasets.List(datasets.Image()),
    })
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "text": None, "index": 0},
                                                   {"type": "image", "text": None, "index": 1},
                                                   {"type": "text", "text": "Which is bigger?", "index": None}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "The first.", "index": None}]}],
         "images": photos},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of France?", "index": None}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Paris.", "index": None}]}],
         "images": []},
    ]
    dataset = datasets.Dataset.from_list(rows, features=features)
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    for source in (tmp_path / "saved", tmp_path / "data.parquet"):
        pictured, text_only = load_both(source)
        assert [s.sample_id for s in (pictured, text_only)] == ["0", "1"]  # no id column: the row index
        assert [image.size for image in pictured.images] == [(20, 20), (12, 12)]
        np.testing.assert_array_equal(pixels(pictured)[0], np.asarray(photos[0]))
        assert pictured.messages()[0]["content"] == [{"type": "image"}, {"type": "image"},
                                                      {"type": "text", "text": "Which is bigger?"}]
        assert text_only.images == [] and text_only.answers == ["Paris."]


def test_every_format_mixed_in_one_file(tmp_path, pictures):
    folder = tmp_path / "images"
    records = [
        {"id": "llava", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]},
        {"id": "sharegpt", "conversations": [
            {"from": "system", "value": SYSTEM}, {"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
        {"id": "trl", "images": ["b.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]},
        {"id": "inline", "messages": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": (folder / "c.jpg").as_uri()}},
                                         {"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": "A"}]},
        {"id": "text", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]},
        {"id": "neither", "question": "Q?", "answer": "A"},  # in no known shape: one bad record, not a refusal
    ]
    write_jsonl(tmp_path / "data.jsonl", records)
    lazy = LazySamples(tmp_path / "data.jsonl", image_folder=folder)
    items = [lazy[i] for i in range(len(lazy))]
    assert [s.sample_id for s in items[:5]] == ["llava", "sharegpt", "trl", "inline", "text"]
    assert not any(isinstance(s, BadRecord) for s in items[:5])
    assert [len(s.images) for s in items[:5]] == [1, 0, 1, 1, 0]
    assert [s.turns[0].role for s in items[:5]] == ["user", "system", "user", "system", "user"]
    assert isinstance(items[5], BadRecord) and "neither a 'conversations' list" in items[5].reason
    assert "'answer', 'id', 'question'" in items[5].reason
    samples, report = load_dataset_samples(tmp_path / "data.jsonl", image_folder=folder)
    assert len(samples) == 5 and (report.count, report.total) == (1, 6)
