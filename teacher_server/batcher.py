"""The device thread: merges encode requests into teacher forwards that fit the token budget, runs score calls.

A single thread (``Batcher``) does all device work, in arrival order. Callers format their samples in their own
thread (``FormattedSample``: the teacher processor's output for one sample, so its token count is known before
it is queued), submit a job and wait on its future. For encode jobs the batcher takes the first one, waits up
to ``batch_wait_ms`` for more, merges them up to ``max_batch_samples`` samples, and packs the samples into
forwards of at most ``max_batch_tokens`` padded ``B * L`` tokens (similar lengths together, so that little is
padding). Packing needs no re-formatting: per-sample processor outputs are padded and concatenated
(``collate``). If a merged forward fails, it is retried request by request so that only the culprit fails.

Fairness: while other jobs wait, a group of encode requests yields the device between two of its forwards, and a
Score (a ``DeviceCall`` whose ``fn`` returns a generator of blocks) between two of its blocks; each is requeued
behind the waiting jobs. One heavy request therefore delays the others by one forward or one block, not by its
whole duration. A job whose caller is gone is dropped when it comes up (``Cancellation``).

The body forward itself sits behind ``BodyBackend`` (one method: formatted samples in, per-sample body states
out), so that another inference engine can replace transformers' forward without touching the batching.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from genrecal.families import LoadedVLM
from genrecal.families.base import EncodedBatch
from genrecal.sample import Sample
from genrecal.teacher import TeacherFeatures, own_answer_ce
from teacher_server.errors import Cancelled, ShuttingDown

logger = logging.getLogger(__name__)

_STATS_HISTORY = 1000  # forwards remembered in the per-forward lists
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")  # (1, L) per sample
# Processor outputs with one row per sample rather than per image, by config.model_type (see `collate`).
PER_SAMPLE_IMAGE_INPUTS = {"idefics3": ("pixel_values", "pixel_attention_mask")}


@dataclass(frozen=True)
class FormattedSample:
    """One sample as the teacher's processor formatted it (in the caller's thread), ready to be packed."""

    sample: Sample  # images decoded
    batch: EncodedBatch  # B = 1, on CPU, unpadded
    num_tokens: int  # L: teacher tokens of this sample

    @property
    def sample_id(self) -> str:
        return self.sample.sample_id


class BodyBackend(Protocol):
    """Runs the teacher body: the one place a forward happens, so that a second inference engine plugs in here."""

    def hidden_states(self, samples: Sequence[FormattedSample]) -> list[Tensor]:
        """One forward over ``samples``; per sample the body's output after its final norm (the LM head's
        input), ``(L_i, D_l)`` with ``L_i = samples[i].num_tokens``, on the model's device."""
        ...


class TransformersBody:
    """``BodyBackend`` running the transformers model: collate the per-sample inputs, one forward."""

    def __init__(self, vlm: LoadedVLM):
        self.vlm = vlm
        self.pad_token_id = vlm.processor.tokenizer.pad_token_id
        self.per_sample_keys = PER_SAMPLE_IMAGE_INPUTS.get(vlm.adapter.model_type, ())

    def hidden_states(self, samples: Sequence[FormattedSample]) -> list[Tensor]:
        model = self.vlm.model
        batch = collate([s.batch for s in samples], pad_token_id=self.pad_token_id,
                        per_sample_keys=self.per_sample_keys)
        hidden = self.vlm.body_hidden_states(batch.to(model.device, model.dtype))  # (B, L, D_l)
        return [hidden[i, : s.num_tokens] for i, s in enumerate(samples)]


