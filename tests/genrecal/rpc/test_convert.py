"""The proto boundary: a sample's turns (a system turn included) reach the server as sent, and what the server puts
in an EncodedSample comes back to the client."""

from __future__ import annotations

import pytest
import torch

from genrecal.rpc import pb2
from genrecal.rpc.convert import (
    encode_response_frames,
    features_from_frames,
    sample_from_proto,
    sample_to_proto,
)
from genrecal.sample import Sample, Turn
from genrecal.teacher import TeacherFeatures


def test_a_system_turn_crosses_the_wire():
    sent = Sample("s", [Turn("system", "You answer in one word."), Turn("user", "Sky?"), Turn("assistant", "Blue.")])
    received = sample_from_proto(pb2.Sample.FromString(sample_to_proto(sent, []).SerializeToString()), 0)
    assert received.turns == sent.turns and received.messages()[0]["role"] == "system"


def features(sample_id: str, teacher_ce: float | None) -> TeacherFeatures:
    gen = torch.Generator().manual_seed(len(sample_id))
    return TeacherFeatures(
        sample_id=sample_id,
        answer_segments=[torch.randn(2, 8, generator=gen), torch.randn(1, 8, generator=gen)],
        question_segments=[torch.randn(5, 8, generator=gen), torch.randn(3, 8, generator=gen)],
        answer_token_ids=torch.tensor([4, 9, 2]),
        handle=f"h-{sample_id}",
        teacher_ce=teacher_ce,
    )


@pytest.mark.parametrize("question_features", [True, False])
def test_encoded_samples_round_trip_with_and_without_the_teachers_own_ce(question_features):
    sent = [features("a", 1.234567890123), features("bb", 0.0), features("ccc", None)]
    frames = list(encode_response_frames(sent, question_features=question_features, dtype=None, chunk_bytes=64))
    got = features_from_frames(frames)
    # A double travels exactly; 0.0 (no answer tokens) stays 0.0; a teacher that does not report it (a server
    # before the field) gives None, not a CE of 0.
    assert [f.teacher_ce for f in got] == [1.234567890123, 0.0, None]
    assert frames[0].header.samples[2].HasField("teacher_ce") is False
    for g, s in zip(got, sent, strict=True):
        assert (g.sample_id, g.handle, g.prediction_states) == (s.sample_id, s.handle, None)
        assert torch.equal(g.answer_token_ids, s.answer_token_ids)
        assert [torch.equal(x, y) for x, y in zip(g.answer_segments, s.answer_segments, strict=True)] == [True, True]
        assert len(g.question_segments) == (2 if question_features else 0)
