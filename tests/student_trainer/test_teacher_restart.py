"""The trainer's teacher wrapper (:class:`genrecal.resilient_teacher.ResilientTeacher`) survives a teacher restart.

A restarted teacher has lost the states it kept under the handles of ``encode``; the wrapper re-encodes those
samples, checks the new features against the old ones, swaps the handles into the existing feature objects and
retries the score. The slow test does it against real ``teacher_server`` processes on one fixed port: the server
is killed between encode and score and a new one starts while the score is already waiting. The fast tests use a
stand-in that forgets its handles like a restarted server does (the recovery logic, and its refusal of a teacher
that answers differently).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc
import pytest
import torch

from genrecal.client import HandleLost
from genrecal.distill import LossConfig, genrecal_objective
from genrecal.families import load_vlm
from genrecal.recalibrator import Recalibrator
from genrecal.resilient_teacher import ResilientTeacher, TeacherMismatchError, open_teacher
from genrecal.sample import Sample, Turn
from genrecal.stages import Stage, set_trainable
from genrecal.teacher import InProcessTeacher
from teacher_server.launch import TeacherProcess, free_port
from tests.conftest import random_image

ANSWERS = ("red", "it is a small blue square", "green circle")
LOSSES = LossConfig(ce_weight=0.7, kl_weight=1.3)


@pytest.fixture(scope="module")
def teacher_path(tiny_checkpoint):
    return tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96)


@pytest.fixture(scope="module")
def student(tiny_checkpoint):
    return load_vlm(tiny_checkpoint("internvl", tokenizer="llama2", hidden_size=64))


def make_samples(rng) -> list[Sample]:
    return [Sample(f"s{i}", [Turn("user", "<image>\nWhat is shown?"), Turn("assistant", answer)], [random_image(rng)])
            for i, answer in enumerate(ANSWERS)]


def distillation_gradients(student, teacher, samples, features) -> dict[str, torch.Tensor]:
    """Stage-2 gradients of the student and a fixed Recalibrator for one micro-batch (L1 + L2 + L3)."""
    torch.manual_seed(0)
    recalibrator = Recalibrator(student.adapter.recalibrator_spec(student.model), teacher.hidden_size, num_blocks=1)
    student.model.zero_grad(set_to_none=True)
    params = set_trainable(Stage.DISTILLATION, student.adapter.parameter_groups(student.model), recalibrator)
    objective = genrecal_objective(Stage.DISTILLATION, student, student.encode(samples), recalibrator=recalibrator,
                                   teacher=teacher, features=features, losses=LOSSES)
    objective.loss.backward()
    named = [(f"student.{n}", p) for n, p in student.model.named_parameters() if p.requires_grad]
    named += [(f"recalibrator.{n}", p) for n, p in recalibrator.named_parameters()]
    assert len(named) == len(params) and all(p.grad is not None for _, p in named)
    grads = {name: p.grad.detach().clone() for name, p in named}
    grads.update({k: torch.tensor(v) for k, v in objective.metrics.items()})
    return grads


def assert_same(got: dict, want: dict, rtol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=1e-9, msg=key)


# ---- a real teacher_server restarted on the same port --------------------------------------------------------------
@pytest.mark.slow
def test_score_after_a_real_server_restart_gives_the_never_restarted_gradients(teacher_path, student, rng, caplog):
    samples = make_samples(rng)
    port = free_port()
    first = TeacherProcess(teacher_path, port=port)
    servers = [first]
    # Few client retries (0.5 + 1 + 2 s), so the wrapper's own wait for SERVING is exercised too.
    teacher = open_teacher(addr=f"127.0.0.1:{port}", timeout_s=120.0, retries=3)
    try:
        features = teacher.encode(samples)
        answer_features = [f.answer_segments for f in features]
        reference = distillation_gradients(student, teacher, samples, features)  # never restarted
        old_handles = [f.handle for f in features]

        first.kill()  # SIGKILL between encode and score: every handle is gone
        starter = threading.Thread(target=lambda: servers.append(TeacherProcess(teacher_path, port=port)))
        starter.start()  # the new server comes up while the score below is already retrying
        with caplog.at_level(logging.WARNING):
            recovered = distillation_gradients(student, teacher, samples, features)
        starter.join()
    finally:
        for server in servers:
            server.kill()
        teacher.close()

    assert len(servers) == 2
    assert teacher.recoveries == 1  # L1's score recovered; L2's score then used the new handles
    assert all(f.handle and f.handle != old for f, old in zip(features, old_handles, strict=True))
    assert all(f.answer_segments is kept for f, kept in zip(features, answer_features, strict=True))
    assert_same(recovered, reference)
    assert "waiting up to 120 s" in caplog.text and "re-encoding" in caplog.text and "teacher recovered" in caplog.text


# ---- the recovery logic, against a stand-in that forgets its handles --------------------------------------------
class ForgetfulTeacher:
    """An in-process teacher behind handles, like the service: ``restart()`` loses them all (``HandleLost``)."""

    address = "stand-in"

    def __init__(self, teacher: InProcessTeacher):
        self.inner = teacher
        self.states: dict[str, torch.Tensor] = {}
        self.encodes = 0

    @property
    def hidden_size(self) -> int:
        return self.inner.hidden_size

    def restart(self, teacher: InProcessTeacher | None = None) -> None:
        self.states.clear()
        self.inner = teacher or self.inner

    def encode(self, samples, **_):
        self.encodes += 1
        features = self.inner.encode(samples)
        for f in features:
            f.handle = uuid.uuid4().hex
            self.states[f.handle] = f.prediction_states
            f.prediction_states = None  # the student's copy holds none, as with the remote client
        return features

    def score(self, features, outputs, **kwargs):
        missing = [f.handle for f in features if f.handle not in self.states]
        if missing:
            raise HandleLost(self.address, "Score", grpc.StatusCode.NOT_FOUND, f"unknown handle {missing[0]}")
        from dataclasses import replace

        full = [replace(f, prediction_states=self.states[f.handle]) for f in features]
        return self.inner.score(full, outputs, **kwargs)

    def score_paths(self, features, outputs_by_path, **kwargs):
        return {path: self.score(features, outputs, **kwargs) for path, outputs in outputs_by_path.items()}

    def release(self, features):
        return sum(self.states.pop(f.handle, None) is not None for f in features)


def test_lost_handles_are_reencoded_and_the_gradients_unchanged(teacher_path, student, rng, caplog):
    samples = make_samples(rng)
    stand_in = ForgetfulTeacher(InProcessTeacher(load_vlm(teacher_path)))
    teacher = ResilientTeacher(stand_in)
    features = teacher.encode(samples)
    reference = distillation_gradients(student, teacher, samples, features)
    stand_in.restart()
    with caplog.at_level(logging.WARNING):
        recovered = distillation_gradients(student, teacher, samples, features)
    assert (teacher.recoveries, stand_in.encodes) == (1, 2)
    assert_same(recovered, reference)
    assert caplog.text.count("teacher recovered") == 1
    teacher.release(features)
    assert not stand_in.states and not teacher._samples  # nothing kept for released features
    assert teacher.wait_s > 0


def test_a_teacher_that_reencodes_differently_is_refused(teacher_path, tiny_checkpoint, rng):
    samples = make_samples(rng)
    stand_in = ForgetfulTeacher(InProcessTeacher(load_vlm(teacher_path)))
    teacher = ResilientTeacher(stand_in)
    features = teacher.encode(samples)
    other = tiny_checkpoint("qwen2_vl", tokenizer="llama2", hidden_size=96)  # other tokenizer: other answer ids
    stand_in.restart(InProcessTeacher(load_vlm(other)))
    outputs = [torch.zeros(f.num_answer_tokens, stand_in.hidden_size) for f in features]
    with pytest.raises(TeacherMismatchError, match="sample 's0' re-encodes differently \\(answer token ids"):
        teacher.score(features, outputs)


def test_features_not_encoded_through_the_wrapper_cannot_be_recovered(teacher_path, rng):
    samples = make_samples(rng)
    stand_in = ForgetfulTeacher(InProcessTeacher(load_vlm(teacher_path)))
    features = stand_in.encode(samples)  # bypasses the wrapper: it never saw these samples
    stand_in.restart()
    outputs = [torch.zeros(f.num_answer_tokens, stand_in.hidden_size) for f in features]
    with pytest.raises(RuntimeError, match="not encoded through this wrapper"):
        ResilientTeacher(stand_in).score(features, outputs)


class GatedTeacher(ForgetfulTeacher):
    """Records each Score's thread and path names; a Score waits for ``gate`` (a call still travelling)."""

    def __init__(self, teacher: InProcessTeacher):
        super().__init__(teacher)
        self.gate = threading.Event()
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def score_paths(self, features, outputs_by_path, **kwargs):
        self.gate.wait(timeout=30)
        self.calls.append((threading.current_thread().name, tuple(outputs_by_path)))
        return super().score_paths(features, outputs_by_path, **kwargs)

    def close(self) -> None:
        self.gate.set()


