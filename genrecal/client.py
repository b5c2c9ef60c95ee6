"""The student's side of the teacher service: a client with the same methods as ``InProcessTeacher``.

``TeacherClient(address).encode(samples)`` returns ``TeacherFeatures`` whose prediction states stay on the server
(under ``handle``); ``score(features, outputs, ...)`` returns the same ``(HeadScore, per-sample gradients)`` as the
in-process teacher, so ``genrecal.distill.genrecal_objective`` runs unchanged against either.

Every call has a deadline. UNAVAILABLE (teacher loading, restarting or shutting down; connection refused) is
retried with exponential backoff up to ``retries`` times; other errors surface at once as ``TeacherError`` with
the status code and the server's message. After a teacher restart, handles are gone: ``score`` raises
``HandleLost`` (NOT_FOUND) and the caller re-encodes.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrecal.head_scoring import HeadScore
from genrecal.identity import teacher_identity
from genrecal.rpc import pb2, pb2_grpc
from genrecal.rpc.convert import (
    ScoreCall,
    features_from_frames,
    sample_to_proto,
    score_request_frames,
    score_result_from_frames,
)
from genrecal.sample import Sample
from genrecal.teacher import TeacherFeatures
from genrecal.wire import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    PayloadTooLarge,
    channel_options,
    proto_dtype,
)

logger = logging.getLogger(__name__)

EXPECT_REVISION_METADATA = "x-genrecal-expect-revision"  # must match teacher_server.servicer
SERVICE_NAME = "genrecal.teacher.v1.TeacherService"
TOKEN_ENV = "GENRECAL_TEACHER_TOKEN"  # the client's bearer token when no token file is given
DEFAULT_MAX_RESPONSE_BYTES = 8 << 30  # largest response payload the client accepts (a fake size is refused)


class TeacherError(RuntimeError):
    """The teacher refused or failed a call; ``code`` is the gRPC status code."""

    def __init__(self, address: str, method: str, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details
        super().__init__(f"teacher at {address} refused {method}: {code.name}: {details}")


class HandleLost(TeacherError):
    """NOT_FOUND: the teacher no longer holds these handles (evicted or restarted); re-encode the samples."""


class TeacherUnavailable(TeacherError):
    """UNAVAILABLE after every retry: the teacher is down, loading, or unreachable."""


def image_bytes(image) -> bytes:
    """A PIL image as PNG bytes (lossless, so the teacher sees exactly the student's pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class TeacherClient:
    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 600.0,
        retries: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 15.0,
        question_features: bool = True,
        feature_dtype: torch.dtype | None = None,
        wire_dtype: torch.dtype | None = None,
        expect_revision: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        path: str = "L",
        token: str | None = None,
        token_file: str | Path | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        """``token`` / ``token_file`` (a file holding the token) / $GENRECAL_TEACHER_TOKEN, in that order of
        preference, is sent as ``authorization: Bearer TOKEN``. ``tls_ca`` (PEM) turns on TLS and verifies the
        server against it; ``tls_cert`` + ``tls_key`` present a client certificate (mTLS)."""
        if ":" not in address:
            raise ValueError(f"teacher address must be HOST:PORT, got {address!r}")
        self.address = address
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.question_features = question_features
        self.feature_dtype, self.wire_dtype = feature_dtype, wire_dtype
        self.expect_revision = expect_revision
        self.chunk_bytes = chunk_bytes
        self.path = path
        self.max_response_bytes = max_response_bytes
        self._token = resolve_token(token, token_file)
        credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        options = channel_options(max_message_bytes)
        self._channel = (grpc.secure_channel(address, credentials, options=options) if credentials is not None
                         else grpc.insecure_channel(address, options=options))
        self._stub = pb2_grpc.TeacherServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._info: pb2.InfoResponse | None = None

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def _metadata(self):
        metadata = []
        if self.expect_revision:
            metadata.append((EXPECT_REVISION_METADATA, self.expect_revision))
        if self._token:
            metadata.append(("authorization", f"Bearer {self._token}"))
        return tuple(metadata) or None

    def _call(self, method: str, fn: Callable[[], object]):
        """Run ``fn`` with retries on UNAVAILABLE (exponential backoff with jitter); map errors."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    logger.warning("teacher %s unavailable for %s (%s); retry %d/%d in %.1f s",
                                   self.address, method, details, attempt + 1, self.retries, delay)
                    time.sleep(delay * (0.75 + 0.5 * random.random()))
                    delay = min(delay * 2, self.max_backoff_s)
                    continue
                cls = {grpc.StatusCode.NOT_FOUND: HandleLost, grpc.StatusCode.UNAVAILABLE: TeacherUnavailable}.get(
                    code, TeacherError)
                raise cls(self.address, method, code, details) from None
            except PayloadTooLarge as exc:  # the teacher announced more than we accept: refuse before receiving it
                raise TeacherError(self.address, method, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{exc} (this client's max_response_bytes)") from None
        raise AssertionError("unreachable")

    # ---- API ----------------------------------------------------------------------------------------------------
    def wait_until_serving(self, timeout_s: float = 300.0) -> None:
        """Block until the teacher's health is SERVING, or raise TeacherUnavailable after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        delay = self.backoff_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, self.max_backoff_s)
        raise TeacherUnavailable(self.address, "health check", grpc.StatusCode.UNAVAILABLE,
                                 f"not SERVING after {timeout_s:.0f} s (last: {last}); is the teacher running there?")

    def info(self, refresh: bool = False) -> pb2.InfoResponse:
        if self._info is None or refresh:
            self._info = self._call("Info", lambda: self._stub.Info(
                pb2.InfoRequest(), timeout=self.timeout_s, metadata=self._metadata()))
        return self._info

    def identity(self) -> dict:
        """What a run manifest records to refuse a different teacher later (JSON-able)."""
        info = self.info()
        return teacher_identity(
            model_name=info.model_name, revision=info.model_revision, architecture=info.architecture,
            model_type=info.model_type, hidden_size=info.hidden_size, vocab_size=info.vocab_size,
            tokenizer_size=info.tokenizer_size, tokenizer_fingerprint=info.tokenizer_fingerprint,
        )

    @property
    def hidden_size(self) -> int:
        return int(self.info().hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.info().vocab_size)

    def encode(self, samples: Sequence[Sample], *, max_length: int | None = None,
               answer_log_probs: bool = False) -> list[TeacherFeatures]:
        if answer_log_probs:
            raise ValueError(
                "the teacher service does not send its answer distributions yet, which the logit-distillation "
                "baselines (--logit-distillation kd/uld) need: run them with an in-process teacher (--teacher-model)"
            )
        request = pb2.EncodeRequest(
            samples=[sample_to_proto(s, [image_bytes(im) for im in s.images]) for s in samples],
            return_question_features=self.question_features,
            feature_dtype=proto_dtype(self.feature_dtype) if self.feature_dtype else pb2.DTYPE_UNSPECIFIED,
            max_length=max_length or 0,
        )
        return self._call("Encode", lambda: features_from_frames(
            self._stub.Encode(request, timeout=self.timeout_s, metadata=self._metadata()),
            max_bytes=self.max_response_bytes))

    def score(
        self,
        features: Sequence[TeacherFeatures],
        answer_outputs: Sequence[torch.Tensor],
        *,
        normalizer: float | None = None,
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
        release: bool = False,
    ) -> tuple[HeadScore, list[torch.Tensor]]:
        """Same contract as ``InProcessTeacher.score``: per-sample outputs ``(La_i, D_l)`` -> (score, gradients)."""
        if len(features) != len(answer_outputs):
            raise ValueError(f"{len(features)} features but {len(answer_outputs)} answer outputs")
        items = []
        for f, r in zip(features, answer_outputs, strict=True):
            if not f.handle:
                raise ValueError(f"sample {f.sample_id!r} has no teacher handle; encode it with this client first")
            r = r.detach()
            if self.wire_dtype is not None:
                r = r.to(self.wire_dtype)
            items.append((f.handle, self.path, r.cpu().contiguous()))
        dtype = answer_outputs[0].dtype if answer_outputs else None
        call = ScoreCall(items, ce_weight, kl_weight, normalizer, self.wire_dtype, release)
        paths, grads = self._call("Score", lambda: score_result_from_frames(self._stub.Score(
            score_request_frames(call, chunk_bytes=self.chunk_bytes), timeout=self.timeout_s,
            metadata=self._metadata()), max_bytes=self.max_response_bytes))
        (path,) = paths
        grads = [g.to(dtype=dtype, device=r.device) for g, r in zip(grads, answer_outputs, strict=True)]
        score = HeadScore(ce=torch.tensor(path.ce), kl=torch.tensor(path.kl),
                          grad_inputs=torch.cat(grads) if grads else None, num_tokens=int(path.num_tokens))
        return score, grads

    def release(self, features: Sequence[TeacherFeatures]) -> int:
        handles = [f.handle for f in features if f.handle]
        if not handles:
            return 0
        return self._call("Release", lambda: self._stub.Release(
            pb2.ReleaseRequest(handles=handles), timeout=self.timeout_s, metadata=self._metadata())).released

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_token(token: str | None = None, token_file: str | Path | None = None) -> str | None:
    """The bearer token to send: ``token``, else the contents of ``token_file``, else $GENRECAL_TEACHER_TOKEN."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the teacher token file {str(token_file)!r}: {exc}") from exc
        if not token or len(token.split()) != 1:
            raise ValueError(f"the teacher token file {str(token_file)!r} must hold one token and nothing else")
    return token or os.environ.get(TOKEN_ENV) or None


def tls_credentials(ca: str | Path | None, cert: str | Path | None = None,
                    key: str | Path | None = None) -> grpc.ChannelCredentials | None:
    """TLS channel credentials verifying the server against ``ca`` (PEM), with a client certificate if given."""
    if ca is None:
        if cert or key:
            raise ValueError("a client certificate (tls_cert/tls_key) needs tls_ca, the CA of the teacher's certificate")
        return None
    if bool(cert) != bool(key):
        raise ValueError("tls_cert and tls_key go together (the client certificate and its private key)")
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes() if key else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
        )
    except OSError as exc:
        raise ValueError(f"cannot read a TLS file: {exc}") from exc
