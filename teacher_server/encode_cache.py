"""The Encode cache: teacher work shared across student experiments that train on the same data.

Several students distilled from one teacher on the same samples would each make the teacher run the same
forwards. The engine keys every formatted sample by its content — exactly what the body would see: the
processor's ``input_ids`` (turns through the chat template), every image tensor (``pixel_values``, grids, ...),
the answer spans, and the teacher's revision — and serves a sample another client encoded recently from memory
instead of a forward. Sample ids are not part of the key (another experiment may name the sample otherwise), and
the encode options are not either: every entry holds the question features too, and ``max_length`` only refuses
samples before the cache is asked.

A sample that is being computed for one client when another asks for it is waited for, not computed twice
(students in lockstep send the same step at the same moment). Every handle issued for an entry holds the
entry's own ``KeptSample`` (the prediction states Score needs: one tensor in memory, however many clients hold
it); the handle store counts it once in the memory it holds and still charges each client for its handles, so
that its per-client fairness is unchanged (:mod:`teacher_server.handles`).

Bounded in bytes (LRU): an entry costs its CPU feature copies plus its prediction states, which live on the
head's device. ``capacity_bytes=0`` switches the cache off (``--encode-cache-gib 0``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from teacher_server.handles import KeptSample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedSample:
    """One sample's teacher results, reusable by every request that sends the same content."""

    answer_segments: list[Tensor]  # k-th (La_k, D_l) z_al, CPU
    question_segments: list[Tensor]  # k-th (Lq_k, D_l) z_ql, CPU
    answer_token_ids: Tensor  # (La,) CPU
    kept: KeptSample  # answer ids and prediction states on the head's device, shared by every handle
    teacher_ce: float | None = None  # the teacher's own mean token CE on its answers, nats/token

    @property
    def nbytes(self) -> int:
        cpu = sum(t.numel() * t.element_size() for t in (*self.answer_segments, *self.question_segments))
        return cpu + self.answer_token_ids.numel() * self.answer_token_ids.element_size() + self.kept.nbytes


@dataclass
class CacheStats:
    hits: int = 0  # samples served from the cache
    shared: int = 0  # samples that waited for another request computing the same content
    misses: int = 0  # samples that needed a forward
    entries: int = 0
    nbytes: int = 0
    evicted: int = 0


def content_key(inputs: dict[str, Tensor], answer_spans: list[tuple[int, int]], revision: str) -> str:
    """sha256 of everything the teacher's result depends on: its revision and the formatted sample."""
    digest = hashlib.sha256(revision.encode())
    digest.update(repr([tuple(span) for span in answer_spans]).encode())
    for name in sorted(inputs):
        value = inputs[name]
        if not isinstance(value, Tensor):
            digest.update(f"{name}={value!r}".encode())
            continue
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class EncodeCache:
    """Thread-safe LRU of ``CachedSample`` by content key, with in-flight sharing. ``capacity_bytes=0``: off.

    ``claim(key)`` answers one of: ``("hit", CachedSample)``; ``("wait", Future)`` — another request computes it,
    the future gets its ``CachedSample`` (or its error); ``("run", None)`` — the caller computes it and must
    then call ``fulfil`` or ``fail`` for the key.
    """

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"encode cache capacity must be >= 0 bytes (0 = off), got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, CachedSample] = OrderedDict()
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def claim(self, key: str) -> tuple[str, CachedSample | Future | None]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._stats.hits += 1
                return "hit", entry
            pending = self._pending.get(key)
            if pending is not None:
                self._stats.shared += 1
                return "wait", pending
            self._pending[key] = Future()
            self._stats.misses += 1
            return "run", None

    def fulfil(self, key: str, entry: CachedSample) -> None:
        """Store the result of a claimed key and hand it to whoever waits for it."""
        evicted = 0
        with self._lock:
            future = self._pending.pop(key)
            if key not in self._entries:
                self._entries[key] = entry
                self._stats.nbytes += entry.nbytes
            while self._stats.nbytes > self.capacity_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                self._stats.nbytes -= old.nbytes
                evicted += 1
            self._stats.evicted += evicted
        if evicted:
            logger.debug("encode cache full (%d bytes): evicted %d oldest samples", self.capacity_bytes, evicted)
        future.set_result(entry)

    def fail(self, key: str, exc: BaseException) -> None:
        """A claimed key could not be computed: its waiters get ``exc``; nothing is cached."""
        with self._lock:
            future = self._pending.pop(key)
        future.set_exception(exc)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._stats.nbytes = 0

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._stats.hits, self._stats.shared, self._stats.misses, len(self._entries),
                              self._stats.nbytes, self._stats.evicted)
