"""The teacher engine on a real tiny checkpoint: same math as the in-process teacher, batching across callers,
failure isolation, the handle store, and shutdown. (The status code of each failure, as a client receives it: the
end-to-end tests and tests/teacher_server/test_status_codes.py.)"""

from __future__ import annotations

import io
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from genrecal.errors import SampleError
from genrecal.families import load_vlm
from genrecal.head_scoring import reference_head_loss
from genrecal.sample import Sample, Turn
from genrecal.teacher import InProcessTeacher
from genrecal.tiny import base_tokenizer
from teacher_server.config import EngineConfig, checkpoint_fingerprint
from teacher_server.engine import TeacherEngine, tokenizer_fingerprint
from teacher_server.errors import (
    HandleNotFound,
    InvalidRequest,
    ResourceExhausted,
    ShuttingDown,
    status_for,
)
from tests.conftest import random_image

HIDDEN = 96
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "yes", "no", "large", "small", "left", "right"]
TIGHT = dict(rtol=1e-5, atol=1e-6)  # same batch, same math: fp32 round-off only
PADDED = dict(rtol=1e-4, atol=1e-5)  # another batch composition (padding, matmul shapes)


@pytest.fixture(scope="module")
def teacher_path(tiny_checkpoint):
    return tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def reference(teacher_path):
    return InProcessTeacher(load_vlm(teacher_path))


