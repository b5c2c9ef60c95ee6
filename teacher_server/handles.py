"""The handle store: what the teacher keeps per encoded sample between Encode and Score.

Encode keeps each sample's prediction-position states and answer ids (``KeptSample``) under a fresh random
handle; Score looks them up, Release (or ``score(release=True)``) forgets them. The store is bounded in bytes
and evicts the least recently used entries when full. Several handles may hold the same ``KeptSample`` (the
encode cache hands out one sample's states to every client that sends it): its bytes count once, while any
handle holds it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from teacher_server.errors import HandleNotFound

logger = logging.getLogger(__name__)


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
        self._holders: dict[int, int] = {}  # id(KeptSample) -> handles holding it (its bytes count once)
        self.evicted = 0

    def _hold(self, entry: KeptSample) -> None:
        holders = self._holders.get(id(entry), 0)
        if holders == 0:
            self._nbytes += entry.nbytes
        self._holders[id(entry)] = holders + 1

    def _drop(self, entry: KeptSample) -> None:
        holders = self._holders.pop(id(entry)) - 1
        if holders:
            self._holders[id(entry)] = holders
        else:
            self._nbytes -= entry.nbytes

    def put_many(self, kept: Sequence[KeptSample]) -> list[str]:
        """Store samples together; return their new handles."""
        handles = [uuid.uuid4().hex for _ in kept]
        evicted = 0
        with self._lock:
            for handle, entry in zip(handles, kept, strict=True):
                self._entries[handle] = entry
                self._hold(entry)
            while self._nbytes > self.capacity_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self._drop(old)
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
                    self._drop(entry)
                    released += 1
        return released

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._holders.clear()
            self._nbytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes
