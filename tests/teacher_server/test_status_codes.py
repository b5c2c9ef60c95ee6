"""The exception -> status-code mapping as a client sees it, for the failures the other tests cannot provoke.

Every other row of ``teacher_server.errors.status_for`` is provoked for real elsewhere: INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED (limits, message size), FAILED_PRECONDITION in tests/e2e/test_teacher_service.py; UNAVAILABLE in
tests/teacher_server/test_server.py and tests/e2e/test_teacher_hardening.py; UNAUTHENTICATED and CANCELLED in the
latter. Device memory running out and a bug in the server cannot be caused on purpose on a CPU (an allocation failure
there is a plain RuntimeError), so here the real teacher model's first decoder layer raises them from a forward
pre-hook, inside a real engine behind a real gRPC server.
"""

from __future__ import annotations

import logging

import grpc
import pytest
import torch

from genrecal.rpc import pb2, pb2_grpc
from genrecal.wire import channel_options
from teacher_server.config import EngineConfig
from teacher_server.engine import TeacherEngine
from teacher_server.errors import INTERNAL_MESSAGE
from teacher_server.server import create_server


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """(stub, first decoder layer of the served teacher) for a real engine behind a server on a free port."""
    engine = TeacherEngine(EngineConfig(tiny_checkpoint("qwen2_vl", tokenizer="gpt2"), encode_cache_bytes=0))
    running = create_server("127.0.0.1", 0, engine=engine)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}", options=channel_options())
    layer = engine.vlm.adapter.text_model(engine.vlm.model).layers[0]
    yield pb2_grpc.TeacherServiceStub(channel), layer
    channel.close()
    running.shutdown(0)


def encode(stub, sample_id: str) -> tuple[grpc.StatusCode, str]:
    turns = [pb2.Turn(role="user", text="red or blue?"), pb2.Turn(role="assistant", text="red")]
    try:
        list(stub.Encode(pb2.EncodeRequest(samples=[pb2.Sample(sample_id=sample_id, turns=turns)]), timeout=60))
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def failing_forward(layer, exc: BaseException):
    def hook(module, args):
        raise exc

    return layer.register_forward_pre_hook(hook)


def test_device_out_of_memory_is_resource_exhausted_with_advice(served):
    stub, layer = served
    with failing_forward(layer, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        code, details = encode(stub, "oom")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ran out of device memory" in details and "send fewer or shorter samples" in details
    assert "Tried to allocate 2.00 GiB" in details
    assert encode(stub, "after")[0] == grpc.StatusCode.OK  # the server keeps serving


def test_a_bug_is_internal_with_a_generic_message_and_the_traceback_in_the_log(served, caplog):
    stub, layer = served
    with caplog.at_level(logging.ERROR, logger="teacher_server"):
        with failing_forward(layer, KeyError("secret internal detail")):
            code, details = encode(stub, "bug")
    assert code == grpc.StatusCode.INTERNAL
    assert details == INTERNAL_MESSAGE and "secret" not in details  # internals stay in the server's log
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert any("secret internal detail" in str(r.exc_info[1]) for r in logged), caplog.text
    assert encode(stub, "after")[0] == grpc.StatusCode.OK