@pytest.fixture
def make_engine(teacher_path):
    engines = []

    def make(path=None, **overrides) -> TeacherEngine:
        engines.append(TeacherEngine(EngineConfig(path or teacher_path, **overrides)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def words(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def random_sample(rng, sample_id: str) -> Sample:
    """One of three shapes, with random text lengths: image + question, multi-turn, text only."""
    kind = int(rng.integers(3))
    answer = words(rng, int(rng.integers(1, 4)))
    if kind == 0:
        return Sample(sample_id, [Turn("user", "<image>\n" + words(rng, int(rng.integers(2, 8))) + "?"),
                                  Turn("assistant", answer)], [random_image(rng, int(rng.integers(32, 80)))])
    if kind == 1:
        return Sample(sample_id, [Turn("user", words(rng, 3) + "?"), Turn("assistant", answer),
                                  Turn("user", words(rng, int(rng.integers(1, 5))) + "?"),
                                  Turn("assistant", words(rng, 2))], [random_image(rng)])
    return Sample(sample_id, [Turn("user", words(rng, int(rng.integers(2, 10))) + "?"), Turn("assistant", answer)])


def random_samples(rng, n: int, prefix: str = "s") -> list[Sample]:
    return [random_sample(rng, f"{prefix}{i}") for i in range(n)]


def assert_same_features(got, want, tol, *, question_features: bool = True) -> None:
    assert got.sample_id == want.sample_id
    torch.testing.assert_close(got.answer_token_ids, want.answer_token_ids, rtol=0, atol=0)
    assert got.answer_lengths == [s.shape[0] for s in want.answer_segments]
    assert got.question_lengths == [s.shape[0] for s in want.question_segments]
    for a, b in zip(got.answer_segments, want.answer_segments, strict=True):
        torch.testing.assert_close(a, b, **tol)
    if question_features:
        for a, b in zip(got.question_segments, want.question_segments, strict=True):
            torch.testing.assert_close(a, b, **tol)
    else:
        assert got.question_segments == []
    torch.testing.assert_close(got.prediction_states, want.prediction_states, **tol)
    assert got.teacher_ce == pytest.approx(want.teacher_ce, rel=tol["rtol"], abs=tol["atol"])


def run_concurrently(calls) -> list:
    """Run the callables at once (one thread each, released together); return each result or exception."""
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def worker(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # returned to the test, which checks it
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a caller hung"
    return results


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- config and info ------------------------------------------------------------------------------------


def test_config_defaults_and_fix_it_messages(teacher_path, tmp_path):
    config = EngineConfig(teacher_path)
    assert config.model_name == teacher_path.name
    assert config.revision == checkpoint_fingerprint(teacher_path) and config.revision.startswith("sha256:")
    assert config.torch_dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert EngineConfig(teacher_path, dtype="bfloat16", revision="v7").torch_dtype == torch.bfloat16
    assert EngineConfig(teacher_path, revision="v7").revision == "v7"
    if not torch.cuda.is_available():
        assert config.resolved_device_map is None

    with pytest.raises(ValueError, match="is not a directory"):
        EngineConfig(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no config.json"):
        EngineConfig(tmp_path)
    with pytest.raises(ValueError, match="dtype must be 'auto', 'bfloat16' or 'float32'"):
        EngineConfig(teacher_path, dtype="fp8")
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive integer"):
        EngineConfig(teacher_path, max_batch_tokens=0)
    with pytest.raises(ValueError, match="raise max_batch_tokens or lower max_length"):
        EngineConfig(teacher_path, max_batch_tokens=100, max_length=200)
    with pytest.raises(ValueError, match="batch_wait_ms must be >= 0"):
        EngineConfig(teacher_path, batch_wait_ms=-1)


def test_checkpoint_fingerprint_follows_content_not_location(teacher_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(teacher_path, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(teacher_path)

    # Same names, shapes and dtypes (same safetensors header), other values: a fine-tune of the same base.
    tuned = tmp_path / "tuned"
    shutil.copytree(teacher_path, tuned)
    weights = load_file(tuned / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, tuned / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_fingerprint(tuned) != checkpoint_fingerprint(teacher_path)

    edited = tmp_path / "edited"
    shutil.copytree(teacher_path, edited)
    (edited / "chat_template.jinja").write_text((edited / "chat_template.jinja").read_text() + "\n")
    assert checkpoint_fingerprint(edited) != checkpoint_fingerprint(teacher_path)


def test_info_matches_the_model_and_fingerprints_are_stable(make_engine, reference, teacher_path, tmp_path):
    info = make_engine().info()
    head = reference.vlm.head.weight
    tokenizer = reference.vlm.processor.tokenizer
    assert info.architecture == "Qwen2VLForConditionalGeneration" and info.model_type == "qwen2_vl"
    assert (info.hidden_size, info.vocab_size) == (HIDDEN, head.shape[0]) == tuple(head.shape[::-1])
    assert info.vocab_size >= info.tokenizer_size == len(tokenizer)
    assert info.tokenizer_name == type(tokenizer).__name__
    assert info.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert info.model_name == teacher_path.name
    assert (info.max_batch_tokens, info.max_request_bytes) == (16384, 256 << 20)
    assert info.server_version == __import__("genrecal").__version__

    again = make_engine().info()
    assert (again.model_revision, again.tokenizer_fingerprint) == (info.model_revision, info.tokenizer_fingerprint)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(base_tokenizer("gpt2")) != info.tokenizer_fingerprint  # no family tokens

    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_path, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v * 1.5 for k, v in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    other_info = make_engine(other).info()
    assert other_info.model_name == "other-teacher"
    assert other_info.model_revision != info.model_revision
    assert other_info.tokenizer_fingerprint == info.tokenizer_fingerprint  # same tokenizer


def test_info_reports_the_resolution_and_encode_uses_it(make_engine, rng):
    """Info lists every knob of the family: the checkpoint's own values, or --image-options' where given."""
    assert make_engine().info().image_options == {"min_pixels": 3136, "max_pixels": 12544}  # the tiny recipe's
    engine = make_engine(image_options="max_pixels=50176")
    assert engine.info().image_options == {"min_pixels": 3136, "max_pixels": 50176}
    photo = Sample("photo", [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "noise")],
                   [random_image(rng, size=512)])
    (default,) = make_engine().encode([photo])
    (changed,) = engine.encode([photo])
    # 112 x 112 px -> 4 x 4 = 16 image tokens; 224 x 224 px -> 8 x 8 = 64
    assert changed.question_lengths[0] - default.question_lengths[0] == 64 - 16
    with pytest.raises(ValueError, match=r"unknown image option\(s\) \['max_patches'\].*min_pixels"):
        EngineConfig(engine.config.model_path, image_options="max_patches=4")


# ---- encode and score ------------------------------------------------------------------------------------


def test_encode_matches_the_in_process_teacher(make_engine, reference, rng):
    engine = make_engine(encode_cache_bytes=0)  # the second encode of the same samples runs a forward too
    samples = random_samples(rng, 4)
    want = reference.encode(samples)
    got = engine.encode(samples, return_question_features=True)
    assert [f.sample_id for f in got] == [s.sample_id for s in samples]
    for g, w in zip(got, want, strict=True):
        assert_same_features(g, w, TIGHT)
        assert g.answer_segments[0].device.type == "cpu"
    assert len({f.handle for f in got}) == len(got) and all(len(f.handle) == 32 for f in got)

    # Without question features the lengths still come back; images may come as encoded bytes.
    as_bytes = [Sample(s.sample_id, s.turns, [png_bytes(im) for im in s.images]) for s in samples]
    lean = engine.encode(as_bytes, return_question_features=False)
    for g, w in zip(lean, want, strict=True):
        assert_same_features(g, w, TIGHT, question_features=False)
    assert engine.stats.forwards == 2 and engine.stats.encode_requests == 2


def test_teacher_ce_is_the_hf_models_own_answer_ce(make_engine, reference, teacher_path, rng):
    """Encode's ``teacher_ce``: the plain HF model's CE (its own logits at its prediction positions against its
    answer ids), for a merged, padded forward of mixed samples, equal to the in-process teacher's."""
    engine = make_engine(encode_cache_bytes=0)
    samples = random_samples(rng, 5)
    got = engine.encode(samples)  # one forward of all five: padding, images and multi-turn mixed
    assert engine.stats.forwards == 1
    want = reference.encode(samples)
    vlm = load_vlm(teacher_path)
    with torch.no_grad():
        for sample, g, w in zip(samples, got, want, strict=True):
            batch = vlm.encode([sample])  # (1, L), unpadded
            logits = vlm.model(**batch.inputs, use_cache=False).logits[0]  # (L, V_l), the HF model's own head
            expected = torch.nn.functional.cross_entropy(
                logits[batch.prediction_positions(0)].float(), batch.answer_token_ids(0)
            ).item()
            assert g.num_answer_tokens > 0 and expected > 0
            assert g.teacher_ce == pytest.approx(expected, rel=1e-5, abs=1e-6), sample.sample_id
            assert w.teacher_ce == pytest.approx(expected, rel=1e-5, abs=1e-6), sample.sample_id
    assert len({round(f.teacher_ce, 6) for f in got}) > 1  # per sample, not one value for the batch


def test_score_matches_the_in_process_teacher_for_two_paths(make_engine, reference, rng):
    engine = make_engine()
    samples = random_samples(rng, 3)
    features = engine.encode(samples)
    ref_features = reference.encode(samples)
    torch.manual_seed(int(rng.integers(1 << 31)))
    # Interleaved paths: L1 on every sample, L2 (regularisation) on samples 0 and 2.
    plan = [("L1", 0), ("L2", 0), ("L1", 1), ("L2", 2), ("L1", 2)]
    outputs = [torch.randn(features[i].num_answer_tokens, HIDDEN) for _, i in plan]
    items = [(features[i].handle, path, out) for (path, i), out in zip(plan, outputs, strict=True)]
    weights = dict(ce_weight=0.7, kl_weight=0.4, normalizer=7.0)

    scores, grads = engine.score(items, **weights)

    assert [s.path for s in scores] == ["L1", "L2"]
    head = reference.vlm.head
    for score in scores:
        rows = [k for k, (path, _) in enumerate(plan) if path == score.path]
        want, want_grads = reference.score([ref_features[plan[k][1]] for k in rows], [outputs[k] for k in rows],
                                           **weights)
        assert score.num_tokens == want.num_tokens == sum(outputs[k].shape[0] for k in rows)
        assert score.ce == pytest.approx(float(want.ce), rel=1e-5)
        assert score.kl == pytest.approx(float(want.kl), rel=1e-5, abs=1e-7)
        for k, want_grad in zip(rows, want_grads, strict=True):
            assert grads[k].dtype == torch.float32 and grads[k].device.type == "cpu"
            torch.testing.assert_close(grads[k], want_grad, **TIGHT)
        # ... and the plain autograd math
        plain = reference_head_loss(
            head.weight, torch.cat([outputs[k] for k in rows]),
            torch.cat([ref_features[plan[k][1]].answer_token_ids for k in rows]),
            torch.cat([ref_features[plan[k][1]].prediction_states for k in rows]),
            head_bias=head.bias, **weights,
        )
        assert score.ce == pytest.approx(float(plain.ce), rel=1e-5)
        assert score.kl == pytest.approx(float(plain.kl), rel=1e-4, abs=1e-6)
        torch.testing.assert_close(torch.cat([grads[k] for k in rows]), plain.grad_inputs, rtol=1e-4, atol=1e-6)

    # Default normalizer = the path's token count; gradients come back in the outputs' dtype; release forgets.
    f = features[1]
    out64 = torch.randn(f.num_answer_tokens, HIDDEN, dtype=torch.float64)
    (score,), (grad,) = engine.score([(f.handle, "L1", out64)], release=True)
    want, (want_grad,) = reference.score([ref_features[1]], [out64.float()])
    assert score.ce == pytest.approx(float(want.ce), rel=1e-5)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad.float(), want_grad, **TIGHT)
    with pytest.raises(HandleNotFound):
        engine.score([(f.handle, "L1", out64)])
    assert engine.stats.score_requests == 2


# ---- batching across callers -----------------------------------------------------------------------------


def test_concurrent_callers_are_merged_into_one_forward_and_get_their_own_results(make_engine, reference, rng):
    callers, per_caller = 4, 2
    # The batch closes as soon as it is full, so the long wait costs nothing once every caller has arrived.
    engine = make_engine(max_batch_samples=callers * per_caller, batch_wait_ms=10_000)
    # The same sample ids in every request: results must be routed by request, not by id.
    requests = [random_samples(rng, per_caller, prefix="s") for _ in range(callers)]

    results = run_concurrently([lambda r=r: engine.encode(r, return_question_features=True) for r in requests])

    stats = engine.stats
    assert stats.forwards == 1
    assert stats.requests_per_forward == [callers] and stats.samples_per_forward == [callers * per_caller]
    for request, result in zip(requests, results, strict=True):
        assert not isinstance(result, Exception), result
        for sample, got in zip(request, result, strict=True):
            (want,) = reference.encode([sample])
            assert_same_features(got, want, PADDED)
    assert len({f.handle for result in results for f in result}) == callers * per_caller


def test_a_bad_sample_fails_only_its_own_request(make_engine, reference, rng):
    good = random_samples(rng, 2, prefix="good")
    # The boundary between the generation prompt and this answer falls inside a token: the adapter refuses it
    # when the caller's thread formats the sample, before anything is queued.
    unsplittable = [random_sample(rng, "fine"), Sample("unsplittable", [Turn("user", "q?"), Turn("assistant", "\n\nred")])]
    too_long = [random_sample(rng, "too-long")]
    corrupt = [Sample("corrupt", [Turn("user", "<image>\nq?"), Turn("assistant", "a")], [b"\x89PNG not really"])]
    # A window that would put every request the callers' threads queue (they start together) into one forward;
    # the good request, alone in it, waits it out.
    engine = make_engine(max_batch_samples=len(good) + len(unsplittable) + len(too_long), batch_wait_ms=2_000)

    results = run_concurrently([
        lambda: engine.encode(good),
        lambda: engine.encode(unsplittable),
        lambda: engine.encode(too_long, max_length=5),
        lambda: engine.encode(corrupt),
    ])

    ok, bad_format, bad_length, bad_image = results
    assert not isinstance(ok, Exception), ok
    for sample, got in zip(good, ok, strict=True):
        (want,) = reference.encode([sample])
        assert_same_features(got, want, PADDED, question_features=False)
    assert isinstance(bad_format, SampleError) and bad_format.sample_id == "unsplittable"
    assert "token boundary" in str(bad_format)
    assert isinstance(bad_length, SampleError) and bad_length.sample_id == "too-long"
    assert "exceed max_length=5" in str(bad_length)
    assert isinstance(bad_image, SampleError) and bad_image.sample_id == "corrupt"
    assert "cannot be decoded" in str(bad_image)
    assert status_for(bad_format)[0] == status_for(bad_image)[0] == "INVALID_ARGUMENT"
    stats = engine.stats
    assert stats.encode_requests == 1 and stats.failed_encode_requests == 3
    assert stats.handles == len(good)  # failed requests keep nothing


def test_token_budget_splits_forwards_and_refuses_an_oversized_sample(make_engine, reference, rng):
    samples = random_samples(rng, 6)
    lengths = [reference.vlm.encode([s]).input_ids.shape[1] for s in samples]
    budget = 2 * max(lengths) + 1  # room for two samples per forward at most
    engine = make_engine(max_batch_tokens=budget)

    got = engine.encode(samples, return_question_features=True)

    stats = engine.stats
    assert stats.forwards >= 3 and sum(stats.samples_per_forward) == len(samples)
    assert max(stats.padded_tokens_per_forward) <= budget
    for sample, g in zip(samples, got, strict=True):
        (want,) = reference.encode([sample])
        assert_same_features(g, want, PADDED)

    long_sample = Sample("long", [Turn("user", words(rng, budget)), Turn("assistant", "yes")])
    small = make_engine(max_batch_tokens=budget, max_batch_samples=2, batch_wait_ms=2_000)  # both in one window
    fine, refused = run_concurrently([lambda: small.encode(samples[:1]), lambda: small.encode([long_sample])])
    assert not isinstance(fine, Exception), fine
    assert isinstance(refused, ResourceExhausted)
    assert "sample 'long'" in str(refused) and f"max_batch_tokens={budget}" in str(refused)
    assert status_for(refused)[0] == "RESOURCE_EXHAUSTED"


# ---- handles and score validation ------------------------------------------------------------------------


def fixed_sample(sample_id: str) -> Sample:
    return Sample(sample_id, [Turn("user", "red or blue?"), Turn("assistant", "red")])


def test_old_handles_are_evicted_and_released_handles_forgotten(make_engine, reference):
    (probe,) = reference.encode([fixed_sample("probe")])
    la = probe.answer_token_ids.numel()
    one = la * (HIDDEN * 4 + 8)  # fp32 prediction states + int64 answer ids
    engine = make_engine(handle_store_bytes=one + one // 2)  # room for one sample's state
    first, second = engine.encode([fixed_sample("a")])[0], engine.encode([fixed_sample("b")])[0]
    assert engine.stats.handle_bytes == one
    with pytest.raises(HandleNotFound, match="evicted") as caught:
        engine.score([(first.handle, "L1", torch.zeros(la, HIDDEN))])
    assert first.handle in str(caught.value) and "re-Encode" in str(caught.value)
    assert status_for(caught.value) == ("NOT_FOUND", str(caught.value))
    engine.score([(second.handle, "L1", torch.zeros(la, HIDDEN))])
    assert engine.stats.evicted_handles == 1 and engine.stats.handles == 1

    assert engine.release([second.handle, second.handle, "never-issued"]) == 1
    assert engine.release([second.handle]) == 0
    assert engine.stats.handles == 0 and engine.stats.handle_bytes == 0
    with pytest.raises(HandleNotFound, match="released"):
        engine.score([(second.handle, "L1", torch.zeros(la, HIDDEN))])

    # A request that cannot keep all its handles is refused, and keeps nothing.
    with pytest.raises(ResourceExhausted, match="2 samples need .* bytes of teacher state") as caught:
        engine.encode([fixed_sample("c"), fixed_sample("d")])
    assert status_for(caught.value)[0] == "RESOURCE_EXHAUSTED"
    assert engine.stats.handles == 0 and engine.stats.failed_encode_requests == 1


def test_handles_belong_to_the_client_that_created_them(make_engine, reference):
    (probe,) = reference.encode([fixed_sample("probe")])
    la = probe.answer_token_ids.numel()
    one = la * (HIDDEN * 4 + 8)
    # Cache off: every handle holds its own state (with it, the same content would be held once).
    engine = make_engine(handle_store_bytes=4 * one, encode_cache_bytes=0)
    (mine,) = engine.encode([fixed_sample("a")], client="alice")
    outputs = torch.randn(la, HIDDEN)
    with pytest.raises(HandleNotFound) as caught:
        engine.score([(mine.handle, "L1", outputs)], client="bob")
    assert "unknown" in str(caught.value)  # the same answer as for a handle that never existed
    assert engine.release([mine.handle], client="bob") == 0
    (score,), _ = engine.score([(mine.handle, "L1", outputs)], client="alice")
    assert score.num_tokens == la

    # Bob never releases: once the store is full he evicts his own oldest handles, not Alice's.
    bobs = [engine.encode([fixed_sample(f"b{i}")], client="bob")[0] for i in range(6)]
    engine.score([(mine.handle, "L1", outputs)], client="alice")
    assert engine.stats.handles == 4 and engine.stats.evicted_handles == 3
    for lost in bobs[:3]:
        with pytest.raises(HandleNotFound):
            engine.score([(lost.handle, "L1", outputs)], client="bob")
    engine.score([(bobs[-1].handle, "L1", outputs)], client="bob")
    assert engine.release([mine.handle], client="alice") == 1


def test_score_rejects_malformed_items_with_a_message_naming_the_problem(make_engine, rng):
    engine = make_engine()
    f = engine.encode(random_samples(rng, 1))[0]
    la = f.num_answer_tokens
    good = torch.randn(la, HIDDEN)
    nan = good.clone()
    nan[la - 1, 3] = float("nan")
    cases = [
        ([(f.handle, "L1", torch.randn(la, HIDDEN + 1))], f"must have shape \\(La, D_l\\) = \\({la}, {HIDDEN}\\)"),
        ([(f.handle, "L1", torch.randn(la + 1, HIDDEN))], f"got \\({la + 1}, {HIDDEN}\\)"),
        ([(f.handle, "L1", torch.randn(la * HIDDEN))], f"got \\({la * HIDDEN},\\)"),
        ([(f.handle, "L1", nan)], f"NaN or Inf at rows \\[{la - 1}\\]"),
        ([(f.handle, "L1", torch.ones(la, HIDDEN, dtype=torch.int64))], "must be floating point"),
        ([(f.handle, "L1", good), (f.handle, "L1", good)], "appears twice on path 'L1'"),
        ([(f.handle, "", good)], "path must be a non-empty string"),
        ([], "at least one item"),
    ]
    for items, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            engine.score(items)
    with pytest.raises(InvalidRequest, match=f"score item 1 \\(handle {f.handle!r}"):
        engine.score([(f.handle, "L1", good), (f.handle, "L2", good[:1])])
    with pytest.raises(InvalidRequest, match="normalizer must be a positive finite number"):
        engine.score([(f.handle, "L1", good)], normalizer=0.0)
    with pytest.raises(InvalidRequest, match="kl_weight must be a finite number >= 0"):
        engine.score([(f.handle, "L1", good)], kl_weight=float("inf"))
    with pytest.raises(HandleNotFound, match="score item 1"):
        engine.score([(f.handle, "L1", good), ("no-such-handle", "L1", good)])
    # None of that touched the handle.
    (score,), _ = engine.score([(f.handle, "L1", good)])
    assert score.num_tokens == la and engine.stats.score_requests == 1


# ---- errors and shutdown ---------------------------------------------------------------------------------


def test_close_finishes_in_flight_work_then_refuses_calls(make_engine, rng):
    engine = make_engine(batch_wait_ms=10_000)  # the batcher would wait 10 s for company
    samples = random_samples(rng, 1)
    queued = threading.Event()
    submit = engine._submit

    def submit_and_signal(job):
        submit(job)
        queued.set()

    engine._submit = submit_and_signal
    in_flight, _ = run_concurrently([lambda: engine.encode(samples), lambda: queued.wait(10) and engine.close()])
    assert not isinstance(in_flight, Exception), in_flight
    assert in_flight[0].sample_id == samples[0].sample_id
    assert engine.closed and engine.vlm is None and not engine._batcher.running

    calls = [
        engine.info,
        lambda: engine.encode(samples),
        lambda: engine.score([(in_flight[0].handle, "L1", torch.zeros(1, HIDDEN))]),
        lambda: engine.release([in_flight[0].handle]),
    ]
    for call in calls:
        with pytest.raises(ShuttingDown) as caught:
            call()
        assert status_for(caught.value)[0] == "UNAVAILABLE"
    engine.close()  # idempotent
