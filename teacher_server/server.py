"""Server lifecycle: build the gRPC server, load the model, serve, and shut down cleanly on SIGTERM.

``create_server`` binds and starts a server whose health is NOT_SERVING and whose TeacherService answers
UNAVAILABLE until an engine is attached; ``serve`` loads the model, attaches it and flips health to SERVING.
On SIGTERM/SIGINT: health NOT_SERVING, stop accepting new calls, let in-flight calls finish (grace period), then
free the model.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genrecal.rpc import pb2, pb2_grpc
from genrecal.wire import channel_options
from teacher_server.servicer import TeacherServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["TeacherService"].full_name  # "genrecal.teacher.v1.TeacherService"


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    servicer: TeacherServicer
    health: health.HealthServicer

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def shutdown(self, grace_s: float = 30.0) -> None:
        """NOT_SERVING, stop accepting, finish in-flight calls (up to ``grace_s``), then close the engine."""
        self.set_serving(False)
        logger.info("shutting down: no new calls; waiting up to %.0f s for in-flight calls", grace_s)
        self.server.stop(grace_s).wait()
        engine = self.servicer.detach()
        if engine is not None:
            engine.close()
        logger.info("teacher server stopped")


def create_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    engine=None,
    max_workers: int = 16,
    max_message_bytes: int = 64 << 20,
) -> RunningServer:
    """Bind ``host:port`` (0 = a free port) and start serving health, reflection and TeacherService."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="teacher-rpc"),
        options=channel_options(max_message_bytes),
    )
    servicer = TeacherServicer(engine)
    pb2_grpc.add_TeacherServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the teacher server to {host}:{port} (address in use or not available)")
    server.start()
    running = RunningServer(server=server, port=bound, servicer=servicer, health=health_servicer)
    running.set_serving(engine is not None)
    return running


def serve(engine_config, *, host: str = "127.0.0.1", port: int = 50051, grace_s: float = 30.0,
          max_workers: int = 16, max_message_bytes: int = 64 << 20) -> None:
    """Run until SIGTERM/SIGINT: listen first (health NOT_SERVING), load the model, then SERVING."""
    from teacher_server.engine import TeacherEngine

    running = create_server(host, port, max_workers=max_workers, max_message_bytes=max_message_bytes)
    logger.info("listening on %s:%d (health NOT_SERVING while the model loads)", host, running.port)
    stop = threading.Event()
    loading = True

    def on_signal(signum, _frame):
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()
        if loading:  # don't make the orchestrator wait for a 72B load to finish: abandon it now
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        engine = TeacherEngine(engine_config)
    except KeyboardInterrupt:
        logger.info("stopped while loading the model")
        running.shutdown(0)
        return
    except BaseException:
        running.shutdown(0)
        raise
    loading = False
    running.servicer.attach(engine)
    running.set_serving(True)
    info = engine.info()
    logger.info(
        "serving %s (%s, revision %s, hidden %d, vocab %d, %s) on %s:%d",
        info.model_name, info.architecture, info.model_revision[:12], info.hidden_size, info.vocab_size,
        str(info.dtype).replace("torch.", ""), host, running.port,
    )
    print(f"teacher server ready on {host}:{running.port}", flush=True)
    stop.wait()
    running.shutdown(grace_s)
