"""The batcher's packing on real tiny checkpoints of every family: per-sample processor outputs, collated, give
the same inputs and the same body states as the processor's own batch and as one forward per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrecal.families import load_vlm, supported_model_types
from genrecal.sample import Sample, Turn
from teacher_server.batcher import Batcher, EncodeJob, FormattedSample, TransformersBody, collate
from tests.conftest import random_image


def mixed_samples(rng: np.random.Generator) -> list[Sample]:
    """Text only, one small image, one large image, and text only again: different lengths and image sizes."""
    return [
        Sample("text", [Turn("user", "what is red?"), Turn("assistant", "a colour")]),
        Sample("small", [Turn("user", "<image>\nwhat shape?"), Turn("assistant", "a circle")], [random_image(rng, 32)]),
        Sample("large", [Turn("user", "<image>\nwhat is left of the square here?"), Turn("assistant", "blue")],
               [random_image(rng, 96)]),
        Sample("text2", [Turn("user", "yes or no?"), Turn("assistant", "yes"), Turn("user", "again?"),
                         Turn("assistant", "no")]),
    ]


@pytest.fixture(scope="module", params=supported_model_types())
def vlm(request, tiny_checkpoint):
    # head size 32: a size every attention kernel accepts
    return load_vlm(tiny_checkpoint(request.param, tokenizer="gpt2", hidden_size=64))


def formatted(vlm, samples) -> list[FormattedSample]:
    out = []
    for sample in samples:
        batch = vlm.encode([sample])
        out.append(FormattedSample(sample, batch, int(batch.inputs["attention_mask"].sum())))
    return out


def test_collated_samples_equal_the_processors_batch_and_single_forwards(vlm):
    rng = np.random.default_rng(0)
    samples = mixed_samples(rng)
    singles = formatted(vlm, samples)
    together = vlm.encode(samples)
    body = TransformersBody(vlm)
    collated = collate([f.batch for f in singles], pad_token_id=body.pad_token_id, per_sample_keys=body.per_sample_keys)

    assert collated.sample_ids == together.sample_ids and collated.answer_spans == together.answer_spans
    assert set(collated.inputs) == set(together.inputs)
    for key, want in together.inputs.items():
        torch.testing.assert_close(collated.inputs[key], want, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")

    with torch.no_grad():
        states = body.hidden_states(singles)
        for f, got in zip(singles, states, strict=True):
            (want,) = body.hidden_states([f])
            assert got.shape == (f.num_tokens, vlm.head.weight.shape[1])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_forwards_respect_both_budgets_and_results_keep_request_order(vlm):
    rng = np.random.default_rng(1)
    samples = mixed_samples(rng) * 2
    singles = formatted(vlm, samples)
    budget = 2 * max(f.num_tokens for f in singles)  # at most two of the longest per forward
    batcher = Batcher(TransformersBody(vlm), max_batch_tokens=budget, max_batch_samples=3, batch_wait_ms=0)
    try:
        job = EncodeJob(singles)
        with torch.no_grad():
            batcher.submit(job)
            features = job.future.result(timeout=120)
        stats = batcher.stats
    finally:
        batcher.close()
    assert [f.sample_id for f in features] == [s.sample_id for s in samples]
    assert sum(stats.samples_per_forward) == len(samples) and max(stats.samples_per_forward) <= 3
    assert max(stats.padded_tokens_per_forward) <= budget
    for f, feature in zip(singles, features, strict=True):
        torch.testing.assert_close(feature.answer_token_ids, f.batch.answer_token_ids(0), rtol=0, atol=0)
    assert not batcher.running


def _slices(log: list, name: str, n: int, seconds: float):
    """A sliced device call: ``n`` slices of ``seconds`` each, logged; returns ``name``."""
    import time

    for i in range(n):
        time.sleep(seconds)
        log.append((name, i))
        yield
    return name


def test_a_sliced_call_yields_the_device_to_waiting_jobs_and_stops_when_cancelled():
    import time

    from teacher_server.batcher import DeviceCall
    from teacher_server.errors import Cancelled

    batcher = Batcher(None, max_batch_tokens=64, max_batch_samples=4, batch_wait_ms=0)
    log: list = []
    long = DeviceCall(lambda: _slices(log, "long", 40, 0.01))
    batcher.submit(long)
    while not log:  # the long call is running
        time.sleep(0.001)
    short = DeviceCall(lambda: _slices(log, "short", 1, 0.0))
    batcher.submit(short)
    assert short.future.result(timeout=10) == "short"
    assert not long.future.done()  # the short call ran between two of the long call's slices
    assert long.future.result(timeout=10) == "long" and len(log) == 41

    gone = DeviceCall(lambda: _slices(log, "gone", 1000, 0.01))
    batcher.submit(gone)
    while not any(name == "gone" for name, _ in log):
        time.sleep(0.001)
    gone.cancel(Cancelled("the caller is gone"))
    with pytest.raises(Cancelled):
        gone.future.result(timeout=10)
    assert sum(name == "gone" for name, _ in log) < 1000
    batcher.close()


def test_an_encode_group_of_many_forwards_yields_the_device_between_forwards():
    import time

    from teacher_server.batcher import DeviceCall

    log: list = []

    class Recording(Batcher):  # the scheduling only: each forward is 20 ms and is logged
        def _run_forward(self, entries):
            time.sleep(0.02)
            log.append(("forward", entries[0].index))

    batcher = Recording(None, max_batch_tokens=64, max_batch_samples=1, batch_wait_ms=0)
    heavy = EncodeJob([FormattedSample(None, None, 8) for _ in range(30)])  # 30 forwards of one sample
    batcher.submit(heavy)
    while not log:
        time.sleep(0.001)
    quick = DeviceCall(lambda: log.append(("quick", 0)) or "done")
    batcher.submit(quick)
    assert quick.future.result(timeout=10) == "done"
    assert not heavy.future.done()  # it ran between two of the group's forwards
    heavy.future.result(timeout=10)
    assert sum(kind == "forward" for kind, _ in log) == 30
    batcher.close()
