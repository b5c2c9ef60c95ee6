"""The teacher engine: the service's work, without gRPC.

One frozen teacher VLM serves many student trainings. ``encode`` formats samples with the teacher's own
processor, runs its body and returns ``z_al`` / ``z_ql`` (GENRECAL.md, "One training sample"), keeping the
teacher's prediction-position states and answer ids under a handle; ``score`` scores Recalibrator answer
outputs for those handles with the teacher's head (CE + KL, ``genrecal.head_scoring``) and returns the loss
values and ``dL/d outputs``. Same math as ``genrecal.teacher.InProcessTeacher``.

Threads: a single device thread (the batcher) does all device work, in arrival order. Callers enqueue a job
and wait on its future. For encode jobs the batcher takes the first one, waits up to ``batch_wait_ms`` for
more, merges them up to ``max_batch_samples`` samples and runs one forward per ``max_batch_tokens`` of padded
``B * L`` (halving the sample list until it fits). A request whose sample cannot be formatted or run fails
alone: the merged batch is retried request by request. Validation and image decoding happen in the caller's
thread, in parallel with the device.
"""

from __future__ import annotations

import gc
import logging
import math
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch
from PIL import Image
from torch import Tensor

import genrecal
from genrecal.errors import SampleError
from genrecal.families import LoadedVLM, load_vlm
from genrecal.head_scoring import score_with_head
from genrecal.identity import tokenizer_fingerprint
from genrecal.sample import Sample, load_image
from genrecal.teacher import TeacherFeatures, extract_teacher_features, split_rows
from teacher_server.config import EngineConfig
from teacher_server.errors import HandleNotFound, InvalidRequest, ResourceExhausted, ShuttingDown

logger = logging.getLogger(__name__)

_STATS_HISTORY = 1000  # forwards remembered in EngineStats' per-forward lists


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
    failed_encode_requests: int = 0
    score_requests: int = 0  # score() calls answered successfully
    # per forward, the most recent `_STATS_HISTORY`:
    samples_per_forward: list[int] = field(default_factory=list)
    requests_per_forward: list[int] = field(default_factory=list)
    padded_tokens_per_forward: list[int] = field(default_factory=list)  # B * L
    handles: int = 0  # handles held now
    handle_bytes: int = 0  # bytes they hold
    evicted_handles: int = 0  # handles dropped because the store was full


# ---- handle store ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeptSample:
    """What the teacher keeps per encoded sample to score it later; both on the head's device."""

    answer_token_ids: Tensor  # (La,) int64 gt_l
    prediction_states: Tensor  # (La, D_l) body states at the prediction positions (give P_l)
    nbytes: int

    @property
    def num_answer_tokens(self) -> int:
        return int(self.answer_token_ids.shape[0])


class HandleStore:
    """Thread-safe LRU of kept samples, bounded in bytes; the oldest (least recently used) go first.

    The newest entry is always kept, even when it alone exceeds the budget.
    """

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, KeptSample] = OrderedDict()
        self._lock = threading.Lock()
        self._nbytes = 0
        self.evicted = 0

    def put_many(self, kept: Sequence[KeptSample]) -> list[str]:
        """Store samples together; return their new handles."""
        handles = [uuid.uuid4().hex for _ in kept]
        evicted = 0
        with self._lock:
            for handle, entry in zip(handles, kept, strict=True):
                self._entries[handle] = entry
                self._nbytes += entry.nbytes
            while self._nbytes > self.capacity_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self._nbytes -= old.nbytes
                evicted += 1
            self.evicted += evicted
            lost = [h for h in handles if h not in self._entries]
        if evicted:
            logger.debug("handle store full (%d bytes budget): evicted %d oldest handles", self.capacity_bytes, evicted)
        if lost:
            logger.warning(
                "one encode request needs more than the handle store's %d bytes: %d of its %d handles were "
                "evicted at once; raise handle_store_bytes or send fewer samples per request",
                self.capacity_bytes, len(lost), len(handles),
            )
        return handles

    def get(self, handle: str, *, context: str = "") -> KeptSample:
        with self._lock:
            entry = self._entries.get(handle)
            if entry is None:
                raise HandleNotFound(handle, context)
            self._entries.move_to_end(handle)
            return entry

    def release(self, handles: Sequence[str]) -> int:
        """Forget ``handles``; return how many existed."""
        released = 0
        with self._lock:
            for handle in dict.fromkeys(handles):
                entry = self._entries.pop(handle, None)
                if entry is not None:
                    self._nbytes -= entry.nbytes
                    released += 1
        return released

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes


