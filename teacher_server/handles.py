"""The handle store: what the teacher keeps per encoded sample between Encode and Score, per client.

Encode keeps each sample's prediction-position states and answer ids (``KeptSample``) under a fresh random
handle owned by the calling client; Score looks them up, Release (or ``score(release=True)``) forgets them.
A handle is only visible to its owner: another client naming it gets NOT_FOUND, exactly as for a handle that
never existed, and the owner's handle is untouched.

The store is bounded in bytes of memory actually held: a ``KeptSample`` that several handles share (the Encode
cache hands the same states to every client that sends the same sample, :mod:`teacher_server.encode_cache`) is
counted once in ``nbytes`` and against ``capacity_bytes``, however many handles hold it. Each client is still
*charged* the full size of every handle it holds (``bytes_by_client``, its share, who is the largest holder), so
sharing cannot let one client crowd out the others. When the store is full, the entries evicted are the least
recently used ones *of the client charged the most bytes* (never the entries being stored), preferring those
whose states no other handle holds (dropping a shared one frees no memory); eviction goes on until the memory
fits. So with N clients holding handles, a client that holds at most ``capacity / N`` never loses a handle to the others: the largest holder then holds more,
and pays. A careless client that never releases evicts only its own handles once it is the largest holder. A
single request whose samples need more than the store (or more than ``client_share`` of it) is refused with
RESOURCE_EXHAUSTED, and nothing of it is kept.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from teacher_server.errors import HandleNotFound, ResourceExhausted

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
    """Thread-safe store of kept samples, per owning client, bounded in bytes (see the module docstring)."""

    def __init__(self, capacity_bytes: int, *, client_share: float = 1.0):
        if not 0 < client_share <= 1:
            raise ValueError(f"client_share must be in (0, 1], got {client_share}")
        self.capacity_bytes = capacity_bytes
        self.client_bytes = int(capacity_bytes * client_share)  # most one client may hold
        self._owner: dict[str, str] = {}  # handle -> client
        self._by_client: dict[str, OrderedDict[str, KeptSample]] = {}  # client -> its entries, LRU first
        self._bytes: Counter[str] = Counter()  # client -> bytes charged (every handle it holds, in full)
        self._refs: Counter[int] = Counter()  # id(KeptSample) -> handles holding it (all clients)
        self._lock = threading.Lock()
        self._nbytes = 0  # memory held: each distinct KeptSample once
        self.evicted = 0
        self.evicted_by_client: Counter[str] = Counter()

    def put_many(self, kept: Sequence[KeptSample], *, client: str = "") -> list[str]:
        """Store samples for ``client``; return their new handles. ResourceExhausted if they cannot all be kept."""
        need = sum(entry.nbytes for entry in kept)
        limit = min(self.capacity_bytes, self.client_bytes)
        if need > limit:
            raise ResourceExhausted(
                f"this request's {len(kept)} samples need {need} bytes of teacher state, more than one client may "
                f"keep ({limit} bytes of the {self.capacity_bytes}-byte handle store); send fewer or shorter "
                "samples per Encode, or start the teacher with a larger --handle-store-gib"
            )
        handles = [uuid.uuid4().hex for _ in kept]
        with self._lock:
            entries = self._by_client.setdefault(client, OrderedDict())
            for handle, entry in zip(handles, kept, strict=True):
                entries[handle] = entry
                self._owner[handle] = client
                self._hold(entry)
            self._bytes[client] += need
            fresh = set(handles)
            evicted: Counter[str] = Counter()
            while self._bytes[client] > self.client_bytes:  # over its own share: its oldest go first
                evicted[self._evict_oldest(client, fresh)] += 1
            while self._nbytes > self.capacity_bytes:  # memory is short: prefer handles whose drop frees some
                evicted[self._evict_oldest(self._largest_holder(fresh), fresh, frees_memory=True)] += 1
            self.evicted += sum(evicted.values())
            self.evicted_by_client.update(evicted)
        if evicted:
            logger.debug("handle store full (%d bytes): evicted %s", self.capacity_bytes, dict(evicted))
        return handles

    def get(self, handle: str, *, client: str = "", context: str = "") -> KeptSample:
        with self._lock:
            entries = self._by_client.get(client)
            entry = entries.get(handle) if entries is not None and self._owner.get(handle) == client else None
            if entry is None:
                raise HandleNotFound(handle, context)
            entries.move_to_end(handle)
            return entry

    def release(self, handles: Sequence[str], *, client: str = "") -> int:
        """Forget ``client``'s ``handles``; return how many it held (others' handles are not touched)."""
        released = 0
        with self._lock:
            for handle in dict.fromkeys(handles):
                if self._owner.get(handle) == client:
                    self._drop(client, handle)
                    released += 1
        return released

    def clear(self) -> None:
        with self._lock:
            self._owner.clear()
            self._by_client.clear()
            self._bytes.clear()
            self._refs.clear()
            self._nbytes = 0

    def bytes_by_client(self) -> dict[str, int]:
        with self._lock:
            return {client: n for client, n in self._bytes.items() if n}

    def __len__(self) -> int:
        with self._lock:
            return len(self._owner)

    @property
    def nbytes(self) -> int:
        """Memory held (a state shared by several handles counted once); ``<= capacity_bytes``."""
        with self._lock:
            return self._nbytes

    @property
    def charged_bytes(self) -> int:
        """What the clients are charged in all (a shared state once per handle); ``>= nbytes``."""
        with self._lock:
            return sum(self._bytes.values())

    # ---- under the lock ---------------------------------------------------------------------------------------

    def _hold(self, entry: KeptSample) -> None:
        key = id(entry)  # the entry object lives as long as a handle holds it, so its id cannot be reused
        if self._refs[key] == 0:
            self._nbytes += entry.nbytes
        self._refs[key] += 1

    def _largest_holder(self, fresh: set[str]) -> str:
        """The client holding the most bytes among those with evictable (not ``fresh``) entries."""
        candidates = [c for c, entries in self._by_client.items() if any(h not in fresh for h in entries)]
        assert candidates, "the store is over capacity only because of older entries"  # need <= capacity
        return max(candidates, key=lambda c: self._bytes[c])

    def _evict_oldest(self, client: str, fresh: set[str], *, frees_memory: bool = False) -> str:
        """Drop ``client``'s least recently used handle (with ``frees_memory``: its least recently used one whose
        state no other handle holds, if it has one)."""
        entries = self._by_client[client]
        handle = None
        if frees_memory:
            handle = next((h for h, e in entries.items() if h not in fresh and self._refs[id(e)] == 1), None)
        if handle is None:
            handle = next(h for h in entries if h not in fresh)
        self._drop(client, handle)
        return client

    def _drop(self, client: str, handle: str) -> None:
        entry = self._by_client[client].pop(handle)
        del self._owner[handle]
        self._bytes[client] -= entry.nbytes
        key = id(entry)
        self._refs[key] -= 1
        if self._refs[key] == 0:  # the last handle on these states: their memory is free
            del self._refs[key]
            self._nbytes -= entry.nbytes
        if not self._by_client[client]:
            del self._by_client[client]
            del self._bytes[client]
