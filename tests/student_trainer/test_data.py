"""Loading data eagerly from JSON, JSONL and Hugging Face datasets; skipping bad records; rank sharding. (Every
record format through the loaders: test_records.py.)"""

from __future__ import annotations

import json
import logging

import datasets
import numpy as np
import pytest
from PIL import Image

from genrecal.errors import SampleError
from student_trainer.data import ShardedBatches, load_dataset_samples, load_question_types
from tests.conftest import random_image


def write_records(folder, rng):
    """Four good LLaVA records (one image, two images, no image, multi-turn) with their PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        random_image(rng, size=16).save(folder / name)
    return [
        {"id": "one", "image": "a.png", "type": "colour",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "two", "image": ["b.png", "c.png"], "type": "compare",
         "conversations": [{"from": "human", "value": "<image> vs <image>: same?"}, {"from": "gpt", "value": "no"}]},
        {"id": "text", "type": "colour",
         "conversations": [{"from": "human", "value": "Is grass green?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "multi", "image": "d.png",
         "conversations": [
             {"from": "human", "value": "<image>\nShape?"}, {"from": "gpt", "value": "a circle"},
             {"from": "human", "value": "Size?"}, {"from": "gpt", "value": "small"},
         ]},
    ]


def describe(samples):
    return [
        (s.sample_id, [(t.role, t.text) for t in s.turns], [np.asarray(image) for image in s.images])
        for s in samples
    ]


def assert_same_samples(left, right):
    assert len(left) == len(right)
    for (id_a, turns_a, images_a), (id_b, turns_b, images_b) in zip(describe(left), describe(right), strict=True):
        assert id_a == id_b and turns_a == turns_b
        assert len(images_a) == len(images_b)
        for a, b in zip(images_a, images_b, strict=True):
            np.testing.assert_array_equal(a, b)


def test_json_jsonl_and_saved_dataset_give_the_same_samples(tmp_path, rng):
    records = write_records(tmp_path / "images", rng)
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from_json, report = load_dataset_samples(tmp_path / "data.json", image_folder=tmp_path / "images")
    from_jsonl, _ = load_dataset_samples(tmp_path / "data.jsonl", image_folder=tmp_path / "images")
    (tmp_path / "lines.json").write_text((tmp_path / "data.jsonl").read_text())  # JSON Lines named .json
    from_lines, _ = load_dataset_samples(tmp_path / "lines.json", image_folder=tmp_path / "images")

    # The same records as a DatasetDict whose Image features hold the pictures themselves (PIL images in,
    # PNG bytes in the arrow files), under the plural column name.
    def pictures(record):
        names = record.get("image", [])
        return [Image.open(tmp_path / "images" / n).convert("RGB") for n in ([names] if isinstance(names, str) else names)]

    features = datasets.Features({
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "type": datasets.Value("string"),
    })
    rows = [{"id": r["id"], "images": pictures(r), "conversations": r["conversations"], "type": r.get("type")}
            for r in records]
    dataset = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "images").rename(tmp_path / "moved")  # the dataset must not need the PNG files
    from_dataset, _ = load_dataset_samples(tmp_path / "saved", split="validation")

    assert report.count == 0 and report.total == 4
    assert [s.sample_id for s in from_json] == ["one", "two", "text", "multi"]
    assert from_json[3].answers == ["a circle", "small"]  # every assistant turn is an answer span
    assert len(from_json[1].images) == 2 and from_json[2].images == []
    assert_same_samples(from_json, from_jsonl)
    assert_same_samples(from_json, from_lines)
    assert_same_samples(from_json, from_dataset)

    assert load_question_types(tmp_path / "data.json") == {"one": "colour", "two": "compare", "text": "colour"}
    assert load_question_types(tmp_path / "saved", split="validation") == load_question_types(tmp_path / "data.jsonl")
    with pytest.raises(ValueError, match="no split 'train'.*validation"):
        load_dataset_samples(tmp_path / "saved")


def test_parquet_with_image_file_names_and_limit(tmp_path, rng):
    records = write_records(tmp_path, rng)
    flat = [{**r, "image": r.get("image") if isinstance(r.get("image"), str) else None} for r in records[::2]]
    datasets.Dataset.from_list(flat).to_parquet(str(tmp_path / "data.parquet"))
    samples, _ = load_dataset_samples(tmp_path / "data.parquet")  # image names resolve next to the file
    assert [s.sample_id for s in samples] == ["one", "text"]
    np.testing.assert_array_equal(np.asarray(samples[0].images[0]), np.asarray(Image.open(tmp_path / "a.png")))
    limited, report = load_dataset_samples(tmp_path / "data.parquet", limit=1)
    assert [s.sample_id for s in limited] == ["one"] and report.total == 1


def test_bad_records_are_skipped_and_counted(tmp_path, rng, caplog):
    records = write_records(tmp_path, rng)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad = [
        {"id": "missing", "image": "nowhere.png",
         "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]},
        {"id": "corrupt", "image": "corrupt.png",
         "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]},
        {"id": "malformed", "conversations": [{"from": "robot", "value": "beep"}]},
        {"id": "empty", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "  "}]},
    ]
    lines = [json.dumps(r) for r in records[:2] + bad[:2]] + ["{not json"] + [json.dumps(r) for r in bad[2:]]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")

    with caplog.at_level(logging.WARNING, logger="student_trainer.data"):
        samples, report = load_dataset_samples(tmp_path / "data.jsonl")
    assert [s.sample_id for s in samples] == ["one", "two"]
    assert report.count == 5 and report.total == 7
    assert [sample_id for sample_id, _ in report.examples] == ["missing", "corrupt", "<line 5>", "malformed", "empty"]
    reasons = dict(report.examples)
    assert "does not exist" in reasons["missing"] and "cannot be decoded" in reasons["corrupt"]
    assert "'robot'" in reasons["malformed"] and "empty" in reasons["empty"]
    assert "skipped 5 of 7 records" in caplog.text

    with pytest.raises(SampleError, match="sample 'missing'") as raised:
        load_dataset_samples(tmp_path / "data.jsonl", skip_bad=False)
    assert raised.value.sample_id == "missing"

    (tmp_path / "all_bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="no usable samples"):
        load_dataset_samples(tmp_path / "all_bad.json")


def test_corrupt_image_inside_a_dataset_is_skipped(tmp_path, rng):
    random_image(rng, size=8).save(tmp_path / "good.png")
    rows = {"id": ["good", "bad"], "image": [{"bytes": (tmp_path / "good.png").read_bytes(), "path": None},
                                             {"bytes": b"garbage", "path": None}],
            "conversations": [[{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]] * 2}
    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
    })
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    samples, report = load_dataset_samples(tmp_path / "saved")
    assert [s.sample_id for s in samples] == ["good"]
    assert report.count == 1 and report.examples[0][0] == "bad"


@pytest.mark.parametrize("num_samples,batch_size,world_size", [(23, 3, 2), (12, 4, 3), (5, 5, 1)])
def test_sharded_batches_are_disjoint_and_cover_each_epoch(num_samples, batch_size, world_size):
    shards = [ShardedBatches(num_samples, batch_size, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    per_epoch = shards[0].batches_per_epoch
    assert per_epoch == num_samples // (batch_size * world_size)
    epochs = []
    for epoch in range(3):
        seen = [i for shard in shards for b in range(epoch * per_epoch, (epoch + 1) * per_epoch) for i in shard.batch(b)]
        assert all(len(shard.batch(epoch * per_epoch)) == batch_size for shard in shards)
        assert len(seen) == len(set(seen)) == per_epoch * batch_size * world_size  # disjoint; the tail dropped
        assert set(seen) <= set(range(num_samples))
        epochs.append(seen)
    if num_samples > batch_size * world_size:
        assert epochs[0] != epochs[1]  # a fresh permutation each epoch


def test_sharded_batches_are_deterministic_and_resume_exactly():
    first = ShardedBatches(50, 4, seed=3, rank=1, world_size=2)
    second = ShardedBatches(50, 4, seed=3, rank=1, world_size=2)
    continuing = [batch for batch, _ in zip(first, range(40), strict=False)]
    assert continuing == [second.batch(i) for i in range(40)]
    resumed = ShardedBatches(50, 4, seed=3, rank=1, world_size=2)
    assert [batch for batch, _ in zip(resumed.iter_from(17), range(23), strict=False)] == continuing[17:]
    assert ShardedBatches(50, 4, seed=4, rank=1, world_size=2).batch(0) != first.batch(0)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ShardedBatches(7, 4, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ShardedBatches(50, 4, seed=0, rank=2, world_size=2)