def test_async_scores_run_in_order_in_one_thread_recover_and_count_only_the_blocked_time(teacher_path, rng):
    samples = make_samples(rng)
    stand_in = GatedTeacher(InProcessTeacher(load_vlm(teacher_path)))
    teacher = ResilientTeacher(stand_in, async_score=True)
    features = teacher.encode(samples)
    generator = torch.Generator().manual_seed(0)
    outputs = [torch.randn(f.num_answer_tokens, stand_in.hidden_size, generator=generator) for f in features]
    stand_in.gate.set()
    reference = teacher.score_paths(features, {"L1": outputs}, ce_weight=0.7)["L1"]  # synchronous, same wrapper
    stand_in.gate.clear()
    stand_in.restart()  # the handles are lost: the first async Score recovers in the worker thread
    stand_in.calls.clear()
    wait_before = teacher.wait_s
    first = teacher.score_paths_async(features, {"L1": outputs}, ce_weight=0.7)
    second = teacher.score_paths_async(features, {"L2": outputs}, ce_weight=0.7)
    threading.Event().wait(0.3)  # the trainer computes meanwhile: not teacher wait
    assert not first.done() and teacher.wait_s == wait_before
    stand_in.gate.set()
    blocked = time.perf_counter()
    got = [first.result()["L1"], second.result()["L2"]]
    blocked = time.perf_counter() - blocked
    assert teacher.wait_s - wait_before <= blocked + 1e-3  # only the time result() blocked, not the 0.3 s above
    assert [paths for _, paths in stand_in.calls] == [("L1",), ("L1",), ("L2",)]  # in order (L1 retried once)
    assert {name for name, _ in stand_in.calls} == {"teacher-score_0"} and teacher.recoveries == 1
    for score, grads in got:
        torch.testing.assert_close(score.ce, reference[0].ce)
        for g, want in zip(grads, reference[1], strict=True):
            torch.testing.assert_close(g, want)
    teacher.close()


def test_an_in_process_teacher_scores_at_once():
    class Counting:
        def score_paths(self, features, outputs_by_path, **kwargs):
            self.thread = threading.current_thread().name
            return {"L1": "answer"}

    stand_in = Counting()
    teacher = ResilientTeacher(stand_in)  # async_score=False: no worker thread
    pending = teacher.score_paths_async([], {"L1": []})
    assert pending.done() and pending.result() == {"L1": "answer"}
    assert stand_in.thread == threading.current_thread().name and teacher._score_worker is None
