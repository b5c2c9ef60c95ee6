"""Admission at header time: who calls, whether the call may start, and what became of it.

``AdmissionInterceptor`` is a ``grpc.ServerInterceptor``. gRPC runs it on its polling thread when a call's
headers arrive, before the call gets a worker thread and before its request message is read:

1. A TeacherService call is authenticated from its metadata (``teacher_server.auth``). Without a valid token it
   is answered UNAUTHENTICATED by a handler that never reads the request (it holds a worker for microseconds),
   so half-open calls without a token hold neither a worker nor a ``maximum_concurrent_rpcs`` slot, and their
   request bodies are never read into memory.
2. Every handler is re-registered as request-streaming, so that its worker starts as soon as the headers are in
   (gRPC reads a unary request whole before it runs a unary handler). The call is admitted against the limits
   (``teacher_server.limits``: calls in all, calls per client) *before* its message is read, and the message is
   read under the stalled-stream cut-off: a call that never sends its message is cancelled after
   ``--stream-idle-s``, like a stalled Score stream.
3. It is the one place where exceptions become status codes (``teacher_server.errors.status_for``) and where
   each TeacherService call's status, latency and bytes are counted (``teacher_server.metrics``). The servicer
   methods only convert messages and call the engine: they take ``(request, scope)`` (a ``CallScope``).

The health and reflection services need no token (orchestrators probe health without one; docs/teacher_server.md)
but are admitted the same way, as calls of the peer's IP address under their own small budget
(``CallLimits.max_open_calls``, ``OPEN_CALLS_PER_PEER``), so half-open health checks cannot take TeacherService
slots either.

Without a token file a client is its TLS client certificate's common name (mTLS) or else its peer's IP address
(``ipv4:10.0.0.5``, without the port: a machine opening many connections is one client for the per-client
limits and the handle store's shares).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from genrecal.errors import SampleError
from genrecal.rpc.metadata import REFUSED_SAMPLE_METADATA
from teacher_server.auth import MAX_NAME_BYTES, TokenAuth
from teacher_server.errors import InvalidRequest, SampleTooLarge, Unauthenticated, status_for
from teacher_server.limits import Call, CallTracker

logger = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL_S = 10.0  # refusals without a token are logged at most this often (with their count)


@dataclass(frozen=True)
class CallScope:
    """What a TeacherService method learns about its call: the client (owner of its handles), the admitted
    call (its deadline and byte budget) and the call's metadata."""

    client: str
    call: Call
    metadata: dict


def peer_client(peer: str) -> str:
    """The client name of an unauthenticated peer: its address without the port (``ipv4:10.0.0.5``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        rest = rest.rpartition(":")[0]  # ipv6 keeps its brackets: "[::1]"
    return f"{kind}:{rest}"[:MAX_NAME_BYTES]


class AdmissionInterceptor(grpc.ServerInterceptor):
    def __init__(self, service: str, *, tracker: CallTracker, auth: TokenAuth | None = None, metrics=None):
        self._service = service  # full name of the service whose methods take (request, CallScope)
        self._tracker = tracker
        self._auth = auth
        self._metrics = metrics
        self._refusals_lock = threading.Lock()
        self._refused, self._refusals_logged_at = 0, 0.0

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        scoped = service == self._service
        metadata = dict(handler_call_details.invocation_metadata or ())
        client = None
        if scoped and self._auth is not None:
            try:
                client = self._auth.client_for(metadata)
            except Unauthenticated as exc:
                self._refused_unauthenticated(method)
                return _refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return _AdmittedCall(self, handler, method, scoped, client, metadata).handler()

    def _refused_unauthenticated(self, method: str) -> None:
        if self._metrics is not None:
            self._metrics.observe_call(method, "UNAUTHENTICATED", 0.0)
        now = time.monotonic()
        with self._refusals_lock:
            self._refused += 1
            if now - self._refusals_logged_at < REFUSAL_LOG_INTERVAL_S:
                return
            refused, self._refused, self._refusals_logged_at = self._refused, 0, now
        logger.warning("refused %d call(s) without a valid token (the latest: %s) in the last %.0f s",
                       refused, method, REFUSAL_LOG_INTERVAL_S)


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses the call without reading its request (request-streaming: nothing is awaited)."""
    def refuse(_request_iterator, context):
        context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)


