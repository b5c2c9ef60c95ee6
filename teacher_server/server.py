"""Server lifecycle: build the gRPC server, load the model, serve, and shut down cleanly on SIGTERM.

``create_server`` binds and starts a server whose health is NOT_SERVING and whose TeacherService answers
UNAVAILABLE until an engine is attached; ``serve`` loads the model, attaches it and flips health to SERVING.
On SIGTERM/SIGINT: health NOT_SERVING, stop accepting new calls, let in-flight calls finish (grace period), then
free the model. On SIGHUP the auth token file is re-read.

The TeacherService methods are registered by hand (``_service_handler``) with no request deserializer, so that
the servicer parses the bytes itself and answers INVALID_ARGUMENT for garbage (see ``servicer``). Every call
first goes through the admission interceptor (``teacher_server.admission``): authentication at header time,
admission before the request is read, status mapping and metrics. The worker pool has room for ``max_calls``
TeacherService calls, ``max_open_calls`` health / reflection calls, and some spare threads for refusing calls
(a refusal holds a thread for microseconds).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genrecal.rpc import pb2
from genrecal.rpc.metadata import SERVICE_NAME
from genrecal.wire import channel_options, message_limit
from teacher_server.admission import AdmissionInterceptor
from teacher_server.auth import TokenAuth
from teacher_server.limits import CallLimits, CallTracker
from teacher_server.metrics import ServiceMetrics
from teacher_server.servicer import TeacherServicer

logger = logging.getLogger(__name__)

SPARE_WORKERS = 8  # threads beyond max_calls + max_open_calls: refusing calls (without a token, over the limits)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key; with ``client_ca``, clients must present a
    certificate it signed (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        try:
            cert, key = Path(self.cert).read_bytes(), Path(self.key).read_bytes()
            client_ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        except OSError as exc:
            raise ValueError(f"cannot read a TLS file: {exc}") from exc
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    servicer: TeacherServicer
    health: health.HealthServicer
    tracker: CallTracker
    metrics: ServiceMetrics
    metrics_port: int | None = None
    _metrics_http: object = None

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def shutdown(self, grace_s: float = 30.0) -> None:
        """NOT_SERVING, stop accepting, finish in-flight calls (up to ``grace_s``), then close the engine."""
        self.set_serving(False)
        logger.info("shutting down: no new calls; waiting up to %.0f s for in-flight calls", grace_s)
        self.server.stop(grace_s).wait()
        self.tracker.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        engine = self.servicer.detach()
        if engine is not None:
            engine.close()
        logger.info("teacher server stopped")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    engine=None,
    limits: CallLimits | None = None,
    auth: TokenAuth | None = None,
    tls: TlsFiles | None = None,
    allow_unauthenticated: bool = False,
    max_request_bytes: int = 256 << 20,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> RunningServer:
    """Bind ``host:port`` (0 = a free port) and start serving health, reflection and TeacherService.

    Without ``auth`` only a loopback ``host`` is accepted unless ``allow_unauthenticated``: anyone who can reach
    the port could otherwise use (and fill) the teacher. ``metrics_port`` (0 = a free one) serves Prometheus text.
    """
    if auth is None and not is_loopback(host) and not allow_unauthenticated:
        raise ValueError(
            f"refusing to serve {host!r} without authentication: pass --auth-token-file FILE (lines 'CLIENT_NAME "
            "TOKEN'), bind 127.0.0.1, or pass --allow-unauthenticated if a firewall or private network protects it"
        )
    limits = limits or CallLimits()
    tracker = CallTracker(limits)
    metrics = ServiceMetrics(authenticated=auth is not None)
    metrics.watch(tracker=tracker, engine=engine)
    max_workers = limits.max_calls + limits.max_open_calls + SPARE_WORKERS
    options = channel_options(message_limit(max_request_bytes)) + [
        ("grpc.max_connection_idle_ms", int(limits.max_connection_idle_s * 1000) or (1 << 31) - 1),
    ]
    if limits.max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", int(limits.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(limits.call_timeout_s * 1000)),
        ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="teacher-rpc"),
        options=options,
        maximum_concurrent_rpcs=max_workers,  # beyond the pool: RESOURCE_EXHAUSTED from gRPC, never a queue
        interceptors=[AdmissionInterceptor(SERVICE_NAME, tracker=tracker, auth=auth, metrics=metrics)],
    )
    servicer = TeacherServicer(engine)
    server.add_generic_rpc_handlers((_service_handler(servicer),))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind the teacher server to {host}:{port} (address in use or not available)")
    server.start()
    running = RunningServer(server=server, port=bound, servicer=servicer, health=health_servicer, tracker=tracker,
                            metrics=metrics)
    if metrics_port is not None:
        http_server, _ = metrics.serve(metrics_port, metrics_host)
        running._metrics_http = http_server
        running.metrics_port = http_server.server_address[1]
    running.set_serving(engine is not None)
    return running


def _service_handler(servicer: TeacherServicer) -> grpc.GenericRpcHandler:
    """TeacherService with raw-bytes requests (the servicer parses them) and protobuf responses.

    The servicer's methods take ``(request, CallScope)``: only the admission interceptor calls them."""
    handlers = {
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, response_serializer=pb2.InfoResponse.SerializeToString),
        "Encode": grpc.unary_stream_rpc_method_handler(
            servicer.Encode, response_serializer=pb2.EncodeResponseFrame.SerializeToString),
        "Score": grpc.stream_stream_rpc_method_handler(
            servicer.Score, response_serializer=pb2.ScoreResponseFrame.SerializeToString),
        "Release": grpc.unary_unary_rpc_method_handler(
            servicer.Release, response_serializer=pb2.ReleaseResponse.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def serve(engine_config, *, host: str = "127.0.0.1", port: int = 50051, grace_s: float = 30.0, **server_options) -> None:
    """Run until SIGTERM/SIGINT: listen first (health NOT_SERVING), load the model, then SERVING.

    ``server_options`` go to ``create_server`` (limits, auth, tls, allow_unauthenticated, metrics_port, ...).
    """
    from teacher_server.engine import TeacherEngine

    running = create_server(host, port, max_request_bytes=engine_config.max_request_bytes, **server_options)
    auth, tls = server_options.get("auth"), server_options.get("tls")
    logger.info(
        "listening on %s:%d (%s, %s; health NOT_SERVING while the model loads)", host, running.port,
        "TLS" + (" with client certificates (mTLS)" if tls.client_ca else "") if tls else "plaintext",
        f"{len(auth.clients)} clients with tokens" if auth else
        "NO AUTHENTICATION" + ("" if is_loopback(host) else " (--allow-unauthenticated)"),
    )
    if running.metrics_port is not None:
        logger.info("metrics on http://%s:%d/metrics", server_options.get("metrics_host", "127.0.0.1"),
                    running.metrics_port)
    stop = threading.Event()
    loading = True

    def on_signal(signum, _frame):
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()
        if loading:  # don't make the orchestrator wait for a 72B load to finish: abandon it now
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if auth is not None:
        signal.signal(signal.SIGHUP, lambda _signum, _frame: auth.reload())
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
    running.metrics.watch(engine=engine)
    running.set_serving(True)
    info = engine.info()
    logger.info(
        "serving %s (%s, revision %s, hidden %d, vocab %d, %s) on %s:%d",
        info.model_name, info.architecture, info.model_revision[:12], info.hidden_size, info.vocab_size,
        str(info.dtype).replace("torch.", ""), host, running.port,
    )
    ready = f"teacher server ready on {host}:{running.port}"
    if running.metrics_port is not None:
        ready += f" metrics {running.metrics_port}"
    print(ready, flush=True)
    stop.wait()
    running.shutdown(grace_s)
