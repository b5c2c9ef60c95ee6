"""Several teacher replicas behind one client (``genrecal.replicas``), against real ``teacher_server`` processes.

Encode is spread over the replicas, Score goes to the replica that issued each handle (a micro-batch whose
samples came from both is split and added up exactly), a killed replica is dropped and its samples re-encoded on
the other by the trainer's wrapper with the gradients unchanged, and a replica that comes back is used again.
"""

from __future__ import annotations

import time

import pytest
import torch

from genrecal.families import load_vlm
from genrecal.replicas import ReplicatedTeacher, resolve_addresses
from genrecal.resilient_teacher import ResilientTeacher
from genrecal.sample import Sample, Turn
from genrecal.teacher import InProcessTeacher
from teacher_server.launch import TeacherProcess, free_port
from tests.conftest import random_image, start_concurrently

ANSWERS = ("red", "a small blue square", "green circle", "no")


def test_addresses_from_a_list_or_a_name():
    assert resolve_addresses("127.0.0.1:1, 127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert resolve_addresses("localhost:7") == ["localhost:7"]  # one IP: the name is kept
    with pytest.raises(ValueError, match="HOST:PORT"):
        resolve_addresses("127.0.0.1:1,nowhere")


@pytest.fixture(scope="module")
def teacher_path(tiny_checkpoint):
    return tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96)


@pytest.fixture(scope="module")
def local(teacher_path):
    return InProcessTeacher(load_vlm(teacher_path))


def samples(rng, prefix: str) -> list[Sample]:
    return [Sample(f"{prefix}{i}", [Turn("user", "<image>\nWhat is shown?"), Turn("assistant", answer)],
                   [random_image(rng)]) for i, answer in enumerate(ANSWERS)]


def outputs_for(features, hidden: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(f.num_answer_tokens, hidden, generator=generator) for f in features]


@pytest.mark.slow
def test_replicas_share_encode_score_their_own_handles_and_survive_a_dead_one(teacher_path, local, rng):
    ports = [free_port(), free_port()]
    servers = start_concurrently(*(lambda port=port: TeacherProcess(teacher_path, port=port) for port in ports))
    client = ReplicatedTeacher([f"127.0.0.1:{port}" for port in ports], retries=1, backoff_s=0.2,
                               probe_interval_s=0.5)
    teacher = ResilientTeacher(client, restart_wait_s=60.0)
    try:
        client.wait_until_serving(60)
        # Encode spreads: consecutive requests go to alternate replicas (nothing outstanding: ties rotate).
        batch = samples(rng, "s")
        halves = [teacher.encode(batch[:2]), teacher.encode(batch[2:])]
        assert {f.handle.split("/")[0] for f in halves[0]} != {f.handle.split("/")[0] for f in halves[1]}
        features = halves[0] + halves[1]
        # The same forwards in process (batch composition changes fp32 round-off): the two halves, then all four.
        outputs = outputs_for(features, client.hidden_size)
        reference, reference_grads = local.score(local.encode(batch[:2]) + local.encode(batch[2:]), outputs,
                                                 ce_weight=0.7, kl_weight=1.3)
        full, full_grads = local.score(local.encode(batch), outputs, ce_weight=0.7, kl_weight=1.3)

        # One score over samples of both replicas: split per replica, added up exactly.
        score, grads = teacher.score(features, outputs, ce_weight=0.7, kl_weight=1.3)
        assert score.num_tokens == reference.num_tokens
        torch.testing.assert_close(score.ce, reference.ce, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(score.kl, reference.kl, rtol=1e-4, atol=1e-7)
        for g, e in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)

        calls = []  # Score calls per replica: both paths travel in one call to each replica
        for replica in client.replicas:
            replica.client.score_paths = lambda *a, _real=replica.client.score_paths, _i=replica.index, **k: (
                calls.append(_i), _real(*a, **k))[1]
        by_path = client.score_paths(features, {"L1": outputs, "L2": outputs}, ce_weight=0.7, kl_weight=1.3)
        assert sorted(calls) == [0, 1]
        for replica in client.replicas:
            del replica.client.score_paths
        assert list(by_path) == ["L1", "L2"]
        for path_score, path_grads in by_path.values():
            torch.testing.assert_close(path_score.ce, score.ce, rtol=0, atol=0)
            assert all(torch.equal(a, b) for a, b in zip(path_grads, grads, strict=True))

        # Kill the replica of the first half: its handles are gone with it; the wrapper re-encodes on the other.
        dead = int(halves[0][0].handle.split("/")[0])
        servers[dead].kill()
        score, grads = teacher.score(features, outputs, ce_weight=0.7, kl_weight=1.3)
        assert teacher.recoveries == 1 and client.failovers == 1
        assert {f.handle.split("/")[0] for f in features} == {str(1 - dead)}  # all on the live replica now
        torch.testing.assert_close(score.ce, full.ce, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(score.kl, full.kl, rtol=1e-4, atol=1e-7)
        for g, e in zip(grads, full_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)
        assert {f.handle.split("/")[0] for f in teacher.encode(batch)} == {str(1 - dead)}  # Encode avoids it

        # It comes back (same address, new process): probed, used again, with its new instance id.
        servers[dead] = TeacherProcess(teacher_path, port=ports[dead])
        seen, deadline = set(), time.monotonic() + 60
        while seen != {"0", "1"} and time.monotonic() < deadline:
            seen |= {f.handle.split("/")[0] for f in teacher.encode(batch[:1])}
            time.sleep(0.2)
        assert seen == {"0", "1"}
    finally:
        for server in servers:
            server.kill()
        client.close()
