"""Device scoring in blocks: the same loss and gradients as one score_with_head call over the whole path, one
slice per block, and a stop between blocks when the caller is gone."""

from __future__ import annotations

import pytest
import torch

from genrecal.head_scoring import IGNORE_INDEX, score_with_head
from teacher_server.errors import Cancelled
from teacher_server.scoring import score_in_blocks


def run(generator):
    slices = 0
    while True:
        try:
            next(generator)
            slices += 1
        except StopIteration as done:
            return done.value, slices


@pytest.mark.parametrize("normalizer", [None, 7.5])
def test_blocks_equal_one_call_over_the_whole_path(normalizer):
    torch.manual_seed(0)
    vocab, width, rows = 300, 16, 1000
    weight = torch.randn(vocab, width, dtype=torch.float64)
    bias = torch.randn(vocab, dtype=torch.float64)
    inputs, states = torch.randn(rows, width, dtype=torch.float64), torch.randn(rows, width, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,))
    labels[::17] = IGNORE_INDEX  # ignored rows count in neither the loss nor the default normalizer
    kwargs = dict(head_bias=bias, ce_weight=0.7, kl_weight=1.3, normalizer=normalizer)
    whole = score_with_head(weight, inputs, labels, states, chunk_size=rows, **kwargs)
    blocked, slices = run(score_in_blocks(weight, inputs, labels, states, chunk_size=128, stopped=lambda: False,
                                          **kwargs))
    assert slices == 8  # ceil(1000 / 128)
    assert blocked.num_tokens == whole.num_tokens
    torch.testing.assert_close(blocked.ce, whole.ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked.kl, whole.kl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked.grad_inputs, whole.grad_inputs, rtol=1e-12, atol=1e-12)


def test_a_stopped_caller_is_dropped_between_blocks():
    weight, inputs = torch.randn(50, 8), torch.randn(300, 8)
    labels, states = torch.randint(0, 50, (300,)), torch.randn(300, 8)
    blocks = []

    def stopped():
        blocks.append(1)
        return len(blocks) > 2

    with pytest.raises(Cancelled):
        run(score_in_blocks(weight, inputs, labels, states, head_bias=None, ce_weight=1.0, kl_weight=1.0,
                            normalizer=None, chunk_size=64, stopped=stopped))
    assert len(blocks) == 3  # two blocks scored, the third never started
