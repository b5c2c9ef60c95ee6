"""The Encode cache on a real tiny teacher: the same content from another client is served without a forward,
concurrent identical requests share one forward, results equal a fresh forward, memory is bounded, and it can
be switched off."""

from __future__ import annotations

import threading

import pytest
import torch

from genrecal.sample import Sample, Turn
from teacher_server.config import EngineConfig
from teacher_server.encode_cache import EncodeCache, content_key
from teacher_server.engine import TeacherEngine
from tests.conftest import random_image


@pytest.fixture(scope="module")
def teacher_path(tiny_checkpoint):
    return tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96)


@pytest.fixture
def make_engine(teacher_path):
    engines = []

    def make(**overrides) -> TeacherEngine:
        engines.append(TeacherEngine(EngineConfig(teacher_path, batch_wait_ms=0.0, **overrides)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def samples(rng, prefix: str, images: list) -> list[Sample]:
    answers = ["red", "a blue square", "no"]
    return [Sample(f"{prefix}{i}", [Turn("user", "<image>\nWhat is it?"), Turn("assistant", answer)], [image])
            for i, (answer, image) in enumerate(zip(answers, images, strict=True))]


def test_same_content_from_another_client_is_served_from_memory(make_engine, rng):
    engine = make_engine()
    images = [random_image(rng) for _ in range(3)]
    first = engine.encode(samples(rng, "exp1-", images), return_question_features=True, client="exp1")
    stats = engine.stats
    assert (stats.forwards, stats.cache_misses, stats.cache_hits, stats.cache_entries) == (1, 3, 0, 3)
    held = stats.handle_bytes
    assert held > 0 and stats.handle_charged_bytes == held
    second = engine.encode(samples(rng, "exp2-", images), return_question_features=True,  # other ids, same content
                           client="exp2")
    stats = engine.stats
    assert (stats.forwards, stats.cache_misses, stats.cache_hits) == (1, 3, 3)
    # The shared prediction states are held once; each client is charged its own handles in the fair store.
    assert stats.handle_bytes == held and stats.handle_charged_bytes == 2 * held
    assert engine.handle_bytes_by_client() == {"exp1": held, "exp2": held}
    assert stats.handles == 6 and len({f.handle for f in first + second}) == 6
    for a, b in zip(first, second, strict=True):
        assert b.sample_id.startswith("exp2-")
        assert torch.equal(a.answer_token_ids, b.answer_token_ids)
        assert a.teacher_ce is not None and b.teacher_ce == a.teacher_ce  # the cache keeps the teacher's own CE
        for x, y in zip(a.answer_segments + a.question_segments, b.answer_segments + b.question_segments, strict=True):
            assert torch.equal(x, y)
    # Both clients' handles score, identically; releasing one client's keeps the other's.
    outputs = [(torch.randn(f.num_answer_tokens, 96)) for f in first]
    scores_1, grads_1 = engine.score([(f.handle, "L1", o) for f, o in zip(first, outputs, strict=True)],
                                     client="exp1")
    assert engine.release([f.handle for f in first], client="exp1") == 3
    assert engine.stats.handle_bytes == held and engine.stats.handle_charged_bytes == held
    scores_2, grads_2 = engine.score([(f.handle, "L1", o) for f, o in zip(second, outputs, strict=True)],
                                     client="exp2")
    assert scores_1 == scores_2
    for g1, g2 in zip(grads_1, grads_2, strict=True):
        assert torch.equal(g1, g2)
    engine.release([f.handle for f in second], client="exp2")
    assert engine.stats.handle_bytes == 0 and engine.stats.handle_charged_bytes == 0


def test_cached_results_equal_a_fresh_forward(make_engine, rng):
    images = [random_image(rng) for _ in range(3)]
    cached = make_engine()
    cached.encode(samples(rng, "a", images))
    hit = cached.encode(samples(rng, "b", images), return_question_features=True)
    fresh = make_engine(encode_cache_bytes=0).encode(samples(rng, "b", images), return_question_features=True)
    for h, f in zip(hit, fresh, strict=True):
        assert h.teacher_ce == pytest.approx(f.teacher_ce, rel=1e-5)
        for x, y in zip(h.answer_segments + h.question_segments, f.answer_segments + f.question_segments, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_concurrent_identical_requests_share_one_forward(make_engine, rng):
    engine = make_engine()
    images = [random_image(rng) for _ in range(3)]
    results, errors = {}, []

    def student(k):
        try:
            results[k] = engine.encode(samples(rng, f"student{k}-", images))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=student, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    stats = engine.stats
    assert stats.forwards == 1 and sum(stats.samples_per_forward) == 3
    assert stats.cache_misses == 3 and stats.cache_hits + stats.cache_shared == 9
    for k in range(1, 4):
        for a, b in zip(results[0], results[k], strict=True):
            assert torch.equal(a.answer_segments[0], b.answer_segments[0])


def test_off_switch_and_the_memory_bound(make_engine, rng):
    images = [random_image(rng) for _ in range(3)]
    off = make_engine(encode_cache_bytes=0)
    off.encode(samples(rng, "a", images))
    off.encode(samples(rng, "b", images))
    stats = off.stats
    assert (stats.forwards, stats.cache_hits, stats.cache_misses, stats.cache_entries) == (2, 0, 0, 0)

    small = make_engine(encode_cache_bytes=1)  # smaller than any entry: everything is evicted at once
    small.encode(samples(rng, "a", images))
    small.encode(samples(rng, "b", images))
    stats = small.stats
    assert (stats.forwards, stats.cache_hits, stats.cache_entries, stats.cache_bytes) == (2, 0, 0, 0)


def test_a_failed_forward_fails_its_waiters_and_caches_nothing():
    cache = EncodeCache(1 << 20)
    assert cache.claim("k") == ("run", None)
    kind, pending = cache.claim("k")
    assert kind == "wait"
    cache.fail("k", RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        pending.result(timeout=1)
    assert cache.claim("k") == ("run", None)  # not cached: the next request computes it again
    with pytest.raises(ValueError, match=">= 0"):
        EncodeCache(-1)


def test_content_key_covers_what_the_body_sees():
    ids = torch.tensor([[5, 6, 7, 8]])
    pixels = torch.zeros(4, 3)
    base = content_key({"input_ids": ids, "pixel_values": pixels}, [(2, 4)], "rev1")
    assert base == content_key({"pixel_values": pixels.clone(), "input_ids": ids.clone()}, [(2, 4)], "rev1")
    assert base != content_key({"input_ids": ids, "pixel_values": pixels + 1e-3}, [(2, 4)], "rev1")  # image
    assert base != content_key({"input_ids": ids + 1, "pixel_values": pixels}, [(2, 4)], "rev1")  # text
    assert base != content_key({"input_ids": ids, "pixel_values": pixels}, [(3, 4)], "rev1")  # answer split
    assert base != content_key({"input_ids": ids, "pixel_values": pixels}, [(2, 4)], "rev2")  # teacher
    assert base != content_key({"input_ids": ids, "pixel_values": pixels.bfloat16()}, [(2, 4)], "rev1")  # dtype
