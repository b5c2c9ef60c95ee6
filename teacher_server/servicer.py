"""The gRPC servicer: converts messages and calls the engine; nothing else.

Its methods take ``(request, scope)``: the admission interceptor (``teacher_server.admission``) has already
authenticated the caller, admitted the call against the limits, read the request under the stalled-stream
cut-off, and it maps whatever a method raises to a status code and counts the call in the metrics. The methods
are registered with no deserializer (``teacher_server.server``): they get the raw request bytes and parse them
here, so bytes that are not a valid message are INVALID_ARGUMENT like any other bad request (gRPC's own
deserializer would answer INTERNAL).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator

from google.protobuf.message import DecodeError

from genrecal.rpc import pb2
from genrecal.rpc.convert import (
    encode_response_frames,
    samples_from_request,
    score_call_from_frames,
    score_response_frames,
)
from genrecal.rpc.metadata import EXPECT_REVISION_METADATA
from genrecal.wire import DEFAULT_CHUNK_BYTES, float_dtype, proto_dtype
from teacher_server.admission import CallScope
from teacher_server.errors import IdentityMismatch, InvalidRequest, ShuttingDown

# Clients may pin the teacher they were started with; a different one answers FAILED_PRECONDITION.


class TeacherServicer:
    def __init__(self, engine=None, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self._engine = engine  # None while the model loads: calls answer UNAVAILABLE
        self._chunk_bytes = chunk_bytes
        self._lock = threading.Lock()

    def attach(self, engine) -> None:
        with self._lock:
            self._engine = engine

    def detach(self):
        with self._lock:
            engine, self._engine = self._engine, None
        return engine

    # ---- handlers (raw request bytes in, messages out) ------------------------------------------------------

    def Info(self, request: bytes, scope: CallScope) -> pb2.InfoResponse:
        engine = self._ready_engine(scope)
        _parse(pb2.InfoRequest, request, "InfoRequest")
        info = engine.info()
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
            image_options={name: json.dumps(value) for name, value in info.image_options.items()},
            max_encode_samples=info.request_limits.max_encode_samples,
            max_text_bytes=info.request_limits.max_text_bytes,
            max_turns=info.request_limits.max_turns,
            max_score_items=info.request_limits.max_score_items,
            max_score_paths=info.request_limits.max_score_paths,
        )

    def Encode(self, request: bytes, scope: CallScope) -> list[pb2.EncodeResponseFrame]:
        engine = self._ready_engine(scope)
        message = _parse(pb2.EncodeRequest, request, "EncodeRequest")
        samples = samples_from_request(message)
        dtype = float_dtype(message.feature_dtype, what="feature_dtype") if message.feature_dtype else None
        features = engine.encode(
            samples,
            return_question_features=message.return_question_features,
            max_length=message.max_length or None,
            client=scope.client,
            timeout_s=scope.call.remaining_s(),
            cancellation=scope.call.cancellation,
        )
        frames = list(
            encode_response_frames(
                features, question_features=message.return_question_features, dtype=dtype,
                chunk_bytes=self._chunk_bytes,
            )
        )
        scope.call.hold(sum(frame.ByteSize() for frame in frames))
        return frames

    def Score(self, request_frames: Iterable[bytes], scope: CallScope) -> list[pb2.ScoreResponseFrame]:
        engine = self._ready_engine(scope)
        call = score_call_from_frames(
            _parse_frames(request_frames), max_bytes=engine.info().max_request_bytes, on_chunk=scope.call.hold
        )
        path_scores, grads = engine.score(
            call.items, ce_weight=call.ce_weight, kl_weight=call.kl_weight, normalizer=call.normalizer,
            release=call.release, client=scope.client, timeout_s=scope.call.remaining_s(), grad_dtype=call.grad_dtype,
            cancellation=scope.call.cancellation,
        )
        frames = list(score_response_frames(path_scores, grads, dtype=call.grad_dtype, chunk_bytes=self._chunk_bytes))
        scope.call.hold(sum(frame.ByteSize() for frame in frames))
        return frames

    def Release(self, request: bytes, scope: CallScope) -> pb2.ReleaseResponse:
        engine = self._ready_engine(scope)
        message = _parse(pb2.ReleaseRequest, request, "ReleaseRequest")
        for n, handle in enumerate(message.handles):
            if len(handle.encode()) > 256:
                raise InvalidRequest(f"handle {n} is longer than 256 bytes")
        released = engine.release(list(message.handles), client=scope.client)
        return pb2.ReleaseResponse(released=released)

    # ---- plumbing -------------------------------------------------------------------------------------------

    def _ready_engine(self, scope: CallScope):
        engine = self._engine
        if engine is None:
            raise ShuttingDown("the teacher is not serving (still loading its model, or shutting down); retry shortly")
        expected = scope.metadata.get(EXPECT_REVISION_METADATA)
        if expected:
            info = engine.info()
            if expected != info.model_revision:
                raise IdentityMismatch(
                    f"this teacher is {info.model_name!r} revision {info.model_revision}, but the client expects "
                    f"revision {expected[:64]}; point the client at the teacher it was started with"
                )
        return engine


def _parse_frames(request_frames: Iterable[bytes]) -> Iterator[pb2.ScoreRequestFrame]:
    for n, data in enumerate(request_frames):
        yield _parse(pb2.ScoreRequestFrame, data, f"ScoreRequestFrame {n}")


def _parse(message_type, data: bytes, what: str):
    try:
        return message_type.FromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise InvalidRequest(f"the request bytes are not a valid {what} message ({exc})") from None
