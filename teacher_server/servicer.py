"""The gRPC servicer: a thin layer that converts messages and calls the engine.

Every handler runs through :func:`_serving`, the one place where exceptions become status codes
(``teacher_server.errors.status_for``). A bad request gets a specific status and message; the server and other
clients are not disturbed. Unexpected exceptions are INTERNAL and logged with their traceback.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import grpc

from genrecal.rpc import pb2, pb2_grpc
from genrecal.rpc.convert import (
    encode_response_frames,
    samples_from_request,
    score_call_from_frames,
    score_response_frames,
)
from genrecal.wire import DEFAULT_CHUNK_BYTES, proto_dtype, torch_dtype
from teacher_server.errors import IdentityMismatch, ShuttingDown, status_for

logger = logging.getLogger(__name__)

# Clients may pin the teacher they were started with; a different one answers FAILED_PRECONDITION.
EXPECT_REVISION_METADATA = "x-genrecal-expect-revision"


class TeacherServicer(pb2_grpc.TeacherServiceServicer):
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
                    f"revision {expected}; point the client at the teacher it was started with"
                )
        return engine

    def Info(self, request, context):
        with _serving(context, "Info"):
            info = self._ready_engine(context).info()
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

    def Encode(self, request, context):
        with _serving(context, "Encode"):
            engine = self._ready_engine(context)
            samples = samples_from_request(request)
            dtype = torch_dtype(request.feature_dtype) if request.feature_dtype else None
            features = engine.encode(
                samples,
                return_question_features=request.return_question_features,
                max_length=request.max_length or None,
            )
            frames = list(
                encode_response_frames(
                    features, question_features=request.return_question_features, dtype=dtype,
                    chunk_bytes=self._chunk_bytes,
                )
            )
        yield from frames  # outside _serving: a client that hangs up mid-stream is not an error of ours

    def Score(self, request_iterator, context):
        with _serving(context, "Score"):
            engine = self._ready_engine(context)
            call = score_call_from_frames(request_iterator, max_bytes=engine.info().max_request_bytes)
            path_scores, grads = engine.score(
                call.items, ce_weight=call.ce_weight, kl_weight=call.kl_weight, normalizer=call.normalizer,
                release=call.release,
            )
            frames = list(score_response_frames(path_scores, grads, dtype=call.grad_dtype, chunk_bytes=self._chunk_bytes))
        yield from frames

    def Release(self, request, context):
        with _serving(context, "Release"):
            released = self._ready_engine(context).release(list(request.handles))
            return pb2.ReleaseResponse(released=released)


@contextlib.contextmanager
def _serving(context: grpc.ServicerContext, method: str):
    """Map any exception of a handler to its status code (the one place that does)."""
    try:
        yield
    except grpc.RpcError:
        raise  # context.abort() already set the status
    except Exception as exc:  # noqa: BLE001 - the mapping below decides
        code_name, message = status_for(exc)
        if code_name == "INTERNAL":
            logger.exception("%s failed with an unexpected error", method)
        else:
            logger.info("%s refused: %s %s", method, code_name, message)
        context.abort(getattr(grpc.StatusCode, code_name), message)
