"""The step prefetcher: steps come back in order, at most ``depth`` are built ahead, errors reach the trainer, and
what was built but never used is discarded at close."""

from __future__ import annotations

import threading

import pytest

from student_trainer.prefetch import StepPrefetcher


class Builder:
    """Builds ``("inputs", step)``, holding each build until the test lets it finish."""

    def __init__(self, fail_at: int | None = None):
        self.built: list[int] = []
        self.discarded: list[int] = []
        self.threads: set[str] = set()
        self.fail_at = fail_at
        self.release = threading.Semaphore(0)

    def build(self, step: int):
        self.release.acquire()
        self.threads.add(threading.current_thread().name)
        if step == self.fail_at:
            raise RuntimeError(f"teacher unreachable at step {step}")
        self.built.append(step)
        return ("inputs", step)

    def discard(self, inputs) -> None:
        self.discarded.append(inputs[1])


def test_without_depth_each_step_is_built_when_asked_in_the_calling_thread():
    builder = Builder()
    prefetcher = StepPrefetcher(builder.build, builder.discard, start=3, stop=10, depth=0)
    for _ in range(2):
        builder.release.release()
    assert [prefetcher.get(3), prefetcher.get(4)] == [("inputs", 3), ("inputs", 4)]
    assert builder.threads == {threading.current_thread().name} and builder.built == [3, 4]
    prefetcher.close()
    assert builder.discarded == []


@pytest.mark.parametrize("depth", [1, 2])
def test_steps_are_built_ahead_in_order_and_leftovers_discarded(depth):
    builder = Builder()
    prefetcher = StepPrefetcher(builder.build, builder.discard, start=5, stop=9, depth=depth)
    for _ in range(8):
        builder.release.release()  # every build may finish
    assert prefetcher.get(5) == ("inputs", 5)
    prefetcher.get(6)
    # After handing out step 6, steps 7 .. 6 + depth are scheduled (and none at or past stop=9).
    prefetcher.close()
    assert builder.built == list(range(5, min(7 + depth, 9)))
    assert builder.discarded == list(range(7, min(7 + depth, 9)))  # built ahead, never used: released
    assert builder.threads == {n for n in builder.threads if n.startswith("step-prefetch")}


def test_at_most_depth_steps_are_in_flight():
    builder = Builder()
    prefetcher = StepPrefetcher(builder.build, builder.discard, start=0, stop=100, depth=2)
    builder.release.release()
    assert prefetcher.get(0) == ("inputs", 0)
    # Steps 1 and 2 are scheduled, step 3 is not: with one more build allowed, only step 1 finishes.
    builder.release.release()
    assert prefetcher.get(1) == ("inputs", 1)
    assert len(prefetcher._pending) == 2 and [s for s, _ in prefetcher._pending] == [2, 3]
    for _ in range(2):
        builder.release.release()
    prefetcher.close()  # step 3 is cancelled if it has not started yet, else built: discarded either way
    assert builder.built[:3] == [0, 1, 2] and builder.discarded == builder.built[2:]


def test_a_failed_build_raises_in_the_trainer_and_asking_out_of_order_is_a_bug():
    builder = Builder(fail_at=1)
    prefetcher = StepPrefetcher(builder.build, builder.discard, start=0, stop=5, depth=1)
    for _ in range(3):
        builder.release.release()
    prefetcher.get(0)
    with pytest.raises(RuntimeError, match="teacher unreachable at step 1"):
        prefetcher.get(1)
    with pytest.raises(AssertionError, match="asked for step 4 but step 2 is next"):
        prefetcher.get(4)
    builder.release.release()
    prefetcher.close()
    assert prefetcher.wait_s >= 0
