"""The gRPC server in this process (no model attached): UNAVAILABLE while loading, health, reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from genrecal.client import TeacherClient, TeacherUnavailable
from genrecal.rpc import pb2, pb2_grpc
from teacher_server.server import SERVICE_NAME, create_server


@pytest.fixture
def bare_server():
    running = create_server("127.0.0.1", 0)
    yield running
    running.shutdown(0)


def test_binds_localhost_free_port_and_answers_unavailable_until_a_model_is_attached(bare_server):
    assert bare_server.port > 0
    channel = grpc.insecure_channel(f"127.0.0.1:{bare_server.port}")
    stub = pb2_grpc.TeacherServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Info(pb2.InfoRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    channel.close()


def test_client_retries_unavailable_then_gives_a_readable_error(bare_server):
    client = TeacherClient(f"127.0.0.1:{bare_server.port}", retries=2, backoff_s=0.01)
    with pytest.raises(TeacherUnavailable, match=r"refused Info: UNAVAILABLE: .*loading"):
        client.info()
    with pytest.raises(TeacherUnavailable, match="not SERVING after"):
        client.wait_until_serving(timeout_s=0.3)
    client.close()


def test_reflection_lists_the_services(bare_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{bare_server.port}")
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    channel.close()


def test_unreachable_teacher_fails_after_bounded_retries():
    client = TeacherClient("127.0.0.1:1", retries=1, backoff_s=0.01, timeout_s=5)
    with pytest.raises(TeacherUnavailable, match="127.0.0.1:1"):
        client.info()
    client.close()