def collate(
    batches: Sequence[EncodedBatch], *, pad_token_id: int | None, per_sample_keys: Sequence[str] = ()
) -> EncodedBatch:
    """Single-sample processor outputs -> one right-padded batch, as the processor would have made it.

    Sequence tensors ``(1, L_i)`` are right-padded (``input_ids`` with the pad token, the others with 0).
    Image tensors are concatenated along dim 0 (flattened patches, Qwen2-VL / InternVL ``(N_i, ...)``, and
    per-image ones, LLaVA ``(n_i, 3, H, W)``, alike; a text-only sample adds no rows); tensors whose dim 1
    counts images or tiles (Idefics3, LLaVA-OneVision ``(n, k_i, 3, H, W)``) are zero-padded there first, which
    is how their processors pad a batch (the models drop all-zero images / use ``image_sizes``).
    ``per_sample_keys`` name image tensors with one row per *sample* (Idefics3): a text-only sample gets an
    all-zero row there, as its processor gives it.
    ``tests/teacher_server/test_batcher.py`` checks the result against the processor's own batch per family.
    """
    if not batches:
        raise ValueError("collate needs at least one batch")
    if any(len(b.sample_ids) != 1 for b in batches):
        raise ValueError("collate takes single-sample batches")
    if len(batches) == 1:
        return batches[0]
    length = max(b.input_ids.shape[1] for b in batches)
    inputs: dict[str, Tensor] = {}
    for key in dict.fromkeys(key for b in batches for key in b.inputs):
        if key in per_sample_keys:  # (1, n_i, ...) per sample; a text-only sample gets an all-zero row
            present = [b.inputs[key] for b in batches if b.inputs.get(key) is not None]
            blank = present[0].new_zeros((1, *present[0].shape[1:]))
            values = [b.inputs[key] if b.inputs.get(key) is not None else blank for b in batches]
        else:  # a text-only sample adds no rows to the image tensors
            values = [b.inputs[key] for b in batches if b.inputs.get(key) is not None]
        if key in SEQUENCE_KEYS:
            if len(values) != len(batches):
                raise ValueError(f"collate: sequence input {key!r} is missing for some samples")
            pad = pad_token_id if key == "input_ids" else 0
            if pad is None:
                raise ValueError("the teacher's tokenizer has no pad token; samples cannot be batched")
            values = [torch.nn.functional.pad(v, (0, length - v.shape[1]), value=pad) for v in values]
        elif values[0].dim() >= 3 and len({v.shape[2:] for v in values}) == 1 and len({v.shape[1] for v in values}) > 1:
            count = max(v.shape[1] for v in values)  # images or tiles per sample
            values = [_pad_dim1(v, count) for v in values]
        inputs[key] = torch.cat(values, dim=0)
    return EncodedBatch(
        sample_ids=[b.sample_ids[0] for b in batches],
        inputs=inputs,
        answer_spans=[b.answer_spans[0] for b in batches],
    )


def _pad_dim1(value: Tensor, size: int) -> Tensor:
    if value.shape[1] == size:
        return value
    padding = value.new_zeros((value.shape[0], size - value.shape[1], *value.shape[2:]))
    return torch.cat([value, padding], dim=1)


def sample_features(formatted: FormattedSample, states: Tensor) -> TeacherFeatures:
    """Slice what GenRecal needs out of one sample's body states ``(L, D_l)`` (views, on their device)."""
    batch = formatted.batch
    positions = batch.prediction_positions(0).to(states.device)  # (La,)
    return TeacherFeatures(
        sample_id=formatted.sample_id,
        answer_segments=[states[s:e] for s, e in batch.answer_spans[0]],
        question_segments=[states[s:e] for s, e in batch.question_segments(0)],
        answer_token_ids=batch.answer_token_ids(0),
        prediction_states=states[positions],  # (La, D_l), a copy (advanced indexing)
    )


# ---- jobs ---------------------------------------------------------------------------------------------------