class _AdmittedCall:
    """One call between its headers and its end: admission, the request read under the stall cut-off, the
    behavior, the status mapping and the metrics."""

    def __init__(self, interceptor: AdmissionInterceptor, handler: grpc.RpcMethodHandler, method: str,
                 scoped: bool, client: str | None, metadata: dict):
        self._owner, self._handler, self._method = interceptor, handler, method
        self._scoped, self._client, self._metadata = scoped, client, metadata
        self._start = time.monotonic()  # the headers' arrival
        self._observed = False
        self._scope: CallScope | None = None  # once admitted
        self._foreign = False  # running another service's behavior (health, reflection)

    def handler(self) -> grpc.RpcMethodHandler:
        h = self._handler
        behavior = h.unary_unary or h.unary_stream or h.stream_unary or h.stream_stream
        if h.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: self._stream(behavior, requests, context),
                request_deserializer=h.request_deserializer, response_serializer=h.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            lambda requests, context: self._unary(behavior, requests, context),
            request_deserializer=h.request_deserializer, response_serializer=h.response_serializer)

    # ---- the two shapes of response ----------------------------------------------------------------------------

    def _unary(self, behavior: Callable, requests: Iterator, context):
        try:
            return self._run(behavior, requests, context)
        except grpc.RpcError:
            self._observe("CANCELLED")
            raise  # cancelled (client gone, or cut by the reaper)
        except Exception as exc:  # noqa: BLE001 - the mapping decides
            if self._foreign:
                raise  # health / reflection: their own statuses (context.abort) stand
            self._abort(context, exc)
        finally:
            self._observe("OK")

    def _stream(self, behavior: Callable, requests: Iterator, context):
        try:
            responses = iter(self._run(behavior, requests, context))
            first = next(responses, None)  # the work is done once the first response exists
        except grpc.RpcError:
            self._observe("CANCELLED")
            raise
        except Exception as exc:  # noqa: BLE001
            if self._foreign:
                raise
            self._abort(context, exc)
        self._observe("OK")
        if first is None:
            return
        call = self._scope.call if self._scope is not None else None
        try:
            response = first
            while response is not None:
                if call is not None:
                    call.stream(True)  # blocked on the client reading: a client that stops reading gets cut
                yield response
                if call is not None:
                    call.stream(False)
                if self._scoped and self._owner._metrics is not None:
                    self._owner._metrics.bytes_sent.inc(response.ByteSize())
                response = next(responses, None)
        except grpc.RpcError:
            raise  # a client that hangs up while receiving is not our error
        except Exception as exc:  # noqa: BLE001 - a response that fails to build after the first one
            if self._foreign:
                raise
            self._abort(context, exc, observed=True)

    # ---- plumbing ------------------------------------------------------------------------------------------------

    def _run(self, behavior: Callable, requests: Iterator, context):
        client = self._client or _unauthenticated_client(context)
        call = self._owner._tracker.admit(client, self._method, context, open_call=not self._scoped)
        self._scope = CallScope(client, call, self._metadata)
        if self._handler.request_streaming:
            request = self._watched(requests, call)
        else:
            request = self._single(requests, call)
        if self._scoped:
            return behavior(request, self._scope)
        self._foreign = True
        return behavior(request, context)

    def _single(self, requests: Iterator, call: Call):
        """The one request message of a unary-request method, read under the stall cut-off."""
        call.stream(True)
        request = next(requests, None)
        call.stream(False)
        if request is None:
            raise InvalidRequest(f"the {self._method} call ended without its request message")
        self._received(request, call)
        return request

    def _watched(self, requests: Iterator, call: Call) -> Iterator:
        """A request stream whose waits count as streaming (a client that stops sending gets cut)."""
        while True:
            call.stream(True)
            request = next(requests, None)
            call.stream(False)
            if request is None:
                return
            self._received(request, call, hold=False)  # the servicer holds what it keeps of a stream
            yield request

    def _received(self, request, call: Call, *, hold: bool = True) -> None:
        if not (self._scoped and isinstance(request, bytes)):
            return
        if hold:
            call.hold(len(request))
        if self._owner._metrics is not None:
            self._owner._metrics.bytes_received.inc(len(request))

    def _abort(self, context, exc: Exception, *, observed: bool = False):
        code, message = status_for(exc)
        client = self._scope.client if self._scope is not None else "?"
        if code == "INTERNAL":
            logger.exception("%s from %s failed with an unexpected error", self._method, client)
        else:  # handles and sample ids stay out of INFO logs
            logger.info("%s from %s refused: %s (%s)", self._method, client, code, type(exc).__name__)
            logger.debug("%s refusal message: %s", self._method, message)
        if not observed:
            self._observe(code)
        if isinstance(exc, SampleError | SampleTooLarge):  # one sample's fault: the client may skip just that one
            context.set_trailing_metadata(((REFUSED_SAMPLE_METADATA, exc.sample_id.encode("utf-8")),))
        context.abort(getattr(grpc.StatusCode, code), message)

    def _observe(self, code: str) -> None:
        """Count the call once, with its status and the time until its response was ready."""
        if self._observed:
            return
        self._observed = True
        if self._scoped and self._owner._metrics is not None:
            self._owner._metrics.observe_call(self._method, code, time.monotonic() - self._start)


def _unauthenticated_client(context) -> str:
    auth_context = context.auth_context()
    common_names = auth_context.get("x509_common_name") if auth_context else None
    if common_names:
        return "cn:" + common_names[0].decode(errors="replace")[:MAX_NAME_BYTES]
    return peer_client(context.peer())
