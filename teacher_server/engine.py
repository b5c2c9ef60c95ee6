"""The teacher engine: the service's work, without gRPC.

One frozen teacher VLM serves many student trainings. ``encode`` formats samples with the teacher's own
processor, runs its body and returns ``z_al`` / ``z_ql`` (GENRECAL.md, "One training sample") and the teacher's
own CE on its answers (``teacher_ce``, its head on its prediction states, on the device thread), keeping the
teacher's prediction-position states and answer ids under a handle (``teacher_server.handles``); ``score``
scores Recalibrator answer outputs for those handles with the teacher's head (CE + KL,
``genrecal.head_scoring``) and returns the loss values and ``dL/d outputs``. Same math as
``genrecal.teacher.InProcessTeacher``.

Threads: validation, image decoding and formatting (chat template + processor, once per sample) happen in the
caller's thread, in parallel with the device; a sample that cannot be formatted, or is longer than a limit,
fails its request before it is queued. The device thread (``teacher_server.batcher``) only packs, collates and
runs forwards and head scoring. Copies to CPU and the handle store happen back in the caller's thread.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import logging
import math
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

import genrecal
from genrecal.errors import SampleError
from genrecal.families import LoadedVLM, load_vlm
from genrecal.head_scoring import score_with_head
from genrecal.identity import tokenizer_fingerprint
from genrecal.rpc.convert import MIN_NORMALIZER, clip
from genrecal.sample import Sample
from genrecal.teacher import TeacherFeatures, split_rows
from teacher_server.batcher import Batcher, DeviceCall, EncodeJob, FormattedSample, TransformersBody
from teacher_server.config import EngineConfig
from teacher_server.encode_cache import CachedSample, EncodeCache, content_key
from teacher_server.errors import DeadlineExceeded, InvalidRequest, ResourceExhausted, ShuttingDown
from teacher_server.handles import HandleStore, KeptSample

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


@dataclass(frozen=True)
class PathScore:
    """Loss values of one Recalibrator path (e.g. "L1", "L2") over the items of one score request."""

    path: str
    ce: float  # summed token CE / normalizer
    kl: float  # summed token KL(P_l || Q) / normalizer
    num_tokens: int


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

            body = VllmBody(config.model_path, dtype=dtype, options=config.vllm)
            self.vlm: LoadedVLM | None = body.vlm
        else:
            self.vlm = load_vlm(config.model_path, dtype=dtype, device_map=device_map)
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
    ) -> list[EncodedFeatures]:
        """Encode ``samples`` (images as PIL images or encoded bytes); results in request order, on CPU.

        Each result carries a fresh ``handle`` for ``score``, owned by ``client`` (only that client can score or
        release it); ``question_segments`` is empty unless ``return_question_features``. ``max_length`` (None or
        0 = the server's limit) refuses longer samples. ResourceExhausted if the handle store cannot keep them all;
        DeadlineExceeded if the device has not run them within ``timeout_s`` (they are then skipped).
        """
        self._check_open()
        if not samples:
            raise InvalidRequest("encode needs at least one sample")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 0):
            raise InvalidRequest(f"max_length must be a non-negative integer (0 = no limit), got {max_length!r}")
        limits = [n for n in (max_length, self.config.max_length) if n]
        try:
            formatted = [self._format(sample, i, min(limits) if limits else None) for i, sample in enumerate(samples)]
            computed = self._compute(formatted, timeout_s)
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
    ) -> tuple[list[PathScore], list[Tensor]]:
        """Score ``(handle, path, outputs (La, D_l))`` items with the teacher's head.

        Per path (first-seen order): ``L = ce_weight * CE + kl_weight * KL`` of the path's items together,
        divided by ``normalizer`` (None = the path's token count). Returns the path scores and, per item,
        ``dL/d outputs`` on CPU in the outputs' dtype. ``release`` forgets the handles after a successful score.
        Handles must belong to ``client``; another client's handles are NOT_FOUND, as if they did not exist.
        """
        self._check_open()
        if not items:
            raise InvalidRequest("score needs at least one item")
        for name, value in (("ce_weight", ce_weight), ("kl_weight", kl_weight)):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InvalidRequest(f"{name} must be a finite number >= 0, got {value!r}")
        if normalizer is not None and (
            not isinstance(normalizer, int | float) or not math.isfinite(normalizer) or normalizer < MIN_NORMALIZER
        ):
            raise InvalidRequest(
                f"normalizer must be a positive finite number (an answer-token count, >= {MIN_NORMALIZER}) or None, "
                f"got {normalizer!r}"
            )
        outputs, kept, paths, seen = [], [], [], set()
        for i, item in enumerate(items):
            handle, path, tensor = self._validate_item(i, item)
            if (handle, path) in seen:
                raise InvalidRequest(f"score item {i}: handle {clip(handle)!r} appears twice on path {path!r}")
            seen.add((handle, path))
            kept.append(self._handles.get(handle, client=client, context=f"score item {i}"))
            expected = (kept[-1].num_answer_tokens, self._info.hidden_size)
            if tuple(tensor.shape) != expected:
                raise InvalidRequest(
                    f"score item {i} (handle {clip(handle)!r}, path {path!r}): outputs must have shape (La, D_l) = "
                    f"{expected} (La = that sample's teacher answer tokens, D_l = the teacher's hidden size), "
                    f"got {tuple(tensor.shape)}"
                )
            finite = torch.isfinite(tensor).all(dim=1)
            if not bool(finite.all()):
                rows = (~finite).nonzero().squeeze(1)[:10].tolist()
                raise InvalidRequest(
                    f"score item {i} (handle {clip(handle)!r}, path {path!r}): outputs contain NaN or Inf at rows {rows}"
                )
            outputs.append(tensor)
            paths.append(path)
        call = DeviceCall(functools.partial(
            self._score_on_device, outputs, kept, paths, float(ce_weight), float(kl_weight),
            None if normalizer is None else float(normalizer),
        ))
        self._submit(call)
        result = self._wait(call, timeout_s)
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

    def _wait(self, job: EncodeJob | DeviceCall, timeout_s: float | None):
        try:
            return job.future.result(timeout=timeout_s)
        except TimeoutError:
            error = DeadlineExceeded(
                f"the teacher did not get to this call within the server's deadline ({timeout_s:.0f} s left of "
                "--call-timeout-s when it was queued): it is overloaded; retry later or against another replica"
            )
            job.cancel(error)
            raise error from None

    def _format(self, sample: Sample, position: int, max_length: int | None) -> FormattedSample:
        """Decode and format one sample (once); refuse it here if it is longer than a limit."""
        sample = self._decoded(sample, position)
        with self._format_lock:
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
            raise ResourceExhausted(
                f"sample {sample.sample_id!r}: {length} teacher tokens exceed the server's "
                f"max_batch_tokens={self.config.max_batch_tokens}; shorten the sample (fewer or smaller "
                "images, shorter text) or start the teacher with a larger max_batch_tokens"
            )
        return FormattedSample(sample, batch, length)

    def _decoded(self, sample: Sample, position: int) -> Sample:
        """``sample`` with encoded image bytes decoded to RGB images (SampleError naming the sample if corrupt)."""
        if not isinstance(sample, Sample):
            raise InvalidRequest(f"encode item {position} must be a genrecal.sample.Sample, got {type(sample).__name__}")
        if all(isinstance(image, Image.Image) for image in sample.images):
            return sample
        images = []
        for k, image in enumerate(sample.images):
            if isinstance(image, bytes | bytearray):
                image = decode_image(bytes(image), sample_id=sample.sample_id, index=k,
                                     max_pixels=self.config.max_image_pixels, decodes=self._decodes)
            elif not isinstance(image, Image.Image):
                raise SampleError(sample.sample_id, f"image {k} must be encoded bytes or a PIL image, got {type(image)}")
            images.append(image)
        return Sample(sample.sample_id, list(sample.turns), images)

    def _compute(self, formatted: list[FormattedSample], timeout_s: float | None) -> list[CachedSample]:
        """Each sample's results: from the encode cache, from another request computing it, or a forward."""
        if not self._cache.enabled:
            job = EncodeJob(formatted)
            self._submit(job)
            return [self._compact(f) for f in self._wait(job, timeout_s)]
        revision = self.config.revision
        keys = [content_key(f.batch.inputs, f.batch.answer_spans[0], revision) for f in formatted]
        claims = [self._cache.claim(key) for key in keys]
        owned = [i for i, (kind, _) in enumerate(claims) if kind == "run"]
        results: list[CachedSample | None] = [entry if kind == "hit" else None for kind, entry in claims]
        if owned:
            try:
                job = EncodeJob([formatted[i] for i in owned])
                self._submit(job)
                features = self._wait(job, timeout_s)
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

    def _validate_item(self, i: int, item) -> tuple[str, str, Tensor]:
        try:
            handle, path, tensor = item
        except (TypeError, ValueError):
            raise InvalidRequest(f"score item {i} must be a (handle, path, outputs) tuple") from None
        if not isinstance(handle, str) or not handle:
            raise InvalidRequest(f"score item {i}: handle must be a non-empty string, got {clip(handle)!r}")
        if not isinstance(path, str) or not path:
            raise InvalidRequest(f"score item {i} (handle {clip(handle)!r}): path must be a non-empty string like 'L1'")
        if not isinstance(tensor, Tensor):
            raise InvalidRequest(f"score item {i} (handle {clip(handle)!r}): outputs must be a tensor, got {type(tensor)}")
        if not tensor.is_floating_point():
            raise InvalidRequest(
                f"score item {i} (handle {clip(handle)!r}, path {path!r}): outputs must be floating point "
                f"(bfloat16, float16 or float32), got {tensor.dtype}"
            )
        return handle, path, tensor

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
        )

    # ---- device thread -------------------------------------------------------------------------------

    def _score_on_device(
        self, outputs: list[Tensor], kept: list[KeptSample], paths: list[str],
        ce_weight: float, kl_weight: float, normalizer: float | None,
    ) -> tuple[list[PathScore], list[Tensor]]:
        head = self.vlm.head
        weight = head.weight  # (V, D_l)
        by_path: dict[str, list[int]] = {}
        for i, path in enumerate(paths):
            by_path.setdefault(path, []).append(i)
        scores, grads = [], [None] * len(paths)
        for path, items in by_path.items():
            inputs = torch.cat([outputs[i].detach().to(weight.device, weight.dtype) for i in items])  # (N, D_l)
            labels = torch.cat([kept[i].answer_token_ids for i in items])  # (N,)
            states = torch.cat([kept[i].prediction_states for i in items]).to(weight.dtype)  # (N, D_l)
            score = score_with_head(
                weight, inputs, labels, states,
                head_bias=head.bias,
                ce_weight=ce_weight,
                kl_weight=kl_weight,
                normalizer=normalizer,
                chunk_size=self.config.chunk_size,
            )
            del inputs, states
            if not (math.isfinite(float(score.ce)) and math.isfinite(float(score.kl))
                    and bool(torch.isfinite(score.grad_inputs).all())):
                raise InvalidRequest(
                    f"path {path!r}: the loss or its gradient is not finite (CE={float(score.ce)}, "
                    f"KL={float(score.kl)}) in the teacher's {weight.dtype}: the outputs are too large for its head; "
                    "check the Recalibrator's outputs (their scale) before scoring them"
                )
            scores.append(PathScore(path, float(score.ce), float(score.kl), score.num_tokens))
            counts = [kept[i].num_answer_tokens for i in items]
            for i, grad in zip(items, split_rows(score.grad_inputs, counts), strict=True):
                grads[i] = grad.to("cpu", outputs[i].dtype, copy=True)  # (La_i, D_l)
        logger.debug("device thread: scored %d items on %d path(s)", len(paths), len(scores))
        return scores, grads


def decode_image(data: bytes, *, sample_id: str, index: int, max_pixels: int,
                 decodes: threading.BoundedSemaphore | None = None) -> Image.Image:
    """Encoded bytes -> RGB image, refusing one of more than ``max_pixels`` from its header, before decoding.

    A 450 KB PNG can announce 12000 x 12000 pixels (1.7 GB decoded): the size is read first (``Image.open``
    parses the header only), and only images within the limit are decoded, at most ``decodes`` at a time.
    Every problem is a SampleError naming the sample (INVALID_ARGUMENT).
    """
    def too_large(size: str) -> SampleError:
        return SampleError(sample_id, f"image {index} has {size} pixels, more than this teacher's limit of "
                                      f"{max_pixels} (--max-image-pixels); resize it before sending")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own hard limit (2x its MAX_IMAGE_PIXELS)
        raise too_large(f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0)}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SampleError(sample_id, f"image {index}: image bytes cannot be decoded ({exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise too_large(f"{width} x {height} = {width * height}")
    try:
        with decodes if decodes is not None else contextlib.nullcontext():
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SampleError(sample_id, f"image {index}: image bytes cannot be decoded ({exc})") from exc


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
