"""The teacher as the trainer uses it: timed, and riding out a restart of a remote teacher.

:class:`ResilientTeacher` wraps any :class:`genrecal.teacher.Teacher` — the gRPC client
(:class:`genrecal.client.TeacherClient`) or an :class:`genrecal.teacher.InProcessTeacher` — and satisfies the same
protocol, adding the seconds spent waiting on the teacher (``wait_s``) and, for a remote teacher, recovery from
lost handles. :func:`open_teacher` builds one from an address or a checkpoint folder.

**Asynchronous Score.** ``score_paths_async`` sends a Score and returns at once (a :class:`ScoreInFlight`), so the
trainer computes the next micro-batch while the round trip runs (:mod:`student_trainer.step`). The calls go
to ONE worker thread, so they run and are answered in the order they were sent, each with the same retries and
lost-handle recovery as ``score_paths``. Only a remote teacher gets the thread (``async_score=True``, what
:func:`open_teacher` sets for an address): an in-process teacher would compute on the same device as the student,
so there is nothing to gain and it scores at once (an already completed future).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from genrecal.client import HandleLost, TeacherClient, TeacherError, TeacherUnavailable
from genrecal.families import load_vlm
from genrecal.head_scoring import HeadScore
from genrecal.replicas import ReplicatedTeacher, resolve_addresses
from genrecal.sample import Sample
from genrecal.teacher import InProcessTeacher, ScoredPaths, Teacher, TeacherFeatures
from genrecal.wire import WireTraffic

logger = logging.getLogger(__name__)


class TeacherMismatchError(ValueError):
    """The teacher differs from the one the run (its manifest, or the step's features) was started with."""


class ServedTeacher(Teacher, Protocol):
    """A teacher behind a service: it can be waited for, and pinned to one model revision."""

    address: str
    expect_revision: str | None

    def wait_until_serving(self, timeout_s: float = 300.0) -> None: ...


class ResilientTeacher:
    """Wraps a teacher (in-process or remote), adds up the seconds spent waiting on it, and rides out a restart of
    a remote teacher without losing or repeating a step.

    **Teacher restarts.** A remote teacher keeps each sample's prediction states under a handle between
    ``encode`` and ``score``; a restarted (or memory-pressed) teacher has lost them and ``score`` raises
    :class:`~genrecal.client.HandleLost`. The wrapper remembers the sample behind every handle it encoded, so it
    then re-encodes the score call's samples, checks that the new features have the originals' sample ids,
    answer token ids and feature shapes (a different teacher cannot answer at all: the client sends the run's
    ``expect_revision``, which such a server refuses), moves the new handles into the *existing* feature objects
    and retries the score once. The student keeps the features it already has, and a deterministic teacher
    recomputes the same prediction states, so the step's mathematics is unchanged. Each recovery logs a warning
    and counts in ``recoveries``.

    Waiting for the teacher to come back is bounded in two layers: the client retries UNAVAILABLE with
    exponential backoff (0.5 s doubling, capped at 15 s, ``retries`` times: about 15 s for 5 retries, 60 s for
    8, plus 15 s per further retry); when those are spent, the wrapper waits up to ``restart_wait_s`` seconds for
    the teacher's health to turn SERVING (a big teacher takes minutes to load) and then repeats the call once, so
    one call waits at most about ``2 x client backoff + restart_wait_s``. An in-process teacher has no handles
    and never becomes unavailable: the wrapper only times it.
    """

    def __init__(self, teacher: Teacher, *, restart_wait_s: float | None = None, one_request_per_step: bool = False,
                 async_score: bool = False, **encode_kwargs):
        self.teacher = teacher
        self.encode_kwargs = encode_kwargs  # e.g. the remote client's max_length
        self.restart_wait_s = restart_wait_s  # None: give up when the client's own retries are spent
        self.one_request_per_step = one_request_per_step  # encode_step: all micro-batches in one encode call
        self.async_score = async_score  # score_paths_async: in a worker thread (True) or at once (False)
        self.wait_s = 0.0  # seconds the calling (training) thread spent in, or blocked on, teacher calls
        self._score_worker: ThreadPoolExecutor | None = None  # one thread: Score calls stay in order
        self.recoveries = 0  # re-encodes after a lost handle (teacher restarted or evicted our states)
        self._samples: dict[str, Sample] = {}  # handle -> the sample encoded under it (remote teachers only)
        self._lock = threading.Lock()  # guards _samples: the trainer encodes ahead in a prefetch thread

    # ---- the Teacher protocol -----------------------------------------------------------------------------
    @property
    def traffic(self) -> WireTraffic | None:
        """Bytes a remote teacher's calls sent and received so far; None for an in-process teacher."""
        return self.teacher.traffic if isinstance(self.teacher, TeacherClient | ReplicatedTeacher) else None

    @property
    def hidden_size(self) -> int:
        return self.teacher.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.teacher.vocab_size

    def identity(self) -> dict:
        return self.teacher.identity()

    def encode(self, samples: Sequence[Sample], **options) -> list[TeacherFeatures]:
        return self._timed(self._encode_untimed, samples, **options)

    def score(self, features: Sequence[TeacherFeatures], answer_outputs: Sequence[Tensor], **kwargs
              ) -> tuple[HeadScore, list[Tensor]]:
        return self._timed(self._recovering, features, lambda: self.teacher.score(features, answer_outputs, **kwargs))

    def score_paths(self, features: Sequence[TeacherFeatures], outputs_by_path: Mapping[str, Sequence[Tensor]],
                    **kwargs) -> dict[str, tuple[HeadScore, list[Tensor]]]:
        return self._timed(self._recovering, features,
                           lambda: self.teacher.score_paths(features, outputs_by_path, **kwargs))

    def score_paths_async(self, features: Sequence[TeacherFeatures], outputs_by_path: Mapping[str, Sequence[Tensor]],
                          **kwargs) -> ScoreInFlight:
        """``score_paths`` sent without waiting (see the module docstring); ``result()`` gives its answer.

        ``outputs_by_path`` must be detached and left unchanged until then; ``features``' handles may be replaced
        (a recovery) while the call is in flight, so release them only after ``result()``. Only the time
        ``result()`` blocks counts in ``wait_s``.
        """
        call = lambda: self.teacher.score_paths(features, outputs_by_path, **kwargs)  # noqa: E731
        if not self.async_score:
            done: Future = Future()
            done.set_result(self._timed(self._recovering, features, call))
            return ScoreInFlight(self, done)
        return ScoreInFlight(self, self._worker().submit(self._recovering, features, call))

    def release(self, features: Sequence[TeacherFeatures]) -> None:
        """Free the teacher's states of ``features``. With ``async_score`` the Release goes through the Score
        worker (after every Score sent before it, so no handle is freed before its last Score) and the training
        thread does not wait for its round trip; a Release that fails is logged (the server evicts unreleased
        states itself, nothing is lost)."""
        with self._lock:
            for f in features:
                if f.handle:
                    self._samples.pop(f.handle, None)
        call = lambda: self.teacher.release(features)  # noqa: E731
        if not self.async_score:
            self._timed(self._patient, "release", call)
            return
        self._worker().submit(self._patient, "release", call).add_done_callback(_log_failed_release)

    def _worker(self) -> ThreadPoolExecutor:
        """The one thread that sends Scores and Releases, in the order they were submitted (made on first use)."""
        if self._score_worker is None:
            self._score_worker = ThreadPoolExecutor(1, thread_name_prefix="teacher-score")
        return self._score_worker

    def close(self) -> None:
        """Close the teacher and drop it (an in-process teacher's memory goes with the last reference)."""
        if self._score_worker is not None:
            self._score_worker.shutdown(wait=True)  # a Score still in flight finishes first
            self._score_worker = None
        if self.teacher is not None:
            self.teacher.close()
        self.teacher = None

    # ---- beyond the protocol ------------------------------------------------------------------------------
    def pin_revision(self, revision: str) -> None:
        """A remote teacher is then asked to refuse every call should another model be swapped in mid-run."""
        if hasattr(self.teacher, "expect_revision"):
            self.teacher.expect_revision = revision

    def encode_step(self, groups: Sequence[Sequence[Sample]], *, timed: bool = True, **options
                    ) -> list[list[TeacherFeatures]]:
        """The features of one optimizer step's micro-batches (``groups``), per micro-batch.

        A remote teacher gets them in ONE request (``one_request_per_step``): one round trip and one batching wait
        instead of ``grad_accum``, and the server splits its forwards by its own ``max_batch_tokens``. An
        in-process teacher encodes micro-batch by micro-batch, so its forward never exceeds a micro-batch.

        A step may hold a sample more than once (a data set smaller than one step, an epoch boundary inside the
        step); a request may not (the service refuses repeated sample ids). Each distinct sample is encoded once
        and every occurrence gets the same :class:`TeacherFeatures` object (one handle, released once), so each
        occurrence still counts in the losses and token counts, as with the in-process teacher.

        ``timed=False`` keeps the call out of ``wait_s`` (the trainer's prefetch thread: its waiting is hidden
        behind compute, and the trainer times what remains). Safe to call from another thread than ``score``.
        """
        encode = self.encode if timed else self._encode_untimed
        if not self.one_request_per_step:
            return [encode(group, **options) for group in groups]
        unique = unique_samples(sample for group in groups for sample in group)
        encoded = dict(zip(unique, encode(list(unique.values()), **options), strict=True))
        return [[encoded[sample.sample_id] for sample in group] for group in groups]

    # ---- plumbing -----------------------------------------------------------------------------------------
    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.wait_s += time.perf_counter() - start

    def _patient(self, method: str, fn):
        """``fn()``; when the client's UNAVAILABLE retries are spent, wait for the teacher to serve, then once more."""
        try:
            return fn()
        except TeacherUnavailable as exc:
            if not self.restart_wait_s:
                raise
            logger.warning(
                "teacher unavailable for %s after the client's retries (%s); waiting up to %.0f s for it to serve "
                "again (restarting?)", method, exc.details, self.restart_wait_s,
            )
            self.teacher.wait_until_serving(self.restart_wait_s)
            return fn()

    def _encode_untimed(self, samples: Sequence[Sample], **options) -> list[TeacherFeatures]:
        samples = list(samples)
        features = self._encode(samples, **options)
        with self._lock:
            for sample, f in zip(samples, features, strict=True):
                if f.handle:
                    self._samples[f.handle] = sample
        return features

    def _encode(self, samples: Sequence[Sample], **options) -> list[TeacherFeatures]:
        kwargs = {**self.encode_kwargs, **options}
        features = self._patient("encode", lambda: self.teacher.encode(samples, **kwargs))
        if len(features) != len(samples):
            raise RuntimeError(f"the teacher returned {len(features)} features for {len(samples)} samples")
        return features

    def _recovering(self, features: Sequence[TeacherFeatures], score):
        """``score()`` (a score call on ``features``); on lost handles re-encode ``features``, then once more."""
        try:
            return self._patient("score", score)
        except HandleLost as lost:
            self._reencode(features, lost)
        return self._patient("score", score)  # once: the handles are fresh

    def _reencode(self, features: Sequence[TeacherFeatures], lost: HandleLost) -> None:
        """Re-encode ``features``' samples and move the new handles into ``features`` (in place)."""
        with self._lock:
            unknown = [f.sample_id for f in features if f.handle not in self._samples]
            if unknown:
                raise RuntimeError(
                    f"the teacher lost the handles of samples {unknown}, which were not encoded through this "
                    "wrapper, so they cannot be re-encoded"
                ) from lost
            samples = [self._samples[f.handle] for f in features]
        logger.warning(
            "teacher lost the states of %d sample(s) (%s): restarted or evicted them; re-encoding and retrying the "
            "score", len(features), lost.details,
        )
        fresh = self._encode(samples)
        for old, new in zip(features, fresh, strict=True):
            problem = _feature_difference(old, new)
            if problem:
                raise TeacherMismatchError(
                    f"after a teacher restart, sample {old.sample_id!r} re-encodes differently ({problem}): the "
                    f"teacher at {getattr(self.teacher, 'address', '?')} is not the one this step started with. "
                    "Restart it with the run's teacher checkpoint and rerun the command to resume"
                )
        stale = [replace(f) for f in features]  # the old handles, for a best-effort release
        with self._lock:
            for old, new, sample in zip(features, fresh, samples, strict=True):
                del self._samples[old.handle]
                old.handle = new.handle
                self._samples[new.handle] = sample
        try:  # frees what an eviction left behind; after a restart there is nothing left and this is a no-op
            self.teacher.release(stale)
        except TeacherError as exc:
            logger.debug("releasing stale handles failed (ignored): %s", exc)
        self.recoveries += 1
        logger.warning("teacher recovered: %d sample(s) re-encoded with identical answers (recovery %d)",
                       len(features), self.recoveries)


class ScoreInFlight:
    """A Score sent by :meth:`ResilientTeacher.score_paths_async`: ``result()`` waits for the answer (re-raising
    the call's error) and adds the time it blocked to the teacher's ``wait_s``."""

    def __init__(self, teacher: ResilientTeacher, future: Future):
        self._teacher, self._future = teacher, future

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> ScoredPaths:
        start = time.perf_counter()
        try:
            return self._future.result()
        finally:
            self._teacher.wait_s += time.perf_counter() - start


def _log_failed_release(done: Future) -> None:
    if done.exception() is not None:
        logger.warning("teacher Release failed (the server will evict those states itself): %s", done.exception())


def unique_samples(samples: Iterable[Sample]) -> dict[str, Sample]:
    """``{sample_id: sample}`` in first-seen order; two *different* samples under one id are refused."""
    unique: dict[str, Sample] = {}
    for sample in samples:
        first = unique.setdefault(sample.sample_id, sample)
        if first is not sample and (first.turns != sample.turns or len(first.images) != len(sample.images)):
            raise ValueError(
                f"two different samples share the id {sample.sample_id!r}; sample ids must be unique within the "
                "data (give each record its own 'id')"
            )
    return unique


def _feature_difference(old: TeacherFeatures, new: TeacherFeatures) -> str | None:
    """What differs between a sample's original and re-encoded teacher features (ids and shapes), or None."""
    if old.sample_id != new.sample_id:
        return f"sample id {new.sample_id!r}"
    if not torch.equal(old.answer_token_ids.cpu(), new.answer_token_ids.cpu()):
        return f"answer token ids {new.answer_token_ids.tolist()} instead of {old.answer_token_ids.tolist()}"
    for name in ("answer_segments", "question_segments"):
        before = [tuple(t.shape) for t in getattr(old, name)]
        after = [tuple(t.shape) for t in getattr(new, name)]
        if before != after:
            return f"{name} shapes {after} instead of {before}"
    return None


def open_teacher(
    *,
    addr: str | None = None,
    model: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_length: int | None = None,
    chunk_size: int = 512,
    timeout_s: float = 300.0,
    retries: int = 5,
    token_file: str | None = None,
    tls_ca: str | None = None,
    wire_dtype: torch.dtype | None = None,
    question_features: bool = True,
    image_options: dict | str | None = None,
) -> ResilientTeacher:
    """A teacher: a connection to the service at ``addr``, or the checkpoint ``model`` loaded in this process.

    Remote: ``addr`` is HOST:PORT, or several comma-separated (or a name resolving to several) for teacher
    replicas (:class:`genrecal.replicas.ReplicatedTeacher`). Every call has the deadline ``timeout_s``; UNAVAILABLE is retried ``retries`` times with backoff
    (0.5 s doubling, capped at 15 s), and after that the wrapper waits up to ``timeout_s`` more for the teacher to
    serve again (a restart) before it gives up (:class:`ResilientTeacher`). ``wire_dtype``: the dtype features,
    Recalibrator outputs and gradients travel in (None: the teacher's / the outputs' own); ``question_features``:
    ask for the teacher's question features (the regularisation path L2 and the alignment check need them).
    ``image_options``: an in-process teacher's resolution knobs (:mod:`genrecal.families.resolution`); a teacher
    service sets its own (``--image-options``), so they are refused with an address.
    """
    if (addr is None) == (model is None):
        raise ValueError("pass exactly one of a teacher address (--teacher-addr) and a teacher model (--teacher-model)")
    if addr is not None and image_options:
        raise ValueError("image options apply to an in-process teacher; a teacher service sets its own resolution "
                         "(start it with --image-options; its Info reports them)")
    if addr is not None:
        addresses = resolve_addresses(addr)
        kwargs = dict(timeout_s=timeout_s, backoff_s=0.5, max_backoff_s=15.0, token_file=token_file, tls_ca=tls_ca,
                      feature_dtype=wire_dtype, wire_dtype=wire_dtype, question_features=question_features)
        if len(addresses) > 1:  # replicas: a dead one is dropped after one retry, its work moves to the others
            client = ReplicatedTeacher(addresses, retries=1, **kwargs)
        else:
            client = TeacherClient(addr, retries=retries, **kwargs)
        client.wait_until_serving(timeout_s)
        return ResilientTeacher(client, restart_wait_s=timeout_s, one_request_per_step=True, async_score=True,
                                max_length=max_length)
    vlm = load_vlm(model, dtype=dtype, image_options=image_options)
    vlm.model.to(device)
    return ResilientTeacher(InProcessTeacher(vlm, max_length=max_length, chunk_size=chunk_size))
