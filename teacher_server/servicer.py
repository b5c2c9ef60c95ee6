"""The gRPC servicer: a thin layer that checks who calls, admits the call, converts messages and calls the engine.

The methods are registered with no deserializer (``teacher_server.server``): handlers get the raw request bytes
and parse them here, so bytes that are not a valid message are INVALID_ARGUMENT like any other bad request
(gRPC's own deserializer would answer INTERNAL). Every handler runs through ``_serving``, the one place where the
client is identified (``teacher_server.auth``), the call admitted against the limits
(``teacher_server.limits``), and exceptions become status codes (``teacher_server.errors.status_for``). A bad
request gets a specific status and message; the server and other clients are not disturbed. Unexpected
exceptions are INTERNAL and logged with their traceback.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from genrecal.rpc import pb2
from genrecal.rpc.convert import (
    encode_response_frames,
    samples_from_request,
    score_call_from_frames,
    score_response_frames,
)
from genrecal.wire import DEFAULT_CHUNK_BYTES, float_dtype, proto_dtype
from teacher_server.auth import TokenAuth, client_name
from teacher_server.errors import IdentityMismatch, InvalidRequest, ShuttingDown, status_for
from teacher_server.limits import Call, CallLimits, CallTracker

logger = logging.getLogger(__name__)

# Clients may pin the teacher they were started with; a different one answers FAILED_PRECONDITION.
EXPECT_REVISION_METADATA = "x-genrecal-expect-revision"


@dataclass
class _Scope:
    engine: object
    client: str
    call: Call


class TeacherServicer:
    def __init__(
        self,
        engine=None,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        auth: TokenAuth | None = None,
        tracker: CallTracker | None = None,
        metrics=None,
    ):
        self._engine = engine  # None while the model loads: calls answer UNAVAILABLE
        self._chunk_bytes = chunk_bytes
        self._auth = auth
        self._tracker = tracker if tracker is not None else CallTracker(CallLimits())
        self._metrics = metrics  # teacher_server.metrics.ServiceMetrics or None
        self._lock = threading.Lock()

    def attach(self, engine) -> None:
        with self._lock:
            self._engine = engine

    def detach(self):
        with self._lock:
            engine, self._engine = self._engine, None
        return engine

    @property
    def tracker(self) -> CallTracker:
        return self._tracker

    # ---- handlers (raw request bytes in, messages out) ------------------------------------------------------

    def Info(self, request: bytes, context):
        with self._serving(context, "Info") as scope:
            _parse(pb2.InfoRequest, request, "InfoRequest")
            info = scope.engine.info()
            return pb2.InfoResponse(
                model_name=info.model_name,
                model_revision=info.model_revision,
                architecture=info.architecture,
                model_type=info.model_type,
                hidden_size=info.hidden_size,
                vocab_size=info.vocab_size,
                dtype=proto_dtype(info.dtype),
                tokenizer_name=info.tokenizer_name,
                tokenizer_size=info.tokenizer_size,
                tokenizer_fingerprint=info.tokenizer_fingerprint,
                server_version=info.server_version,
                max_batch_tokens=info.max_batch_tokens,
                max_request_bytes=info.max_request_bytes,
                backend=info.backend,
                instance_id=info.instance_id,
            )

    def Encode(self, request: bytes, context):
        with self._serving(context, "Encode") as scope:
            scope.call.hold(len(request))
            self._count_in(len(request))
            message = _parse(pb2.EncodeRequest, request, "EncodeRequest")
            samples = samples_from_request(message)
            dtype = float_dtype(message.feature_dtype, what="feature_dtype") if message.feature_dtype else None
            features = scope.engine.encode(
                samples,
                return_question_features=message.return_question_features,
                max_length=message.max_length or None,
                client=scope.client,
                timeout_s=scope.call.remaining_s(),
            )
            frames = list(
                encode_response_frames(
                    features, question_features=message.return_question_features, dtype=dtype,
                    chunk_bytes=self._chunk_bytes,
                )
            )
            scope.call.hold(sum(frame.ByteSize() for frame in frames))
        yield from self._send(scope.call, frames)  # outside _serving: a client that hangs up is not our error

    def Score(self, request_iterator: Iterable[bytes], context):
        with self._serving(context, "Score") as scope:
            frames = self._receive(scope.call, request_iterator)
            call = score_call_from_frames(
                frames, max_bytes=scope.engine.info().max_request_bytes, on_chunk=scope.call.hold
            )
            scope.call.stream(False)  # received: device time is not a stall
            path_scores, grads = scope.engine.score(
                call.items, ce_weight=call.ce_weight, kl_weight=call.kl_weight, normalizer=call.normalizer,
                release=call.release, client=scope.client, timeout_s=scope.call.remaining_s(),
            )
            frames = list(score_response_frames(path_scores, grads, dtype=call.grad_dtype, chunk_bytes=self._chunk_bytes))
            scope.call.hold(sum(frame.ByteSize() for frame in frames))
        yield from self._send(scope.call, frames)

    def Release(self, request: bytes, context):
        with self._serving(context, "Release") as scope:
            message = _parse(pb2.ReleaseRequest, request, "ReleaseRequest")
            for n, handle in enumerate(message.handles):
                if len(handle.encode()) > 256:
                    raise InvalidRequest(f"handle {n} is longer than 256 bytes")
            released = scope.engine.release(list(message.handles), client=scope.client)
            return pb2.ReleaseResponse(released=released)

    # ---- plumbing -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _serving(self, context: grpc.ServicerContext, method: str):
        """Identify, admit, run; map any exception to its status code (the one place that does)."""
        start = time.monotonic()
        code_name, client = "OK", "?"
        try:
            client = client_name(context, self._auth)
            engine = self._ready_engine(context)
            call = self._tracker.admit(client, method, context)
            yield _Scope(engine, client, call)
        except grpc.RpcError:
            code_name = "CANCELLED"
            raise  # the call was cancelled (client gone, or cut by the reaper) or already aborted
        except Exception as exc:  # noqa: BLE001 - the mapping below decides
            code_name, message = status_for(exc)
            if code_name == "INTERNAL":
                logger.exception("%s from %s failed with an unexpected error", method, client)
            else:  # handles and sample ids stay out of INFO logs
                logger.info("%s from %s refused: %s (%s)", method, client, code_name, type(exc).__name__)
                logger.debug("%s refusal message: %s", method, message)
            context.abort(getattr(grpc.StatusCode, code_name), message)
        finally:
            if self._metrics is not None:
                self._metrics.observe_call(method, code_name, time.monotonic() - start)

    def _ready_engine(self, context: grpc.ServicerContext):
        engine = self._engine
        if engine is None:
            raise ShuttingDown("the teacher is not serving (still loading its model, or shutting down); retry shortly")
        expected = dict(context.invocation_metadata()).get(EXPECT_REVISION_METADATA)
        if expected:
            info = engine.info()
            if expected != info.model_revision:
                raise IdentityMismatch(
                    f"this teacher is {info.model_name!r} revision {info.model_revision}, but the client expects "
                    f"revision {expected[:64]}; point the client at the teacher it was started with"
                )
        return engine

    def _receive(self, call: Call, request_iterator: Iterable[bytes]) -> Iterator[pb2.ScoreRequestFrame]:
        """Parse the stream's frames as they come, marking progress (a stalled stream gets cut)."""
        call.stream(True)
        for n, data in enumerate(request_iterator):
            call.progress()
            self._count_in(len(data))
            yield _parse(pb2.ScoreRequestFrame, data, f"ScoreRequestFrame {n}")

    def _send(self, call: Call, frames: list) -> Iterator:
        call.stream(True)
        for frame in frames:
            yield frame
            call.progress()
            if self._metrics is not None:
                self._metrics.bytes_sent.inc(frame.ByteSize())
        call.stream(False)

    def _count_in(self, nbytes: int) -> None:
        if self._metrics is not None:
            self._metrics.bytes_received.inc(nbytes)


def _parse(message_type, data: bytes, what: str):
    try:
        return message_type.FromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise InvalidRequest(f"the request bytes are not a valid {what} message ({exc})") from None
