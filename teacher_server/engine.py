"""The teacher engine: the service's work, without gRPC.

One frozen teacher VLM serves many student trainings. ``encode`` formats samples with the teacher's own
processor, runs its body and returns ``z_al`` / ``z_ql`` (docs/method.md, "Spans") and the teacher's
own CE on its answers (``teacher_ce``, its head on its prediction states, on the device thread), keeping the
teacher's prediction-position states and answer ids under a handle (``teacher_server.handles``); ``score``
scores Recalibrator answer outputs for those handles with the teacher's head (CE + KL,
``genrecal.head_scoring``) and returns the loss values and ``dL/d outputs``. Same math as
``genrecal.teacher.InProcessTeacher``.

Threads: validation, image decoding and formatting (chat template + processor, once per sample) happen in the
caller's thread, in parallel with the device; a sample that cannot be formatted, or is longer than a limit,
fails its request before it is queued. The device thread (``teacher_server.batcher``) only packs, collates and
runs forwards and head scoring. Copies to CPU and the handle store happen back in the caller's thread.

Where each check lives: the per-request limits (samples, text, turns, items, paths) in
``teacher_server.request_limits``; image formats, pixel limit and decoding in ``teacher_server.images``; special
tokens in turn text in ``genrecal.families.special_text``; Score items, device scoring and the wire-dtype
finiteness check in ``teacher_server.scoring``; handle ownership and the store's budget in
``teacher_server.handles``. A caller that is gone (``Cancellation``) has its queued jobs dropped and its running
Score stopped between blocks.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import CancelledError as FutureCancelled
from dataclasses import dataclass, field

import torch
from torch import Tensor

import genrecal
from genrecal.errors import SampleError
from genrecal.families import LoadedVLM, load_vlm
from genrecal.families.resolution import current_image_settings
from genrecal.identity import tokenizer_fingerprint
from genrecal.sample import Sample
from genrecal.teacher import TeacherFeatures
from teacher_server.batcher import (
    Batcher,
    Cancellation,
    DeviceCall,
    EncodeJob,
    FormattedSample,
    TransformersBody,
)
from teacher_server.config import EngineConfig
from teacher_server.encode_cache import CachedSample, EncodeCache, content_key
from teacher_server.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    SampleTooLarge,
    ShuttingDown,
)
from teacher_server.handles import HandleStore, KeptSample
from teacher_server.images import decode_sample_images
from teacher_server.request_limits import RequestLimits
from teacher_server.scoring import PathScore, check_score_arguments, checked_items, score_on_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherInfo:
    """Identity and sizes of the served teacher (proto ``InfoResponse``)."""

    model_name: str
    model_revision: str
    architecture: str  # config.architectures[0]
    model_type: str  # config.model_type
    hidden_size: int  # D_l: head width, width of every feature and of the outputs score() takes
    vocab_size: int  # V_l: head rows (may exceed tokenizer_size)
    dtype: torch.dtype  # what the teacher computes in; features come back in it
    tokenizer_name: str  # tokenizer class name
    tokenizer_size: int  # tokens the tokenizer knows
    tokenizer_fingerprint: str  # see `tokenizer_fingerprint`
    server_version: str
    max_batch_tokens: int
    max_request_bytes: int
    backend: str  # where the body runs: "transformers" or "vllm"
    instance_id: str  # random per engine: the handles it issues are valid with it only
    request_limits: RequestLimits  # samples / text / turns per Encode, items / paths per Score
    # every resolution knob of the family -> its value (the checkpoint's own unless --image-options set it)
    image_options: dict = field(default_factory=dict)


@dataclass
class EncodedFeatures(TeacherFeatures):
    """``TeacherFeatures`` as the engine returns them: on CPU, with a handle, and with the question lengths.

    ``question_segments`` is empty unless question features were asked for, so the lengths are kept apart.
    ``prediction_states`` is the tensor kept in the handle store (on the head's device); it is not sent.
    """

    question_lengths: list[int] = field(default_factory=list)  # Lq_k per answer k

    @property
    def answer_lengths(self) -> list[int]:
        return [int(segment.shape[0]) for segment in self.answer_segments]


@dataclass
class EngineStats:
    """Counters for monitoring and tests; ``TeacherEngine.stats`` returns a snapshot."""

    forwards: int = 0  # teacher forwards run
    encode_requests: int = 0  # encode() calls answered successfully
    failed_encode_requests: int = 0  # encode() calls that failed once their arguments were accepted
    score_requests: int = 0  # score() calls answered successfully
    # per forward, the most recent 1000:
    samples_per_forward: list[int] = field(default_factory=list)
    requests_per_forward: list[int] = field(default_factory=list)
    padded_tokens_per_forward: list[int] = field(default_factory=list)  # B * L
    handles: int = 0  # handles held now
    handle_bytes: int = 0  # memory they hold (states shared through the encode cache counted once)
    handle_charged_bytes: int = 0  # what their clients are charged (a shared state once per handle)
    evicted_handles: int = 0  # handles dropped because the store was full
    # the encode cache (teacher_server.encode_cache), in samples:
    cache_hits: int = 0  # served from memory
    cache_shared: int = 0  # waited for another request computing the same content
    cache_misses: int = 0  # needed a forward (0 while the cache is off)
    cache_entries: int = 0
    cache_bytes: int = 0


class TeacherEngine:
    """A frozen teacher VLM serving encode / score / release to many concurrent callers (thread-safe)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        start = time.monotonic()
        dtype, device_map = config.torch_dtype, config.resolved_device_map
        if config.backend == "vllm":  # the body runs in vLLM; self.vlm holds the processor and the head only
            from teacher_server.backends.vllm_body import VllmBody

            body = VllmBody(config.model_path, dtype=dtype, options=config.vllm, image_options=config.image_options)
            self.vlm: LoadedVLM | None = body.vlm
        else:
            self.vlm = load_vlm(config.model_path, dtype=dtype, device_map=device_map,
                                image_options=config.image_options)
            body = TransformersBody(self.vlm)
        model = self.vlm.model
        model.eval()
        model.requires_grad_(False)
        head = self.vlm.head
        self._head_device = head.weight.device
        self._head_dtype = head.weight.dtype
        self._info = self._build_info()
        devices = sorted({str(p.device) for p in model.parameters()})
        logger.info(
            "loaded teacher %s (revision %s, %s) from %s in %.1fs: %s backend, dtype %s, device_map %r, devices %s, "
            "head on %s; D_l=%d, V_l=%d",
            config.model_name, config.revision, self._info.architecture, config.model_path,
            time.monotonic() - start, config.backend, dtype, device_map if config.backend == "transformers" else None,
            ", ".join(devices), self._head_device,
            self._info.hidden_size, self._info.vocab_size,
        )
        self._handles = HandleStore(config.handle_store_bytes, client_share=config.handle_store_client_share)
        self._cache = EncodeCache(config.encode_cache_bytes)
        # HF fast tokenizers are not safe to call from several threads at once ("Already borrowed"): callers
        # format one at a time, still in parallel with the device thread. Also guards `vlm` against close().
        self._format_lock = threading.Lock()
        self._decodes = threading.BoundedSemaphore(config.max_concurrent_decodes)  # bounds decoded-image memory
        self._closed = False
        self._stats_lock = threading.Lock()
        self._counts = EngineStats()
        self._body = body
        self._batcher = Batcher(
            body, max_batch_tokens=config.max_batch_tokens,
            max_batch_samples=config.max_batch_samples, batch_wait_ms=config.batch_wait_ms,
            head=head, chunk_size=config.chunk_size,
        )

    # ---- public API ----------------------------------------------------------------------------------

    def info(self) -> TeacherInfo:
        self._check_open()
        return self._info

    def encode(
        self,
        samples: Sequence[Sample],
        *,
        return_question_features: bool = False,
        max_length: int | None = None,
        client: str = "",
        timeout_s: float | None = None,
        cancellation: Cancellation | None = None,
    ) -> list[EncodedFeatures]:
        """Encode ``samples`` (images as PIL images or encoded bytes); results in request order, on CPU.

        Each result carries a fresh ``handle`` for ``score``, owned by ``client`` (only that client can score or
        release it); ``question_segments`` is empty unless ``return_question_features``. ``max_length`` (None or
        0 = the server's limit) refuses longer samples. ResourceExhausted if the handle store cannot keep them all;
        DeadlineExceeded if the device has not run them within ``timeout_s`` (they are then skipped).
        When ``cancellation`` fires (the caller is gone), the request's queued forwards are dropped (Cancelled).
        """
        self._check_open()
        if not samples:
            raise InvalidRequest("encode needs at least one sample")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 0):
            raise InvalidRequest(f"max_length must be a non-negative integer (0 = no limit), got {max_length!r}")
        self.config.request_limits.check_encode(samples)  # before any formatting: bounds the tokenizer's work
        limits = [n for n in (max_length, self.config.max_length) if n]
        try:
            formatted = [self._format(sample, i, min(limits) if limits else None) for i, sample in enumerate(samples)]
            computed = self._compute(formatted, timeout_s, cancellation)
            results = self._keep(formatted, computed, question_features=bool(return_question_features),
                                 client=client)
        except BaseException:
            with self._stats_lock:
                self._counts.failed_encode_requests += 1
            raise
        with self._stats_lock:
            self._counts.encode_requests += 1
        return results

    def score(
        self,
        items: Sequence[tuple[str, str, Tensor]],
        *,
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
        normalizer: float | None = None,
        release: bool = False,
        client: str = "",
        timeout_s: float | None = None,
        grad_dtype: torch.dtype | None = None,
        cancellation: Cancellation | None = None,
    ) -> tuple[list[PathScore], list[Tensor]]:
        """Score ``(handle, path, outputs (La, D_l))`` items with the teacher's head.

        Per path (first-seen order): ``L = ce_weight * CE + kl_weight * KL`` of the path's items together,
        divided by ``normalizer`` (None = the path's token count). Returns the path scores and, per item,
        ``dL/d outputs`` on CPU in ``grad_dtype`` (None: the outputs' dtype), checked finite in that dtype (a
        float16 gradient can overflow where the teacher's float32 one did not: InvalidRequest). ``release``
        forgets the handles after a successful score.
        Handles must belong to ``client``; another client's handles are NOT_FOUND, as if they did not exist.
        """
        self._check_open()
        if not items:
            raise InvalidRequest("score needs at least one item")
        self.config.request_limits.check_score(items)
        check_score_arguments(ce_weight, kl_weight, normalizer)
        outputs, kept, paths = checked_items(
            items, hidden_size=self._info.hidden_size,
            kept_for=lambda handle, i: self._handles.get(handle, client=client, context=f"score item {i}"))
        call = DeviceCall(None)
        call.fn = functools.partial(
            score_on_device, self.vlm.head, outputs, kept, paths, ce_weight=float(ce_weight),
            kl_weight=float(kl_weight), normalizer=None if normalizer is None else float(normalizer),
            grad_dtype=grad_dtype, chunk_size=self.config.chunk_size, stopped=call.stopped,
        )
        self._submit(call)
        result = self._wait(call, timeout_s, cancellation)
        with self._stats_lock:
            self._counts.score_requests += 1
        if release:
            self._handles.release([item[0] for item in items], client=client)
        return result

    def release(self, handles: Sequence[str], *, client: str = "") -> int:
        """Forget ``client``'s ``handles`` (unknown ones and other clients' are ignored); return how many it held."""
        self._check_open()
        if isinstance(handles, str):
            raise InvalidRequest("release takes a list of handles, not a single string")
        return self._handles.release(list(handles), client=client)

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters."""
        forwards, cache = self._batcher.stats, self._cache.stats
        with self._stats_lock:
            counts = self._counts
            return EngineStats(
                forwards=forwards.forwards,
                encode_requests=counts.encode_requests,
                failed_encode_requests=counts.failed_encode_requests,
                score_requests=counts.score_requests,
                samples_per_forward=forwards.samples_per_forward,
                requests_per_forward=forwards.requests_per_forward,
                padded_tokens_per_forward=forwards.padded_tokens_per_forward,
                handles=len(self._handles),
                handle_bytes=self._handles.nbytes,
                handle_charged_bytes=self._handles.charged_bytes,
                evicted_handles=self._handles.evicted,
                cache_hits=cache.hits, cache_shared=cache.shared, cache_misses=cache.misses,
                cache_entries=cache.entries, cache_bytes=cache.nbytes,
            )

    def add_forward_observer(self, observe) -> None:
        """``observe(num_samples, padded_tokens)`` after each teacher forward, on the device thread."""
        self._batcher.forward_observers.append(observe)

    @property
    def queue_depth(self) -> int:
        return self._batcher.queue_depth

    def handle_bytes_by_client(self) -> dict[str, int]:
        return self._handles.bytes_by_client()

    def handle_bytes_held(self) -> int:
        """Memory the handle store holds (a state shared by several handles counted once)."""
        return self._handles.nbytes

    def evictions_by_client(self) -> dict[str, int]:
        return dict(self._handles.evicted_by_client)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse new calls (ShuttingDown), finish the queued ones, stop the device thread, free the model."""
        with self._format_lock:
            if self._closed:
                return
            self._closed = True
        logger.info("teacher engine closing: finishing queued jobs")
        self._batcher.close()
        self._cache.clear()
        close_body = getattr(self._body, "close", None)  # vLLM's engine is stopped explicitly
        self._body = None
        if close_body is not None:
            close_body()
        self._handles.clear()
        on_cuda = self._head_device.type == "cuda"
        with self._format_lock:
            self.vlm = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        logger.info("teacher engine closed; model freed")

    def __enter__(self) -> TeacherEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- caller-side helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDown("the teacher engine is shutting down; retry against another teacher replica")

    def _submit(self, job: EncodeJob | DeviceCall) -> None:
        self._check_open()
        self._batcher.submit(job)

    def _wait(self, job: EncodeJob | DeviceCall, timeout_s: float | None, cancellation: Cancellation | None = None):
        if cancellation is not None:  # the caller gone: drop the job if queued, stop it between blocks if running
            cancellation.on_cancel(lambda: job.cancel(Cancelled("the caller is gone; its job was dropped")))
        try:
            return job.future.result(timeout=timeout_s)
        except FutureCancelled:
            raise Cancelled("the caller is gone; its job was dropped") from None
        except TimeoutError:
            error = DeadlineExceeded(
                f"the teacher did not get to this call within the server's deadline ({timeout_s:.0f} s left of "
                "--call-timeout-s when it was queued): it is overloaded; retry later or against another replica"
            )
            job.cancel(error)
            raise error from None

    def _format(self, sample: Sample, position: int, max_length: int | None) -> FormattedSample:
        """Decode and format one sample (once); refuse it here if it is longer than a limit."""
        sample = decode_sample_images(sample, position, max_pixels=self.config.max_image_pixels,
                                      decodes=self._decodes)
        with self._format_lock:  # (encode refuses text holding the family's control tokens first)
            if self.vlm is None:
                self._check_open()
            batch = self.vlm.encode([sample])  # (1, L), unpadded
        length = int(batch.inputs["attention_mask"].sum())
        if max_length is not None and length > max_length:
            raise SampleError(
                sample.sample_id,
                f"{length} teacher tokens exceed max_length={max_length}; raise max_length, shorten the "
                "sample or filter it out",
            )
        if length > self.config.max_batch_tokens:
            raise SampleTooLarge(
                sample.sample_id,
                f"{length} teacher tokens exceed the server's max_batch_tokens={self.config.max_batch_tokens}; "
                "shorten the sample (fewer or smaller images, shorter text) or start the teacher with a larger "
                "max_batch_tokens",
            )
        return FormattedSample(sample, batch, length)

    def _compute(self, formatted: list[FormattedSample], timeout_s: float | None,
                 cancellation: Cancellation | None = None) -> list[CachedSample]:
        """Each sample's results: from the encode cache, from another request computing it, or a forward."""
        if not self._cache.enabled:
            job = EncodeJob(formatted)
            self._submit(job)
            return [self._compact(f) for f in self._wait(job, timeout_s, cancellation)]
        revision = self.config.revision
        keys = [content_key(f.batch.inputs, f.batch.answer_spans[0], revision) for f in formatted]
        claims = [self._cache.claim(key) for key in keys]
        owned = [i for i, (kind, _) in enumerate(claims) if kind == "run"]
        results: list[CachedSample | None] = [entry if kind == "hit" else None for kind, entry in claims]
        if owned:
            try:
                job = EncodeJob([formatted[i] for i in owned])
                self._submit(job)
                features = self._wait(job, timeout_s, cancellation)
            except BaseException as exc:
                for i in owned:
                    self._cache.fail(keys[i], exc)
                raise
            for i, feature in zip(owned, features, strict=True):
                results[i] = self._compact(feature)
                self._cache.fulfil(keys[i], results[i])
        for i, (kind, pending) in enumerate(claims):
            if kind == "wait":  # another request runs the forward of the same content
                try:
                    results[i] = pending.result(timeout=timeout_s)
                except TimeoutError:
                    raise DeadlineExceeded(
                        "the teacher did not finish another request's forward of the same sample within this "
                        "call's deadline: it is overloaded; retry later or against another replica"
                    ) from None
                except Cancelled:  # that request's caller went away: not this caller's fault
                    raise ShuttingDown("another request computing the same sample was cancelled by its caller; "
                                       "retry (UNAVAILABLE is retried by the client)") from None
        return results

    def _compact(self, feature: TeacherFeatures) -> CachedSample:
        """CPU copies of what is sent, and the scoring state on the head's device."""
        states = feature.prediction_states.to(self._head_device, self._head_dtype)  # (La, D_l)
        ids = feature.answer_token_ids.to(self._head_device)  # (La,)
        kept = KeptSample(ids, states, ids.numel() * ids.element_size() + states.numel() * states.element_size())
        return CachedSample(
            answer_segments=[_cpu_copy(s) for s in feature.answer_segments],
            question_segments=[_cpu_copy(s) for s in feature.question_segments],
            answer_token_ids=_cpu_copy(feature.answer_token_ids),
            kept=kept,
            teacher_ce=feature.teacher_ce,
        )

    def _keep(self, formatted: list[FormattedSample], computed: list[CachedSample], *, question_features: bool,
              client: str) -> list[EncodedFeatures]:
        """Keep each sample's scoring state under a new handle; hand the caller its results (CPU)."""
        results = [
            EncodedFeatures(
                sample_id=f.sample_id,
                answer_segments=list(c.answer_segments),
                question_segments=list(c.question_segments) if question_features else [],
                answer_token_ids=c.answer_token_ids,
                prediction_states=c.kept.prediction_states,
                teacher_ce=c.teacher_ce,
                question_lengths=[int(s.shape[0]) for s in c.question_segments],
            )
            for f, c in zip(formatted, computed, strict=True)
        ]
        handles = self._handles.put_many([c.kept for c in computed], client=client)
        for result, handle in zip(results, handles, strict=True):
            result.handle = handle
        return results

    def _build_info(self) -> TeacherInfo:
        model, tokenizer = self.vlm.model, self.vlm.processor.tokenizer
        head = self.vlm.head
        return TeacherInfo(
            model_name=self.config.model_name,
            model_revision=self.config.revision,
            architecture=(model.config.architectures or [type(model).__name__])[0],
            model_type=model.config.model_type,
            hidden_size=int(head.weight.shape[1]),
            vocab_size=int(head.weight.shape[0]),
            dtype=head.weight.dtype,
            tokenizer_name=type(tokenizer).__name__,
            tokenizer_size=len(tokenizer),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            server_version=genrecal.__version__,
            max_batch_tokens=self.config.max_batch_tokens,
            max_request_bytes=self.config.max_request_bytes,
            backend=self.config.backend,
            instance_id=uuid.uuid4().hex,
            request_limits=self.config.request_limits,
            image_options=current_image_settings(self.vlm.adapter, self.vlm.processor, model.config),
        )




def _cpu_copy(tensor: Tensor) -> Tensor:
    """A compact CPU copy (never a view that would keep the whole batch's hidden states alive)."""
    return tensor.detach().to("cpu", copy=True)


__all__ = [
    "EncodedFeatures",
    "EngineStats",
    "HandleStore",
    "KeptSample",
    "PathScore",
    "TeacherEngine",
    "TeacherInfo",
    "tokenizer_fingerprint",
]
