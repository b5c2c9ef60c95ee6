"""genrecal.client's image encoding: the teacher must see exactly the student's pixels (PNG for pixels the client
made, a file's own bytes — JPEG stays JPEG — for pixels decoded from one, checked against the real server)."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import genrecal.client as client_module
from genrecal.client import image_bytes
from genrecal.families import load_vlm
from genrecal.resilient_teacher import open_teacher
from genrecal.rpc import pb2
from genrecal.sample import Sample, load_image, source_bytes
from genrecal.teacher import InProcessTeacher
from student_trainer.data import ShardedBatches
from student_trainer.dataset import LazySamples, MicroBatchLoader
from teacher_server.launch import TeacherProcess


@pytest.mark.parametrize("mode,side", [("RGB", 64), ("RGB", 97), ("L", 33), ("RGBA", 16)])
def test_image_bytes_round_trip_is_lossless(rng, mode, side):
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (side, side, channels), dtype=np.uint8).squeeze()
    image = Image.fromarray(pixels)  # mode from the array: L (2-D), RGB or RGBA
    assert image.mode == mode
    data = image_bytes(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = load_image(data, sample_id="s")  # what the teacher server does with the bytes
    assert np.array_equal(np.asarray(decoded), np.asarray(image.convert("RGB")))


# ---- JPEG pass-through against the real server ----------------------------------------------------------------
JPEG_MAGIC = b"\xff\xd8\xff"


def write_jpeg_records(folder, rng) -> list[dict]:
    """LLaVA records over real JPEG files (PIL, quality 90): RGB square and non-square, greyscale, two images."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = {"a.jpg": (32, 32, 3), "b.jpg": (40, 56, 3), "c.jpg": (48, 48), "d.jpg": (24, 36, 3)}
    for name, shape in pixels.items():
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name, quality=90)
    human, gpt = "human", "gpt"
    return [
        {"id": "rgb", "image": "a.jpg", "conversations": [{"from": human, "value": "<image>\nWhat colour?"},
                                                           {"from": gpt, "value": "red and blue"}]},
        {"id": "wide", "image": "b.jpg", "conversations": [{"from": human, "value": "<image>\nShape?"},
                                                            {"from": gpt, "value": "a small square"}]},
        {"id": "grey", "image": "c.jpg", "conversations": [{"from": human, "value": "<image>\nIs it dark?"},
                                                            {"from": gpt, "value": "no"}]},
        {"id": "pair", "image": ["d.jpg", "a.jpg"],
         "conversations": [{"from": human, "value": "<image> and <image>: same?"}, {"from": gpt, "value": "no"}]},
    ]


@pytest.mark.slow  # a server process
def test_teacher_server_sees_the_jpeg_pixels_the_student_decoded(tiny_checkpoint, tmp_path, rng, monkeypatch):
    """The trainer's path (LazySamples through its DataLoader -> ResilientTeacher -> TeacherClient) sends each
    JPEG file's own bytes, and the real server's features equal the in-process teacher's on the same JPEG files
    decoded by PIL (bit for bit: the same decoder, the same fp32 forward)."""
    teacher_path = tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96, intermediate_size=192)
    records = write_jpeg_records(tmp_path / "images", rng)
    (tmp_path / "data.json").write_text(json.dumps(records))
    lazy = LazySamples(tmp_path / "data.json", image_folder=tmp_path / "images")
    loader = MicroBatchLoader(lazy, ShardedBatches(len(lazy), 2, seed=0, rank=0, world_size=1),
                              start=0, stop=2, workers=0)
    try:
        # A trainer's DataLoader workers pickle their micro-batches to it: the encoded bytes must survive that
        # (pickled here rather than by a worker process, which costs ~10-25 s to start on 2 cores).
        groups = [pickle.loads(pickle.dumps(loader.next())) for _ in range(2)]
    finally:
        loader.close()
    samples = [s for group in groups for s in group]
    assert sorted(s.sample_id for s in samples) == sorted(r["id"] for r in records)

    sent: list[pb2.Sample] = []  # what the client put in the EncodeRequest
    build_message = client_module.sample_to_proto

    def recording_sample_to_proto(sample, image_payloads):
        message = build_message(sample, image_payloads)  # unchanged: only recorded
        sent.append(message)
        return message

    monkeypatch.setattr(client_module, "sample_to_proto", recording_sample_to_proto)
    server = TeacherProcess(teacher_path)
    try:
        teacher = open_teacher(addr=server.address, timeout_s=120)
        try:
            remote = teacher.encode_step(groups, timed=False)  # what StepBuilder calls
            teacher.release([f for group in remote for f in group])
        finally:
            teacher.close()
    finally:
        server.kill()
    monkeypatch.undo()

    files = {r["id"]: [tmp_path / "images" / n for n in ([r["image"]] if isinstance(r["image"], str) else r["image"])]
             for r in records}
    assert sorted(m.sample_id for m in sent) == sorted(files)  # one request of the step's samples
    for message in sent:
        assert [bytes(data) for data in message.images] == [f.read_bytes() for f in files[message.sample_id]]
        assert all(bytes(data)[:3] == JPEG_MAGIC for data in message.images)

    # The reference: the same JPEG files decoded by PIL, with no encoded bytes attached.
    decoded = {s.sample_id: Sample(s.sample_id, s.turns, [Image.open(f).convert("RGB") for f in files[s.sample_id]])
               for s in samples}
    assert all(source_bytes(im) is None for s in decoded.values() for im in s.images)
    local = InProcessTeacher(load_vlm(teacher_path))
    for group, features in zip(groups, remote, strict=True):
        expected = local.encode([decoded[s.sample_id] for s in group])
        for r, e in zip(features, expected, strict=True):
            assert r.sample_id == e.sample_id
            torch.testing.assert_close(r.answer_token_ids, e.answer_token_ids, rtol=0, atol=0)
            assert r.teacher_ce == pytest.approx(e.teacher_ce, rel=1e-6)  # Encode's own-answer CE, through gRPC
            assert len(r.answer_segments) == len(e.answer_segments) and len(r.question_segments) == len(
                e.question_segments) > 0
            for a, b in zip(r.answer_segments + r.question_segments, e.answer_segments + e.question_segments,
                            strict=True):
                assert a.dtype == b.dtype == torch.float32
                # float rounding only: the server batches the step's samples into other shapes than the groups
                # here, and CPU kernels round differently per shape (bit-equal on one VM, 3e-7 apart on another)
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # Not vacuous: other pixels (the same picture at JPEG quality 50) give other features.
    first = decoded["rgb"]
    buffer = io.BytesIO()
    first.images[0].save(buffer, format="JPEG", quality=50)
    other = local.encode([Sample("rgb", first.turns, [Image.open(buffer).convert("RGB")])])[0]
    jpeg90 = next(f for group in remote for f in group if f.sample_id == "rgb")
    assert (other.question_segments[0] - jpeg90.question_segments[0]).abs().max() > 1e-3  # >> the rounding above
