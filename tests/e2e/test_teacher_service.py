"""The real teacher server as a subprocess on localhost, driven by the real client; with each body backend.

The vLLM backend runs in its own venv's python (``vllm_python``; skipped only when $GENRECAL_VLLM_PYTHON is
unset). Its features equal transformers' within fp32 summation-order noise rather than bit for bit.
"""

from __future__ import annotations

import io
import signal
import threading

import grpc
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrecal.client import HandleLost, TeacherClient, TeacherError
from genrecal.families import load_vlm
from genrecal.rpc import pb2, pb2_grpc
from genrecal.sample import Sample, Turn
from genrecal.teacher import InProcessTeacher
from genrecal.wire import channel_options
from teacher_server.launch import TeacherProcess
from tests.conftest import random_image

pytestmark = pytest.mark.slow
WORDS = ["red", "blue", "green", "circle", "square", "small", "large"]


def make_samples(rng, n, prefix="s"):
    return [
        Sample(f"{prefix}{i}", [Turn("user", "<image>\nWhat is shown?"),
                                Turn("assistant", " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))))],
               [random_image(rng)])
        for i in range(n)
    ]


BACKEND_FLAGS = {"transformers": (), "vllm": ("--backend", "vllm", "--max-model-len", "2048")}
# Features and gradients of each backend against the in-process transformers teacher.
FEATURE_TOLERANCE = {"transformers": dict(rtol=0, atol=0), "vllm": dict(rtol=1e-4, atol=1e-5)}
GRAD_TOLERANCE = {"transformers": dict(rtol=1e-5, atol=1e-8), "vllm": dict(rtol=1e-4, atol=1e-6)}


@pytest.fixture(scope="module")
def teacher_path(tiny_checkpoint):
    # head size 96 / 3 = 32: vLLM's CPU attention supports no smaller
    return tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96, num_heads=3, num_kv_heads=1)


@pytest.fixture(scope="module", params=list(BACKEND_FLAGS))
def backend(request) -> str:
    return request.param


def launch(request, teacher_path, backend: str, *extra: str) -> TeacherProcess:
    python = request.getfixturevalue("vllm_python") if backend == "vllm" else None
    return TeacherProcess(teacher_path, *BACKEND_FLAGS[backend], *extra, python=python, timeout_s=600)


@pytest.fixture(scope="module")
def server(request, teacher_path, backend):
    """One server per backend for the module; its last test stops it with SIGTERM (a vLLM start costs ~25-40 s on
    2 cores, so the shutdown test takes the server the others used rather than starting its own)."""
    process = launch(request, teacher_path, backend, "--max-request-mib", "1", "--batch-wait-ms", "20",
                     "--grace-s", "5")
    yield process
    process.kill()


@pytest.fixture(scope="module")
def local(teacher_path):
    return InProcessTeacher(load_vlm(teacher_path))


def reference_loss(head, outputs, labels, states, ce_weight, kl_weight, normalizer):
    log_q = F.log_softmax(head(outputs).float(), dim=-1)
    log_p = F.log_softmax(head(states).float(), dim=-1)
    ce = -log_q.gather(1, labels[:, None]).sum() / normalizer
    kl = (log_p.exp() * (log_p - log_q)).sum() / normalizer
    return ce, kl, ce_weight * ce + kl_weight * kl


def test_remote_gradients_equal_in_process_autograd(server, backend, local, rng):
    samples = make_samples(rng, 3)
    client = TeacherClient(server.address)
    assert client.info().backend == backend
    # the resolution, as JSON text per knob: the tiny Qwen2-VL's own (no --image-options)
    assert dict(client.info().image_options) == {"min_pixels": "3136", "max_pixels": "12544"}
    remote = client.encode(samples)
    expected = local.encode(samples)
    for r, e in zip(remote, expected, strict=True):
        assert r.sample_id == e.sample_id and r.handle
        torch.testing.assert_close(r.answer_token_ids, e.answer_token_ids)
        for a, b in zip(r.answer_segments + r.question_segments, e.answer_segments + e.question_segments, strict=True):
            torch.testing.assert_close(a, b, **FEATURE_TOLERANCE[backend])
    outputs = [torch.randn(f.num_answer_tokens, client.hidden_size, generator=torch.Generator().manual_seed(i))
               for i, f in enumerate(remote)]
    score, grads = client.score(remote, outputs, normalizer=11.0, ce_weight=0.6, kl_weight=1.7)

    r = torch.cat(outputs).requires_grad_(True)
    labels = torch.cat([f.answer_token_ids for f in expected])
    states = torch.cat([f.prediction_states for f in expected])
    ce, kl, loss = reference_loss(local.vlm.head, r, labels, states, 0.6, 1.7, 11.0)
    loss.backward()
    assert score.ce.item() == pytest.approx(ce.item(), rel=1e-5)
    assert score.kl.item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6 if backend == "vllm" else 1e-7)
    assert score.num_tokens == labels.numel()
    torch.testing.assert_close(torch.cat(grads), r.grad, **GRAD_TOLERANCE[backend])
    assert client.release(remote) == len(remote)
    client.close()


