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
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrecal.errors import SampleError
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
from genrecal.rpc.metadata import EXPECT_REVISION_METADATA, REFUSED_SAMPLE_METADATA, SERVICE_NAME
from genrecal.sample import Sample, source_bytes
from genrecal.teacher import TeacherFeatures
from genrecal.wire import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    PayloadTooLarge,
    WireTraffic,
    channel_options,
    proto_dtype,
)

logger = logging.getLogger(__name__)

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


class SampleRefused(TeacherError, SampleError):
    """INVALID_ARGUMENT (too long for the teacher's max_length, forbidden text, a bad image) or RESOURCE_EXHAUSTED
    (alone over the server's token budget) for one sample of an Encode: the server names it in the trailer, so a
    trainer can skip that record as it skips the records it cannot read itself."""

    def __init__(self, address: str, method: str, code: grpc.StatusCode, details: str, sample_id: str):
        TeacherError.__init__(self, address, method, code, details)
        self.sample_id = sample_id
        self.reason = "the teacher refused it: " + details.removeprefix(f"sample {sample_id!r}: ")


class NonFiniteResult(TeacherError):
    """The teacher answered with a NaN or Inf loss or gradient (whatever its status said): refused, so that it never
    reaches the student's weights. ``code`` is DATA_LOSS."""


def refuse_non_finite(address: str, scores: Sequence, grads: Sequence[torch.Tensor]) -> None:
    """NonFiniteResult if a path's loss or any gradient the teacher sent is not finite."""
    for s in scores:
        if not (math.isfinite(s.ce) and math.isfinite(s.kl)):
            raise NonFiniteResult(address, "Score", grpc.StatusCode.DATA_LOSS,
                                  f"path {s.path!r}: the teacher sent a non-finite loss (CE={s.ce}, KL={s.kl})")
    for n, grad in enumerate(grads):
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteResult(
                address, "Score", grpc.StatusCode.DATA_LOSS,
                f"gradient {n} ({str(grad.dtype).removeprefix('torch.')}) holds NaN or Inf; the step is refused "
                "(with a float16 wire_dtype, a large gradient overflows: use bfloat16 or float32)")


def image_bytes(image) -> bytes:
    """What to send for a PIL image: the bytes of the file it was decoded from when known (a JPEG stays a JPEG;
    the teacher decodes them to the same pixels), else PNG (lossless: exactly the student's pixels)."""
    original = source_bytes(image)
    if original is not None:
        return original
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
        traffic: WireTraffic | None = None,
    ):
        """``token`` / ``token_file`` (a file holding the token) / $GENRECAL_TEACHER_TOKEN, in that order of
        preference, is sent as ``authorization: Bearer TOKEN``. ``tls_ca`` (PEM) turns on TLS and verifies the
        server against it; ``tls_cert`` + ``tls_key`` present a client certificate (mTLS).

        ``question_features``: ask Encode for the teacher's question features ``z_ql`` too (only the regularisation
        path, L2, and the alignment check use them; they are most of an image sample's bytes). ``feature_dtype`` /
        ``wire_dtype``: the dtype features / Recalibrator outputs and their gradients travel in (None: the
        teacher's, resp. the outputs' own). ``traffic`` counts the bytes of every call (shared by replicas)."""
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
        self.traffic = traffic if traffic is not None else WireTraffic()
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
                refused = _refused_sample(err) if code in REFUSED_SAMPLE_CODES else None
                if refused is not None:
                    raise SampleRefused(self.address, method, code, details, refused) from None
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
        def call():
            self.traffic.add("Encode", "sent", request.ByteSize())
            frames = self._stub.Encode(request, timeout=self.timeout_s, metadata=self._metadata())
            return features_from_frames(self.traffic.counted(frames, "Encode", "received"),
                                        max_bytes=self.max_response_bytes)

        return self._call("Encode", call)

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
        return self.score_paths(features, {self.path: answer_outputs}, normalizer=normalizer, ce_weight=ce_weight,
                                kl_weight=kl_weight, release=release)[self.path]

    def score_paths(
        self,
        features: Sequence[TeacherFeatures],
        outputs_by_path: Mapping[str, Sequence[torch.Tensor]],
        *,
        normalizer: float | None = None,
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
        release: bool = False,
    ) -> dict[str, tuple[HeadScore, list[torch.Tensor]]]:
        """Several Recalibrator paths of the same samples (e.g. L1 and L2) in ONE Score call; the server scores
        each path on its own, so the result equals one ``score`` per path."""
        items = []
        for path, answer_outputs in outputs_by_path.items():
            if len(features) != len(answer_outputs):
                raise ValueError(f"path {path!r}: {len(features)} features but {len(answer_outputs)} answer outputs")
            for f, r in zip(features, answer_outputs, strict=True):
                if not f.handle:
                    raise ValueError(f"sample {f.sample_id!r} has no teacher handle; encode it with this client first")
                r = r.detach()
                if self.wire_dtype is not None:
                    r = r.to(self.wire_dtype)
                items.append((f.handle, path, r.cpu().contiguous()))
        call = ScoreCall(items, ce_weight, kl_weight, normalizer, self.wire_dtype, release)
        def send():
            frames = self.traffic.counted(score_request_frames(call, chunk_bytes=self.chunk_bytes), "Score", "sent")
            answer = self._stub.Score(frames, timeout=self.timeout_s, metadata=self._metadata())
            return score_result_from_frames(self.traffic.counted(answer, "Score", "received"),
                                            max_bytes=self.max_response_bytes)

        scores, grads = self._call("Score", send)
        refuse_non_finite(self.address, scores, grads)
        by_name = {s.path: s for s in scores}
        results, start = {}, 0
        for path, answer_outputs in outputs_by_path.items():
            path_grads = [g.to(dtype=r.dtype, device=r.device)
                          for g, r in zip(grads[start:start + len(features)], answer_outputs, strict=True)]
            start += len(features)
            s = by_name[path]
            results[path] = (HeadScore(ce=torch.tensor(s.ce), kl=torch.tensor(s.kl),
                                       grad_inputs=torch.cat(path_grads) if path_grads else None,
                                       num_tokens=int(s.num_tokens)), path_grads)
        return results

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


REFUSED_SAMPLE_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _refused_sample(err: grpc.RpcError) -> str | None:
    """The sample id a refusal names in its trailer (:data:`REFUSED_SAMPLE_METADATA`), if any."""
    trailer = getattr(err, "trailing_metadata", None)
    for key, value in (trailer() if callable(trailer) else None) or ():
        if key == REFUSED_SAMPLE_METADATA:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


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