class Cancellation:
    """Set once, when the caller of a job is gone (it cancelled or disconnected, or the server cut its call).

    The engine registers ``on_cancel`` callbacks that drop the caller's queued jobs and stop its running Score
    between blocks of rows; a callback registered after the fact runs at once. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._cancelled = False

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)
                return
        callback()

    @property
    def cancelled(self) -> bool:
        return self._cancelled


@dataclass(eq=False)
class EncodeJob:
    """The samples of one encode request; the future gets their ``TeacherFeatures`` (on the model's device)."""

    samples: list[FormattedSample]
    future: Future = field(default_factory=Future)
    features: list[TeacherFeatures | None] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.features = [None] * len(self.samples)

    def fail(self, exc: BaseException) -> None:
        """Record the first error; the batcher raises it to the caller once the group is done."""
        if self.error is None:
            self.error = exc

    def cancel(self, exc: BaseException) -> None:
        """The caller gave up: a queued job is dropped (its waiter returns at once), a running one's samples
        not run yet are skipped."""
        self.fail(exc)
        self.future.cancel()


@dataclass(eq=False)
class DeviceCall:
    """Any other device work (scoring): ``fn()`` runs on the device thread, in arrival order."""

    fn: Callable[[], object]  # its result, or a generator of slices whose return value is the result
    future: Future = field(default_factory=Future)
    cancelled: BaseException | None = None
    steps: Generator | None = None  # the slices left of a sliced call

    def cancel(self, exc: BaseException) -> None:
        """The caller gave up: skip the call if it has not started; ``fn`` checks ``stopped`` as it runs."""
        self.cancelled = exc
        self.future.cancel()  # a queued call: its waiter returns at once (a running one: no effect)

    def stopped(self) -> bool:
        return self.cancelled is not None


@dataclass(eq=False)
class _Entry:
    job: EncodeJob
    index: int  # position in job.samples

    @property
    def formatted(self) -> FormattedSample:
        return self.job.samples[self.index]


@dataclass
class ForwardStats:
    forwards: int = 0
    samples_per_forward: list[int] = field(default_factory=list)
    requests_per_forward: list[int] = field(default_factory=list)
    padded_tokens_per_forward: list[int] = field(default_factory=list)  # B * L


@dataclass(eq=False)
class _GroupRun:
    """An encode group part-way through its planned forwards (it yielded the device to waiting jobs)."""

    group: list[EncodeJob]
    forwards: deque  # of list[_Entry], the forwards left


_STOP = object()


class Batcher:
    """The device thread. ``submit`` a job, wait on ``job.future``; ``close`` finishes the queued jobs."""

    def __init__(self, backend: BodyBackend, *, max_batch_tokens: int, max_batch_samples: int, batch_wait_ms: float,
                 head: nn.Linear | None = None, chunk_size: int = 512):
        self._backend: BodyBackend | None = backend
        # With the teacher's head, each forward's samples also get the teacher's own CE on its answers (teacher_ce).
        self.head: nn.Linear | None = head
        self.chunk_size = chunk_size
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_samples = max_batch_samples
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._backlog: deque = deque()  # a job taken from the queue that did not fit the current batch
        self._lock = threading.Lock()  # guards _closed against submits racing close()
        self._closed = False
        self._stats_lock = threading.Lock()
        self._forwards = 0
        self._per_forward: dict[str, deque] = {
            name: deque(maxlen=_STATS_HISTORY)
            for name in ("samples_per_forward", "requests_per_forward", "padded_tokens_per_forward")
        }
        self.forward_observers: list[Callable[[int, int], None]] = []  # (samples, padded tokens) per forward
        self._thread = threading.Thread(target=self._loop, name="teacher-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: EncodeJob | DeviceCall) -> None:
        with self._lock:
            if self._closed:
                raise ShuttingDown("the teacher engine is shutting down; retry against another teacher replica")
            self._queue.put(job)

    def close(self) -> None:
        """Refuse new jobs, run the queued ones, stop the thread and drop the backend and head (and the model)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join()
        self._backend = None
        self.head = None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the device thread."""
        return self._queue.qsize() + len(self._backlog)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def stats(self) -> ForwardStats:
        with self._stats_lock:
            return ForwardStats(self._forwards, *(list(self._per_forward[name]) for name in (
                "samples_per_forward", "requests_per_forward", "padded_tokens_per_forward")))

    # ---- the thread ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            job = self._next_job(timeout=None)
            if job is _STOP:
                self._finish_sliced_calls()
                break
            if isinstance(job, DeviceCall):
                if not _run_call(job, yield_to_others=lambda: self.queue_depth > 0):
                    self._queue.put(job)  # others were waiting: its next slice runs after them
                continue
            if isinstance(job, _GroupRun):  # an encode group that yielded the device: its next forwards
                if not self._continue_group(job):
                    self._queue.put(job)
                continue
            group, num_samples = [job], len(job.samples)
            deadline = time.monotonic() + self.batch_wait_s
            while num_samples < self.max_batch_samples:
                more = self._next_job(timeout=deadline - time.monotonic())
                if more is None:
                    break
                if not isinstance(more, EncodeJob) or num_samples + len(more.samples) > self.max_batch_samples:
                    self._backlog.append(more)  # runs next, keeping arrival order
                    break
                group.append(more)
                num_samples += len(more.samples)
            self._run_group(group)

    def _finish_sliced_calls(self) -> None:
        """At close: sliced calls requeued behind the stop marker run to their end (nothing else can be there)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, DeviceCall):
                _run_call(job)
            elif isinstance(job, _GroupRun):
                self._continue_group(job, may_yield=False)

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

    def _run_group(self, group: list[EncodeJob]) -> None:
        group = [job for job in group if job.future.set_running_or_notify_cancel()]  # drop the abandoned ones
        entries = [_Entry(job, i) for job in group for i in range(len(job.samples))]
        logger.debug("batcher: %d encode request(s), %d samples", len(group), len(entries))
        run = _GroupRun(group, deque(self._plan(entries)))
        if not self._continue_group(run):
            self._queue.put(run)

    def _continue_group(self, run: _GroupRun, *, may_yield: bool = True) -> bool:
        """Run ``run``'s next forwards; False if it yielded the device to waiting jobs with forwards left.

        Between two forwards a group lets the jobs that wait run first (it is requeued behind them), so one
        Encode of many long samples delays other clients by one forward, not by all of its forwards."""
        try:
            while run.forwards:
                self._run_forward(run.forwards.popleft())
                if run.forwards and may_yield and self.queue_depth > 0:
                    return False
        except BaseException as exc:  # a bug: fail whoever is still waiting rather than hang them
            logger.exception("batcher: unexpected error while encoding")
            for job in run.group:
                job.fail(exc)
        self._complete(run.group)
        return True

    def _complete(self, group: list[EncodeJob]) -> None:
        for job in group:
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result(job.features)
            job.features = []  # the caller holds them now

    def _plan(self, entries: list[_Entry]) -> list[list[_Entry]]:
        """Pack entries into forwards within both budgets; ascending length, so similar lengths pad together.

        Every sample fits alone (callers refuse longer ones before queueing them).
        """
        forwards: list[list[_Entry]] = []
        current: list[_Entry] = []
        for entry in sorted(entries, key=lambda e: e.formatted.num_tokens):
            longest = entry.formatted.num_tokens  # the longest so far: ascending order
            if current and (
                len(current) == self.max_batch_samples or (len(current) + 1) * longest > self.max_batch_tokens
            ):
                forwards.append(current)
                current = []
            current.append(entry)
        if current:
            forwards.append(current)
        return forwards

    def _run_forward(self, entries: list[_Entry]) -> None:
        """One forward over ``entries`` (of jobs not failed yet); fill in their jobs' features."""
        entries = [e for e in entries if e.job.error is None]
        if not entries:
            return
        jobs = list(dict.fromkeys(e.job for e in entries))
        formatted = [e.formatted for e in entries]
        try:
            states = self._backend.hidden_states(formatted)
            features = [sample_features(f, s) for f, s in zip(formatted, states, strict=True)]
            if self.head is not None:  # one head pass over the forward's prediction states, one sync
                for feature, ce in zip(features, own_answer_ce(self.head, features, self.chunk_size), strict=True):
                    feature.teacher_ce = ce
        except Exception as exc:
            self._isolate(entries, jobs, exc)
            return
        num_samples, padded_length = len(entries), max(f.num_tokens for f in formatted)
        with self._stats_lock:
            self._forwards += 1
            self._per_forward["samples_per_forward"].append(num_samples)
            self._per_forward["requests_per_forward"].append(len(jobs))
            self._per_forward["padded_tokens_per_forward"].append(num_samples * padded_length)
        logger.debug("batcher: forward of %d samples from %d request(s), %d x %d padded tokens",
                     num_samples, len(jobs), num_samples, padded_length)
        for entry, feature in zip(entries, features, strict=True):
            entry.job.features[entry.index] = feature
        for observe in self.forward_observers:
            observe(num_samples, num_samples * padded_length)

    def _isolate(self, entries: list[_Entry], jobs: list[EncodeJob], exc: Exception) -> None:
        """A merged forward failed: retry request by request so that only the culprit fails."""
        out_of_memory = isinstance(exc, torch.OutOfMemoryError)
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(jobs) > 1:
            logger.debug("batcher: forward failed for %d merged requests (%s); retrying one by one", len(jobs), exc)
            for job in jobs:
                self._run_forward([e for e in entries if e.job is job])
        elif out_of_memory and len(entries) > 1:
            middle = len(entries) // 2
            logger.warning("batcher: out of memory on %d samples; retrying in halves", len(entries))
            self._run_forward(entries[:middle])
            self._run_forward(entries[middle:])
        else:
            if not isinstance(exc, ValueError):
                logger.warning("batcher: forward failed for one request: %r", exc)
            jobs[0].fail(exc)


def _run_call(call: DeviceCall, yield_to_others: Callable[[], bool] = lambda: False) -> bool:
    """Run ``call`` (or its next slices); False if it yielded the device with slices left (requeue it).

    ``fn`` may return a generator: each ``next`` is one slice (a block of a long Score), its return value the
    result. Between slices the call yields the device when ``yield_to_others()`` (other jobs are waiting), so one
    long Score cannot hold every other client for its whole duration."""
    if call.steps is None:
        if call.cancelled is not None or not call.future.set_running_or_notify_cancel():
            return True  # the caller is gone (or past its deadline): its waiter has returned already
    try:
        if call.steps is None:
            result = call.fn()
            if not inspect.isgenerator(result):
                call.future.set_result(result)
                return True
            call.steps = result
        while True:
            if call.cancelled is not None:  # gone between slices
                call.steps.close()
                call.future.set_exception(call.cancelled)
                return True
            try:
                next(call.steps)
            except StopIteration as done:
                call.future.set_result(done.value)
                return True
            if yield_to_others():
                return False
    except BaseException as exc:
        if not isinstance(exc, ValueError | torch.OutOfMemoryError | Cancelled):
            logger.exception("device thread: unexpected error")
        call.future.set_exception(exc)
        return True
