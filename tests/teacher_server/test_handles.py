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
