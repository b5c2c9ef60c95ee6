"""Limits that keep the service up when some clients are careless or hostile.

``CallLimits`` holds the numbers (from the command line). ``CallTracker`` admits each TeacherService call:

- at most ``max_calls`` calls at once, and ``max_calls_per_client`` per client; an excess call is refused at once
  with RESOURCE_EXHAUSTED (it never waits for a worker thread). Calls are admitted when their headers arrive,
  before their request message is read (``teacher_server.admission``);
- health and reflection calls (no token needed) have their own budget: ``max_open_calls`` at once, at most
  ``OPEN_CALLS_PER_PEER`` per peer address;
- at most ``max_inflight_bytes`` held by the calls in flight (request payload received so far, response payload
  being sent); a call that would exceed it is refused with RESOURCE_EXHAUSTED;
- a server-side deadline per call (``call_timeout_s``) and a no-progress cut-off for streams
  (``stream_idle_s``): a client that opens a call and never sends its request, opens a Score stream and stops
  sending, or stops reading its Encode response, is cancelled (the client sees CANCELLED) and its worker thread and bytes are freed.

One reaper thread checks the calls in flight every ``reaper_interval_s`` and cancels the expired ones with
``grpc.ServicerContext.cancel`` (thread-safe; a handler blocked reading or writing then returns).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

from teacher_server.batcher import Cancellation
from teacher_server.errors import ResourceExhausted

logger = logging.getLogger(__name__)

MIB = 1 << 20
OPEN_CALLS_PER_PEER = 4  # health / reflection calls one peer address may have open at once


@dataclass(frozen=True)
class CallLimits:
    """Per-service limits; every one has a flag in ``python -m teacher_server --help``.

    The image limits (``--max-image-pixels``, ``--max-concurrent-decodes``) are the engine's, where images are
    decoded: ``EngineConfig`` and ``teacher_server.images``."""

    call_timeout_s: float = 600.0  # server-side deadline of one call (queueing, device time and streaming)
    stream_idle_s: float = 30.0  # a stream that moves no frame for this long is cancelled
    max_calls: int = 256  # TeacherService calls in flight at once (one worker thread each)
    # ... per client (token name, certificate name or peer address). One token usually serves a whole training:
    # R ranks hold up to 2R calls (a prefetched Encode and a Score each), so this must exceed 2 x ranks.
    max_calls_per_client: int = 64
    max_open_calls: int = 16  # health and reflection calls at once (they need no token)
    max_inflight_bytes: int = 2048 * MIB  # request + response payload bytes held by the calls in flight
    max_connection_idle_s: float = 600.0  # close a connection without calls for this long (clients reconnect)
    max_connection_age_s: float = 0.0  # close connections older than this (0: never); in-flight calls finish
    reaper_interval_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("call_timeout_s", "stream_idle_s", "reaper_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for name in ("max_calls", "max_calls_per_client", "max_open_calls", "max_inflight_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_calls_per_client > self.max_calls:
            raise ValueError(
                f"max_calls_per_client={self.max_calls_per_client} exceeds max_calls={self.max_calls}; lower it"
            )
        for name in ("max_connection_idle_s", "max_connection_age_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 seconds (0 = no limit), got {getattr(self, name)!r}")


class Call:
    """One admitted call: its client, its bytes, its progress. Handlers report progress; ``finish`` frees it."""

    def __init__(self, tracker: CallTracker, call_id: int, client: str, method: str, context, deadline: float,
                 open_call: bool = False):
        self._tracker = tracker
        self.id, self.client, self.method, self.context = call_id, client, method, context
        self.open_call = open_call  # a health / reflection call (its own budget)
        # fires when the RPC ends (done, cancelled by the client, disconnected, cut, or the server stopping):
        # the engine then drops the call's queued jobs and stops its running Score between blocks
        self.cancellation = Cancellation()
        self.deadline = deadline
        self.last_progress = time.monotonic()
        self.streaming = False  # only a stream that is reading or writing can stall; device time does not count
        self.nbytes = 0
        self.cut: str | None = None  # why the reaper cancelled it

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def stream(self, active: bool) -> None:
        self.streaming = active
        self.progress()

    def hold(self, nbytes: int) -> None:
        """Count ``nbytes`` more against the in-flight budget; ResourceExhausted if it is spent."""
        self._tracker._hold(self, nbytes)

    def remaining_s(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def finish(self) -> None:
        self._tracker._finish(self)
        self.cancellation.cancel()


class CallTracker:
    def __init__(self, limits: CallLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._calls: dict[int, Call] = {}
        self._per_client: Counter[str] = Counter()
        self._open_per_peer: Counter[str] = Counter()  # health / reflection calls
        self._nbytes = 0
        self._ids = itertools.count()
        self.cut_calls: Counter[str] = Counter()  # reason -> calls cancelled by the reaper
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="teacher-call-reaper", daemon=True)
        self._reaper.start()

    def admit(self, client: str, method: str, context, *, open_call: bool = False) -> Call:
        """Admit a call or raise ResourceExhausted at once; the call is finished when its RPC ends.

        ``open_call``: a health or reflection call, counted against ``max_open_calls`` and
        ``OPEN_CALLS_PER_PEER`` instead of the TeacherService limits."""
        limits = self.limits
        with self._lock:
            if open_call:
                if sum(self._open_per_peer.values()) >= limits.max_open_calls:
                    raise ResourceExhausted(f"the teacher has {limits.max_open_calls} health / reflection calls "
                                            "open; retry shortly")
                if self._open_per_peer[client] >= OPEN_CALLS_PER_PEER:
                    raise ResourceExhausted(f"this address already has {OPEN_CALLS_PER_PEER} health / reflection "
                                            "calls open; wait for them")
                call = Call(self, next(self._ids), client, method, context,
                            time.monotonic() + limits.call_timeout_s, open_call=True)
                self._calls[call.id] = call
                self._open_per_peer[client] += 1
            elif self._teacher_calls() >= limits.max_calls:
                raise ResourceExhausted(
                    f"the teacher is serving its limit of {limits.max_calls} calls at once; retry shortly"
                )
            elif self._per_client[client] >= limits.max_calls_per_client:
                raise ResourceExhausted(
                    f"this client already has {limits.max_calls_per_client} calls in flight (the per-client limit); "
                    "wait for them before starting more"
                )
            else:
                call = Call(self, next(self._ids), client, method, context, time.monotonic() + limits.call_timeout_s)
                self._calls[call.id] = call
                self._per_client[client] += 1
        if context is not None and not context.add_callback(call.finish):
            call.finish()  # the RPC has already ended
        return call

    @property
    def active_calls(self) -> int:
        """TeacherService calls in flight."""
        with self._lock:
            return self._teacher_calls()

    def _teacher_calls(self) -> int:
        return len(self._calls) - sum(self._open_per_peer.values())

    @property
    def inflight_bytes(self) -> int:
        with self._lock:
            return self._nbytes

    def close(self) -> None:
        self._stop.set()
        self._reaper.join()

    # ---- internals ----------------------------------------------------------------------------------------

    def _hold(self, call: Call, nbytes: int) -> None:
        with self._lock:
            if call.id not in self._calls:
                return  # finished already (cancelled): nothing to count
            if self._nbytes + nbytes > self.limits.max_inflight_bytes:
                raise ResourceExhausted(
                    f"the teacher holds {self._nbytes} bytes for the calls in flight and this call needs {nbytes} "
                    f"more, beyond its limit of {self.limits.max_inflight_bytes}; retry shortly or send less per call"
                )
            self._nbytes += nbytes
            call.nbytes += nbytes

    def _finish(self, call: Call) -> None:
        with self._lock:
            if self._calls.pop(call.id, None) is None:
                return
            counter = self._open_per_peer if call.open_call else self._per_client
            counter[call.client] -= 1
            if not counter[call.client]:
                del counter[call.client]  # a client that holds nothing leaves no entry
            self._nbytes -= call.nbytes
            call.nbytes = 0

    def _reap(self) -> None:
        while not self._stop.wait(self.limits.reaper_interval_s):
            now = time.monotonic()
            with self._lock:
                calls = list(self._calls.values())
            for call in calls:
                if call.cut is not None:
                    continue
                if now > call.deadline:
                    call.cut = "deadline"
                elif call.streaming and now - call.last_progress > self.limits.stream_idle_s:
                    call.cut = "stalled"
                else:
                    continue
                logger.info("cancelling %s call of client %s: %s", call.method, call.client,
                            "past the server's deadline" if call.cut == "deadline" else
                            f"stream without progress for {self.limits.stream_idle_s:.0f} s")
                with self._lock:
                    self.cut_calls[call.cut] += 1
                if call.context is not None:
                    call.context.cancel()
                call.finish()
