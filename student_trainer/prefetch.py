"""The inputs of optimizer steps ahead of the one computing, built in a background thread.

A step's inputs are its micro-batches' samples (read and decoded), the student's encoded batches and the teacher's
features of all of them (one Encode round trip for a remote teacher). :class:`StepPrefetcher` builds those of steps
``t+1 .. t+depth`` while step ``t`` runs forward and backward, so the teacher's latency and the data decoding hide
behind the student's compute. Only local work runs in the thread — no collective, no DeepSpeed call — so ranks
cannot deadlock on it, and the step order is the data order of :class:`student_trainer.data.ShardedBatches`, which
depends on the step number alone: a resumed run prefetches exactly what an uninterrupted one would.

Memory: ``depth`` extra steps of student batches and teacher features (``z_al``, ``z_ql``) on the host, and on the
teacher service ``depth`` extra steps of prediction states under their handles. Steps are consumed and released
in order; :meth:`StepPrefetcher.close` waits for the step in flight and releases what was built but never used.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StepPrefetcher(Generic[T]):
    """``get(step)`` returns ``build(step)``; with ``depth > 0`` the steps after it are already being built.

    Steps must be asked for in increasing order from ``start``; none at or after ``stop`` is built. ``discard``
    frees a built step that will never be used (e.g. releases its teacher handles). ``wait_s`` adds up the seconds
    ``get`` blocked on a step that was not ready yet.
    """

    def __init__(self, build: Callable[[int], T], discard: Callable[[T], None], *, start: int, stop: int,
                 depth: int):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.build, self.discard, self.depth = build, discard, depth
        self.stop = stop
        self.wait_s = 0.0
        self._next = start  # the next step to hand to the thread
        self._pending: deque[tuple[int, Future]] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="step-prefetch") if depth > 0 else None

    def get(self, step: int) -> T:
        if self._executor is None:
            return self.build(step)
        self._schedule_through(step + self.depth)
        queued, future = self._pending.popleft()
        if queued != step:
            raise AssertionError(f"prefetcher asked for step {step} but step {queued} is next")
        start = time.perf_counter()  # steps step+1 .. step+depth stay in flight while this one computes
        try:
            return future.result()  # re-raises the build's error (e.g. the teacher unreachable)
        finally:
            self.wait_s += time.perf_counter() - start

    def _schedule_through(self, last: int) -> None:
        while self._next <= min(last, self.stop - 1):
            self._pending.append((self._next, self._executor.submit(self.build, self._next)))
            self._next += 1

    def close(self) -> None:
        """Cancel what has not started, wait for the step in flight, discard every built step not handed out."""
        if self._executor is None:
            return
        for _, future in self._pending:
            future.cancel()
        self._executor.shutdown(wait=True)
        for step, future in self._pending:
            if future.cancelled():
                continue
            if future.exception() is not None:
                logger.debug("prefetched step %d had failed (ignored at close): %s", step, future.exception())
                continue
            try:
                self.discard(future.result())
            except Exception as exc:  # a best-effort cleanup must not hide the error that stopped the stage
                logger.warning("could not discard prefetched step %d: %s", step, exc)
        self._pending.clear()
        self._executor = None