# ---- jobs for the device thread ---------------------------------------------------------------------------


@dataclass(eq=False)
class _EncodeJob:
    samples: list[Sample]
    return_question_features: bool
    max_length: int | None
    future: Future = field(default_factory=Future)
    features: list[TeacherFeatures | None] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.features = [None] * len(self.samples)

    def fail(self, exc: BaseException) -> None:
        """Record the first error; the batcher raises it to the caller once the group is done (stats first)."""
        if self.error is None:
            self.error = exc


@dataclass(eq=False)
class _ScoreJob:
    outputs: list[Tensor]  # per item (La_i, D_l)
    kept: list[KeptSample]  # per item
    paths: list[str]  # per item
    ce_weight: float
    kl_weight: float
    normalizer: float | None
    future: Future = field(default_factory=Future)


@dataclass(eq=False)
class _Entry:
    """One sample of an encode job, as the batcher plans forwards."""

    job: _EncodeJob
    index: int  # position in job.samples
    sample: Sample


_STOP = object()


class TeacherEngine:
    """A frozen teacher VLM serving encode / score / release to many concurrent callers (thread-safe)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        start = time.monotonic()
        dtype, device_map = config.torch_dtype, config.resolved_device_map
        self.vlm: LoadedVLM | None = load_vlm(config.model_path, dtype=dtype, device_map=device_map)
        model = self.vlm.model
        model.eval()
        model.requires_grad_(False)
        head = self.vlm.head
        self._head_device = head.weight.device
        self._head_dtype = head.weight.dtype
        self._info = self._build_info()
        devices = sorted({str(p.device) for p in model.parameters()})
        logger.info(
            "loaded teacher %s (revision %s, %s) from %s in %.1fs: dtype %s, device_map %r, devices %s, head on %s; "
            "D_l=%d, V_l=%d",
            config.model_name, config.revision, self._info.architecture, config.model_path,
            time.monotonic() - start, dtype, device_map, ", ".join(devices), self._head_device,
            self._info.hidden_size, self._info.vocab_size,
        )
        self._handles = HandleStore(config.handle_store_bytes)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._backlog: deque = deque()  # a job taken from the queue that did not fit the current batch
        self._lock = threading.Lock()  # guards _closed against enqueues racing close()
        self._closed = False
        self._stats_lock = threading.Lock()
        self._stats = EngineStats()
        self._per_forward: dict[str, deque] = {
            name: deque(maxlen=_STATS_HISTORY)
            for name in ("samples_per_forward", "requests_per_forward", "padded_tokens_per_forward")
        }
        self._thread = threading.Thread(target=self._device_loop, name="teacher-batcher", daemon=True)
        self._thread.start()

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
    ) -> list[EncodedFeatures]:
        """Encode ``samples`` (images as PIL images or encoded bytes); results in request order, on CPU.

        Each result carries a fresh ``handle`` for ``score``; ``question_segments`` is empty unless
        ``return_question_features``. ``max_length`` (None or 0 = the server's limit) refuses longer samples.
        """
        self._check_open()
        if not samples:
            raise InvalidRequest("encode needs at least one sample")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 0):
            raise InvalidRequest(f"max_length must be a non-negative integer (0 = no limit), got {max_length!r}")
        limits = [n for n in (max_length, self.config.max_length) if n]
        job = _EncodeJob(
            samples=[_decoded(sample, i) for i, sample in enumerate(samples)],
            return_question_features=bool(return_question_features),
            max_length=min(limits) if limits else None,
        )
        self._submit(job)
        return job.future.result()

    def score(
        self,
        items: Sequence[tuple[str, str, Tensor]],
        *,
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
        normalizer: float | None = None,
        release: bool = False,
    ) -> tuple[list[PathScore], list[Tensor]]:
        """Score ``(handle, path, outputs (La, D_l))`` items with the teacher's head.

        Per path (first-seen order): ``L = ce_weight * CE + kl_weight * KL`` of the path's items together,
        divided by ``normalizer`` (None = the path's token count). Returns the path scores and, per item,
        ``dL/d outputs`` on CPU in the outputs' dtype. ``release`` forgets the handles after a successful score.
        """
        self._check_open()
        if not items:
            raise InvalidRequest("score needs at least one item")
        for name, value in (("ce_weight", ce_weight), ("kl_weight", kl_weight)):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InvalidRequest(f"{name} must be a finite number >= 0, got {value!r}")
        if normalizer is not None and (
            not isinstance(normalizer, int | float) or not math.isfinite(normalizer) or normalizer <= 0
        ):
            raise InvalidRequest(
                f"normalizer must be a positive finite number (an answer-token count) or None, got {normalizer!r}"
            )
        outputs, kept, paths, seen = [], [], [], set()
        for i, item in enumerate(items):
            handle, path, tensor = self._validate_item(i, item)
            if (handle, path) in seen:
                raise InvalidRequest(f"score item {i}: handle {handle!r} appears twice on path {path!r}")
            seen.add((handle, path))
            kept.append(self._handles.get(handle, context=f"score item {i}"))
            expected = (kept[-1].num_answer_tokens, self._info.hidden_size)
            if tuple(tensor.shape) != expected:
                raise InvalidRequest(
                    f"score item {i} (handle {handle!r}, path {path!r}): outputs must have shape (La, D_l) = "
                    f"{expected} (La = that sample's teacher answer tokens, D_l = the teacher's hidden size), "
                    f"got {tuple(tensor.shape)}"
                )
            finite = torch.isfinite(tensor).all(dim=1)
            if not bool(finite.all()):
                rows = (~finite).nonzero().squeeze(1)[:10].tolist()
                raise InvalidRequest(
                    f"score item {i} (handle {handle!r}, path {path!r}): outputs contain NaN or Inf at rows {rows}"
                )
            outputs.append(tensor)
            paths.append(path)
        job = _ScoreJob(outputs, kept, paths, float(ce_weight), float(kl_weight),
                        None if normalizer is None else float(normalizer))
        self._submit(job)
        result = job.future.result()
        if release:
            self._handles.release([item[0] for item in items])
        return result

    def release(self, handles: Sequence[str]) -> int:
        """Forget ``handles`` (unknown ones are ignored); return how many existed."""
        self._check_open()
        if isinstance(handles, str):
            raise InvalidRequest("release takes a list of handles, not a single string")
        return self._handles.release(list(handles))

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters."""
        with self._stats_lock:
            snapshot = replace(self._stats)
            for name, values in self._per_forward.items():
                setattr(snapshot, name, list(values))
        snapshot.handles = len(self._handles)
        snapshot.handle_bytes = self._handles.nbytes
        snapshot.evicted_handles = self._handles.evicted
        return snapshot

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse new calls (ShuttingDown), finish the queued ones, stop the device thread, free the model."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        logger.info("teacher engine closing: finishing queued jobs")
        self._thread.join()
        self._handles.clear()
        on_cuda = self._head_device.type == "cuda"
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

    def _submit(self, job) -> None:
        with self._lock:
            self._check_open()
            self._queue.put(job)

    def _validate_item(self, i: int, item) -> tuple[str, str, Tensor]:
        try:
            handle, path, tensor = item
        except (TypeError, ValueError):
            raise InvalidRequest(f"score item {i} must be a (handle, path, outputs) tuple") from None
        if not isinstance(handle, str) or not handle:
            raise InvalidRequest(f"score item {i}: handle must be a non-empty string, got {handle!r}")
        if not isinstance(path, str) or not path:
            raise InvalidRequest(f"score item {i} (handle {handle!r}): path must be a non-empty string like 'L1'")
        if not isinstance(tensor, Tensor):
            raise InvalidRequest(f"score item {i} (handle {handle!r}): outputs must be a tensor, got {type(tensor)}")
        if not tensor.is_floating_point():
            raise InvalidRequest(
                f"score item {i} (handle {handle!r}, path {path!r}): outputs must be floating point "
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
        )

    # ---- device thread -------------------------------------------------------------------------------

    def _device_loop(self) -> None:
        wait_s = self.config.batch_wait_ms / 1000.0
        while True:
            job = self._next_job(timeout=None)
            if job is _STOP:
                break
            if isinstance(job, _ScoreJob):
                self._run_score(job)
                continue
            group, num_samples = [job], len(job.samples)
            deadline = time.monotonic() + wait_s
            while num_samples < self.config.max_batch_samples:
                more = self._next_job(timeout=deadline - time.monotonic())
                if more is None:
                    break
                if not isinstance(more, _EncodeJob) or num_samples + len(more.samples) > self.config.max_batch_samples:
                    self._backlog.append(more)  # runs next, keeping arrival order
                    break
                group.append(more)
                num_samples += len(more.samples)
            self._run_encode_group(group)

    def _next_job(self, timeout: float | None):
        """The next job (backlog first); None when ``timeout`` seconds pass without one."""
        if self._backlog:
            return self._backlog.popleft()
        try:
            if timeout is None:
                return self._queue.get()
            if timeout <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run_encode_group(self, group: list[_EncodeJob]) -> None:
        entries = [_Entry(job, i, sample) for job in group for i, sample in enumerate(job.samples)]
        logger.debug("batcher: %d encode request(s), %d samples", len(group), len(entries))
        try:
            self._run_entries(entries)
        except BaseException as exc:  # a bug: fail whoever is still waiting rather than hang them
            logger.exception("batcher: unexpected error while encoding")
            for job in group:
                job.fail(exc)
        for job in group:
            if job.error is None:
                try:
                    self._deliver(job)
                except BaseException as exc:
                    logger.exception("batcher: unexpected error while handing out results")
                    job.fail(exc)
            if job.error is not None:
                with self._stats_lock:
                    self._stats.failed_encode_requests += 1
                job.future.set_exception(job.error)

    def _run_entries(self, entries: list[_Entry]) -> None:
        """Format and run ``entries`` in forwards that fit the budgets; fill in their jobs' features."""
        entries = [e for e in entries if e.job.error is None]
        if not entries:
            return
        limit = self.config.max_batch_samples
        if len(entries) > limit:
            for start in range(0, len(entries), limit):
                self._run_entries(entries[start : start + limit])
            return
        jobs = list(dict.fromkeys(e.job for e in entries))
        try:
            batch = self.vlm.encode([e.sample for e in entries])
        except Exception as exc:
            self._isolate(entries, jobs, exc, "formatting")
            return
        lengths = batch.inputs["attention_mask"].sum(dim=1).tolist()
        refused = False
        for entry, length in zip(entries, lengths, strict=True):
            max_length = entry.job.max_length
            if max_length is not None and length > max_length and entry.job.error is None:
                entry.job.fail(SampleError(
                    entry.sample.sample_id,
                    f"{length} teacher tokens exceed max_length={max_length}; raise max_length, shorten the "
                    "sample or filter it out",
                ))
                refused = True
        if refused:  # format the rest again without the refused requests
            self._run_entries(entries)
            return
        num_samples, padded_length = batch.input_ids.shape
        if num_samples * padded_length > self.config.max_batch_tokens:
            if num_samples == 1:
                entries[0].job.fail(ResourceExhausted(
                    f"sample {entries[0].sample.sample_id!r}: {padded_length} teacher tokens exceed the server's "
                    f"max_batch_tokens={self.config.max_batch_tokens}; shorten the sample (fewer or smaller "
                    "images, shorter text) or start the teacher with a larger max_batch_tokens"
                ))
                return
            # Halve, grouping similar lengths so that each half pads less.
            by_length = [e for _, e in sorted(zip(lengths, entries, strict=True), key=lambda pair: pair[0])]
            middle = num_samples // 2
            logger.debug(
                "batcher: %d x %d padded tokens > max_batch_tokens=%d; splitting %d + %d",
                num_samples, padded_length, self.config.max_batch_tokens, middle, num_samples - middle,
            )
            self._run_entries(by_length[:middle])
            self._run_entries(by_length[middle:])
            return
        try:
            model = self.vlm.model
            features = extract_teacher_features(self.vlm, batch.to(model.device, model.dtype))
        except Exception as exc:
            self._isolate(entries, jobs, exc, "forward")
            return
        with self._stats_lock:
            self._stats.forwards += 1
            self._per_forward["samples_per_forward"].append(num_samples)
            self._per_forward["requests_per_forward"].append(len(jobs))
            self._per_forward["padded_tokens_per_forward"].append(num_samples * padded_length)
        logger.debug(
            "batcher: forward of %d samples from %d request(s), %d x %d padded tokens",
            num_samples, len(jobs), num_samples, padded_length,
        )
        for entry, feature in zip(entries, features, strict=True):
            entry.job.features[entry.index] = feature

    def _isolate(self, entries: list[_Entry], jobs: list[_EncodeJob], exc: Exception, stage: str) -> None:
        """A merged batch failed: retry request by request so that only the culprit fails."""
        if isinstance(exc, torch.OutOfMemoryError) and self._head_device.type == "cuda":
            torch.cuda.empty_cache()
        if len(jobs) > 1:
            logger.debug("batcher: %s failed for %d merged requests (%s); retrying one by one", stage, len(jobs), exc)
            for job in jobs:
                self._run_entries([e for e in entries if e.job is job])
        elif isinstance(exc, torch.OutOfMemoryError) and len(entries) > 1:
            middle = len(entries) // 2
            logger.warning("batcher: out of memory on %d samples; retrying in halves", len(entries))
            self._run_entries(entries[:middle])
            self._run_entries(entries[middle:])
        else:
            if not isinstance(exc, ValueError):
                logger.warning("batcher: %s failed for one request: %r", stage, exc)
            jobs[0].fail(exc)

    def _deliver(self, job: _EncodeJob) -> None:
        """Keep each sample's scoring state under a new handle and hand the caller its results (CPU)."""
        results = []
        for feature in job.features:
            assert feature is not None, "every sample of a successful job has features"
            results.append(EncodedFeatures(
                sample_id=feature.sample_id,
                answer_segments=[_cpu_copy(s) for s in feature.answer_segments],
                question_segments=[_cpu_copy(s) for s in feature.question_segments]
                if job.return_question_features else [],
                answer_token_ids=_cpu_copy(feature.answer_token_ids),
                prediction_states=feature.prediction_states.to(self._head_device, self._head_dtype),
                question_lengths=[int(s.shape[0]) for s in feature.question_segments],
            ))
        kept = []
        for result in results:
            ids = result.answer_token_ids.to(self._head_device)
            states = result.prediction_states
            nbytes = ids.numel() * ids.element_size() + states.numel() * states.element_size()
            kept.append(KeptSample(ids, states, nbytes))
        for result, handle in zip(results, self._handles.put_many(kept), strict=True):
            result.handle = handle
        job.features = []  # drop the batch's device tensors
        with self._stats_lock:  # before the caller wakes up, so it sees its own request counted
            self._stats.encode_requests += 1
        job.future.set_result(results)

    def _run_score(self, job: _ScoreJob) -> None:
        try:
            result = self._score_on_device(job)
        except BaseException as exc:
            if not isinstance(exc, ValueError | torch.OutOfMemoryError):
                logger.exception("device thread: unexpected error while scoring")
            job.future.set_exception(exc)
            return
        with self._stats_lock:
            self._stats.score_requests += 1
        job.future.set_result(result)

    def _score_on_device(self, job: _ScoreJob) -> tuple[list[PathScore], list[Tensor]]:
        head = self.vlm.head
        weight = head.weight  # (V, D_l)
        by_path: dict[str, list[int]] = {}
        for i, path in enumerate(job.paths):
            by_path.setdefault(path, []).append(i)
        scores, grads = [], [None] * len(job.paths)
        for path, items in by_path.items():
            inputs = torch.cat([job.outputs[i].detach().to(weight.device, weight.dtype) for i in items])  # (N, D_l)
            labels = torch.cat([job.kept[i].answer_token_ids for i in items])  # (N,)
            states = torch.cat([job.kept[i].prediction_states for i in items]).to(weight.dtype)  # (N, D_l)
            score = score_with_head(
                weight, inputs, labels, states,
                head_bias=head.bias,
                ce_weight=job.ce_weight,
                kl_weight=job.kl_weight,
                normalizer=job.normalizer,
                chunk_size=self.config.chunk_size,
            )
            del inputs, states
            scores.append(PathScore(path, float(score.ce), float(score.kl), score.num_tokens))
            counts = [job.kept[i].num_answer_tokens for i in items]
            for i, grad in zip(items, split_rows(score.grad_inputs, counts), strict=True):
                grads[i] = grad.to("cpu", job.outputs[i].dtype, copy=True)  # (La_i, D_l)
        logger.debug("device thread: scored %d items on %d path(s)", len(job.paths), len(scores))
        return scores, grads


def _decoded(sample: Sample, position: int) -> Sample:
    """``sample`` with encoded image bytes decoded to RGB images (SampleError naming the sample if corrupt)."""
    if not isinstance(sample, Sample):
        raise InvalidRequest(f"encode item {position} must be a genrecal.sample.Sample, got {type(sample).__name__}")
    if all(isinstance(image, Image.Image) for image in sample.images):
        return sample
    images = []
    for k, image in enumerate(sample.images):
        if isinstance(image, bytes | bytearray):
            image = load_image(bytes(image), sample_id=sample.sample_id)
        elif not isinstance(image, Image.Image):
            raise SampleError(sample.sample_id, f"image {k} must be encoded bytes or a PIL image, got {type(image)}")
        images.append(image)
    return Sample(sample.sample_id, list(sample.turns), images)


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
