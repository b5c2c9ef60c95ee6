"""The handle store's accounting: ownership, fair eviction (the largest holder pays), per-client share."""

from __future__ import annotations

import pytest
import torch

from teacher_server.errors import HandleNotFound, ResourceExhausted
from teacher_server.handles import HandleStore, KeptSample


def kept(nbytes: int) -> KeptSample:
    return KeptSample(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1), nbytes)


def test_the_largest_holder_loses_its_oldest_handles_first():
    store = HandleStore(100)
    (small,) = store.put_many([kept(20)], client="small")
    big = [store.put_many([kept(20)], client="big")[0] for _ in range(4)]  # 100 bytes: full
    store.put_many([kept(20)], client="big")  # over: big holds 80 > 20, so big's oldest goes
    assert store.get(small, client="small").nbytes == 20
    with pytest.raises(HandleNotFound):
        store.get(big[0], client="big")
    # A newcomer may take what the largest holder has beyond a fair share.
    store.put_many([kept(30)], client="new")
    assert store.bytes_by_client() == {"small": 20, "big": 40, "new": 30}
    assert store.nbytes == 90 and store.evicted == 3 and store.evicted_by_client == {"big": 3}


def test_a_request_larger_than_a_clients_share_is_refused_and_keeps_nothing():
    store = HandleStore(100, client_share=0.5)
    with pytest.raises(ResourceExhausted, match="more than one client may keep \\(50 bytes"):
        store.put_many([kept(30), kept(30)], client="a")
    assert len(store) == 0 and store.nbytes == 0
    first = store.put_many([kept(30)], client="a")
    store.put_many([kept(30)], client="a")  # over its share: its own oldest goes, even with room left
    with pytest.raises(HandleNotFound):
        store.get(first[0], client="a")
    assert store.bytes_by_client() == {"a": 30}


def test_other_clients_cannot_see_or_release_a_handle():
    store = HandleStore(100)
    (handle,) = store.put_many([kept(10)], client="a")
    with pytest.raises(HandleNotFound):
        store.get(handle, client="b")
    assert store.release([handle], client="b") == 0
    assert store.get(handle, client="a").nbytes == 10
    assert store.release([handle, handle], client="a") == 1 and len(store) == 0 and store.bytes_by_client() == {}


def test_a_state_shared_by_several_handles_is_held_once_and_charged_to_each_holder():
    """The encode cache gives several clients the same KeptSample: memory counts it once, fairness per holder."""
    store = HandleStore(100)
    shared = kept(40)
    (a,) = store.put_many([shared], client="a")
    (b,) = store.put_many([shared], client="b")
    assert store.nbytes == 40 and store.charged_bytes == 80
    assert store.bytes_by_client() == {"a": 40, "b": 40}
    # 60 more bytes fit in the 100 held (they would not if the shared state were counted twice).
    (c,) = store.put_many([kept(60)], client="c")
    assert store.nbytes == 100 and store.evicted == 0
    # Over capacity: the largest charged holder ("c") pays; dropping a shared handle alone would free nothing.
    store.put_many([kept(10)], client="a")
    with pytest.raises(HandleNotFound):
        store.get(c, client="c")
    assert store.nbytes == 50 and store.evicted_by_client == {"c": 1}
    # Releasing one holder of the shared state keeps it for the other; the last release frees its memory.
    assert store.release([a], client="a") == 1 and store.nbytes == 50 and store.get(b, client="b") is shared
    assert store.release([b], client="b") == 1 and store.nbytes == 10 and store.charged_bytes == 10


def test_eviction_of_shared_handles_goes_on_until_the_memory_fits():
    store = HandleStore(100)
    shared = kept(50)
    store.put_many([shared], client="big")
    store.put_many([kept(10)], client="big")  # big's newer handle, not shared
    store.put_many([shared], client="other")  # 60 held, big charged 60, other 50
    store.put_many([kept(45)], client="new")  # 105 held: big pays, with the handle whose drop frees memory
    assert store.evicted_by_client == {"big": 1} and store.nbytes == 95
    assert store.bytes_by_client() == {"big": 50, "other": 50, "new": 45}
    # Holders whose only handles are shared lose them, largest first, until enough memory is free: dropping
    # big's shared handle frees nothing, dropping other's (then its last holder) frees 50.
    store.put_many([kept(50)], client="late")  # 145 held; big (50) and other (50) charged the most
    assert store.nbytes == 95 and store.bytes_by_client() == {"new": 45, "late": 50}
    assert store.evicted_by_client == {"big": 2, "other": 1}
