"""Shared fixtures: real-format tiny checkpoints written to disk once per test session."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(family, tokenizer="gpt2", **sizes)`` -> path of a saved checkpoint (built once)."""
    from genrecal.tiny import TinySizes, write_tiny_checkpoint

    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny")

    def build(family: str, tokenizer: str = "gpt2", seed: int = 0, **sizes):
        key = (family, tokenizer, seed, tuple(sorted(sizes.items())))
        if key not in cache:
            out = root / f"{family}-{tokenizer}-{seed}-{len(cache)}"
            cache[key] = write_tiny_checkpoint(family, out, sizes=TinySizes(**sizes), tokenizer=tokenizer, seed=seed)
        return cache[key]

    return build


def random_image(rng: np.random.Generator, size: int = 64) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test (seeded from the test name so failures reproduce)."""
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))