def test_bf16_wire_gradients_within_tolerance(server, local, rng):
    samples = make_samples(rng, 2)
    client = TeacherClient(server.address, wire_dtype=torch.bfloat16, feature_dtype=torch.bfloat16)
    remote = client.encode(samples)
    assert remote[0].answer_segments[0].dtype == torch.bfloat16
    expected = local.encode(samples)
    outputs = [torch.randn(f.num_answer_tokens, client.hidden_size) for f in remote]
    _, grads = client.score(remote, outputs)
    r = torch.cat(outputs).requires_grad_(True)
    labels = torch.cat([f.answer_token_ids for f in expected])
    _, _, loss = reference_loss(local.vlm.head, r, labels, torch.cat([f.prediction_states for f in expected]),
                                1.0, 1.0, labels.numel())
    loss.backward()
    assert grads[0].dtype == torch.float32  # returned in the caller's dtype
    torch.testing.assert_close(torch.cat(grads), r.grad, rtol=2e-2, atol=2e-2 * r.grad.abs().max().item())
    client.close()


def _png(rng) -> bytes:
    buffer = io.BytesIO()
    random_image(rng, 32).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_requests_get_specific_codes_and_server_keeps_serving(server, rng):
    channel = grpc.insecure_channel(server.address, options=channel_options())
    stub = pb2_grpc.TeacherServiceStub(channel)
    good_turns = [pb2.Turn(role="user", text="<image>\nWhat?"), pb2.Turn(role="assistant", text="red")]

    def encode_code(*samples):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Encode(pb2.EncodeRequest(samples=list(samples)), timeout=60))
        return info.value.code(), info.value.details()

    code, details = encode_code(pb2.Sample(sample_id="img", turns=good_turns, images=[b"\x89PNG broken"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'img'" in details and "cannot be decoded" in details
    code, details = encode_code(pb2.Sample(sample_id="empty", turns=[good_turns[0], pb2.Turn(role="assistant", text=" ")],
                                           images=[_png(rng)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'empty'" in details and "empty" in details
    code, details = encode_code(pb2.Sample(sample_id="roles", turns=[pb2.Turn(role="assistant", text="hi")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'roles'" in details
    code, _ = encode_code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    client = TeacherClient(server.address)
    features = client.encode(make_samples(rng, 2, prefix="b"))
    width = client.hidden_size
    n = features[0].num_answer_tokens

    def score_error(outputs, feats=features[:1], **kwargs):
        with pytest.raises(TeacherError) as info:
            client.score(feats, outputs, **kwargs)
        return info.value

    err = score_error([torch.randn(n, width + 1)])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and str(width) in err.details
    err = score_error([torch.randn(n + 1, width)])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    bad = torch.randn(n, width)
    bad[0, 0] = float("nan")
    err = score_error([bad])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in err.details
    err = score_error([torch.zeros(n, width, dtype=torch.int64)])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    err = score_error([torch.randn(n, width)], feats=[type(features[0])(**{**features[0].__dict__, "handle": "nope"})])
    assert isinstance(err, HandleLost) and err.code == grpc.StatusCode.NOT_FOUND
    huge = [type(features[0])(**{**features[0].__dict__})]
    err = score_error([torch.randn(4096, width)], feats=huge)  # 1.5 MiB > --max-request-mib 1
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    pinned = TeacherClient(server.address, expect_revision="some-other-teacher")
    with pytest.raises(TeacherError) as info:
        pinned.info()
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "some-other-teacher" in info.value.details

    client.release(features[:1])
    err = score_error([torch.randn(n, width)])  # released handle
    assert err.code == grpc.StatusCode.NOT_FOUND
    # ... and the server still answers a good request correctly.
    score, grads = client.score(features[1:], [torch.randn(features[1].num_answer_tokens, width)])
    assert torch.isfinite(score.ce) and grads[0].shape == (features[1].num_answer_tokens, width)
    assert server.proc.poll() is None
    client.close()
    channel.close()


def test_two_clients_concurrently_get_their_own_results(server, backend, local, rng):
    sample_sets = [make_samples(rng, 3, prefix="x"), make_samples(rng, 3, prefix="y")]
    results: dict[int, tuple] = {}
    errors = []

    def worker(k):
        try:
            client = TeacherClient(server.address)
            for _ in range(3):
                feats = client.encode(sample_sets[k])
                outputs = [torch.full((f.num_answer_tokens, client.hidden_size), 0.01 * (k + 1)) for f in feats]
                score, grads = client.score(feats, outputs, release=True)
            results[k] = (feats, score, grads, outputs)
            client.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for k in range(2):
        feats, score, grads, outputs = results[k]
        expected = local.encode(sample_sets[k])
        assert [f.sample_id for f in feats] == [f.sample_id for f in expected]
        ref_score, ref_grads = local.score(expected, outputs)
        assert score.ce.item() == pytest.approx(ref_score.ce.item(), rel=1e-5)
        for g, e in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, e, **GRAD_TOLERANCE[backend])


def test_health_serving_then_not_serving_on_sigterm(server, backend):
    """Last in the module (it stops the shared server): after the other tests' traffic, SIGTERM turns health to
    NOT_SERVING and the server exits cleanly."""
    process = server
    assert process.proc.poll() is None, "the shared server died before its SIGTERM"
    channel = grpc.insecure_channel(process.address)
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == serving
    assert health.Check(health_pb2.HealthCheckRequest(service="genrecal.teacher.v1.TeacherService"),
                        timeout=10).status == serving
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == serving
    process.proc.send_signal(signal.SIGTERM)
    statuses = []
    try:
        for update in watch:
            statuses.append(update.status)
    except grpc.RpcError:
        pass  # the stream ends when the server stops
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    assert process.proc.wait(60 if backend == "transformers" else 300) == 0  # vLLM's own shutdown takes ~15-40 s
    assert "teacher server stopped" in process.log
    channel.close()
