"""The lazy data path: the same samples as the eager loader from every source, bad records as values, JPEG bytes
sent as the file holds them, and the DataLoader's micro-batch order. (Record formats and the index:
test_records.py.)"""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from genrecal.client import image_bytes
from student_trainer.data import ShardedBatches, load_dataset_samples
from student_trainer.dataset import BadRecord, LazySamples, MicroBatchLoader, validate_records
from tests.conftest import random_image
from tests.student_trainer.test_data import assert_same_samples, write_records


@pytest.mark.parametrize("kind", ["json", "jsonl", "lines.json", "parquet", "save_to_disk"])
def test_lazy_samples_equal_the_eager_loader_on_every_source(kind, tmp_path, rng):
    records = write_records(tmp_path / "images", rng)
    if kind == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records, indent=1))
    elif kind in ("jsonl", "lines.json"):
        path = tmp_path / ("data.jsonl" if kind == "jsonl" else "lines.json")
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        as_list = [{**r, "image": [r["image"]] if isinstance(r.get("image"), str) else r.get("image", [])}
                   for r in records]  # one column type: a list of file names
        table = datasets.Dataset.from_list(as_list)
        path = tmp_path / "data.parquet" if kind == "parquet" else tmp_path / "saved"
        table.to_parquet(str(path)) if kind == "parquet" else table.save_to_disk(str(path))
    eager, _ = load_dataset_samples(path, image_folder=tmp_path / "images")
    lazy = LazySamples(path, image_folder=tmp_path / "images")
    assert len(lazy) == 4
    assert_same_samples([lazy[i] for i in range(len(lazy))], eager)


def test_bad_records_come_back_as_values_naming_the_record(tmp_path, rng):
    records = write_records(tmp_path, rng)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = {"id": "broken", "image": "broken.png", "conversations": records[0]["conversations"]}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(records[0]) + "\n{not json\n" + json.dumps(broken) + "\n" + json.dumps(records[2]))
    lazy = LazySamples(path)
    assert lazy[0].sample_id == "one" and lazy[3].sample_id == "text"
    assert isinstance(lazy[1], BadRecord) and lazy[1].index == 1 and "not valid JSON" in lazy[1].reason
    assert isinstance(lazy[2], BadRecord) and lazy[2].sample_id == "broken" and "cannot be decoded" in lazy[2].reason
    report = validate_records(lazy, workers=0)
    assert (report.total, [b.index for b in report.bad]) == (4, [1, 2])
    assert "2 of 4 records are bad" in str(report)
    halves = [validate_records(lazy, workers=0, rank=r, world_size=2) for r in (0, 1)]
    assert [b.index for h in halves for b in h.bad] == [2, 1] and sum(h.total for h in halves) == 4


def test_jpeg_bytes_are_sent_as_the_file_holds_them(tmp_path, rng):
    random_image(rng, size=32).save(tmp_path / "photo.jpg", quality=80)
    (tmp_path / "data.jsonl").write_text(json.dumps(
        {"id": "p", "image": "photo.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                            {"from": "gpt", "value": "noise"}]}))
    sample = LazySamples(tmp_path / "data.jsonl")[0]
    assert image_bytes(sample.images[0]) == (tmp_path / "photo.jpg").read_bytes()
    assert image_bytes(sample.images[0].resize((16, 16)))[:8] == b"\x89PNG\r\n\x1a\n"  # other pixels: PNG
    assert image_bytes(Image.new("RGB", (4, 4)))[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_reads_the_sharded_order_from_any_position(workers, tmp_path, rng):
    records = write_records(tmp_path, rng)
    many = [{**records[i % 4], "id": f"r{i}"} for i in range(10)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in many))
    lazy = LazySamples(tmp_path / "data.jsonl")
    batches = ShardedBatches(len(lazy), 2, seed=3, rank=1, world_size=2)
    expected = [[f"r{i}" for i in batches.batch(k)] for k in range(3, 9)]
    loader = MicroBatchLoader(lazy, batches, start=3, stop=9, workers=workers)
    try:
        got = [[s.sample_id for s in loader.next()] for _ in range(6)]
        with pytest.raises(StopIteration):
            loader.next()
    finally:
        loader.close()
    assert got == expected
