"""The drawn pictures of the vision encoders' pre-training show what their labels say."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from demo.easy_vqa import SHAPES
from demo.pictures import RGB, SIDE, draw_picture, labelled_pictures
from demo.splits import COLOURS


def background(pixels: np.ndarray) -> np.ndarray:
    """The most common colour of an (N, 3) pixel array."""
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return colours[counts.argmax()]


def shape_pixels(image) -> np.ndarray:
    """(SIDE, SIDE) mask of the pixels far from the background."""
    pixels = np.asarray(image, dtype=np.int32)
    return np.abs(pixels - background(pixels.reshape(-1, 3))).sum(axis=-1) > 60


@pytest.mark.parametrize("colour", COLOURS)
def test_a_picture_is_its_colour_on_a_light_background(colour):
    rng = random.Random(colour)
    for shape in SHAPES:
        image = draw_picture(colour, shape, rng)
        assert image.size == (SIDE, SIDE) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.int32).reshape(-1, 3)
        fill = np.array(RGB[colour])
        assert np.abs(pixels - fill).sum(axis=-1).min() <= 30  # the fill itself (an 8-px shape keeps a few pixels)
        light = background(pixels)
        assert light.min() >= 228
        # every other pixel blends the two (the anti-aliased edge), up to the down-scaling filter's ringing
        towards = fill - light
        share = np.clip((pixels - light) @ towards / max(towards @ towards, 1), 0, 1)
        residual = np.abs(pixels - (light + share[:, None] * towards)).sum(axis=-1)
        assert residual.max() < 80, (colour, shape, residual.max())


def test_the_shapes_fill_their_bounding_boxes_as_circles_rectangles_and_triangles_do():
    """Filled share of the bounding box: rectangle 1, circle pi/4, triangle 1/2 (large shapes only: exact enough)."""
    rng = random.Random(0)
    expected = {"rectangle": (0.9, 1.01), "circle": (0.7, 0.86), "triangle": (0.4, 0.6)}
    for shape, (low, high) in expected.items():
        shares = []
        while len(shares) < 10:
            mask = shape_pixels(draw_picture("blue", shape, rng))
            rows, cols = np.nonzero(mask)
            if rows.size == 0 or np.ptp(rows) < 20:
                continue
            shares.append(mask.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1)))
        assert low <= np.mean(shares) <= high, (shape, np.mean(shares))


def test_the_stream_is_seeded_and_its_labels_are_uniform_over_colours_and_shapes():
    first = [(np.asarray(im), lab) for im, lab in itertools.islice(labelled_pictures(3), 5)]
    again = [(np.asarray(im), lab) for im, lab in itertools.islice(labelled_pictures(3), 5)]
    assert all(np.array_equal(a, b) and la == lb for (a, la), (b, lb) in zip(first, again, strict=True))
    other = next(labelled_pictures(4))[0]
    assert not np.array_equal(np.asarray(other), first[0][0])
    labels = [lab for _, lab in itertools.islice(labelled_pictures(0), 480)]
    assert {lab.colour for lab in labels} == set(range(len(COLOURS)))
    assert {lab.shape for lab in labels} == set(range(len(SHAPES)))
    for image, lab in itertools.islice(labelled_pictures(1), 16):  # each picture shows its label's colour
        pixels = np.asarray(image, dtype=np.int32).reshape(-1, 3)
        assert np.abs(pixels - np.array(RGB[COLOURS[lab.colour]])).sum(axis=-1).min() <= 30
