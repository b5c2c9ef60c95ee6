"""genrecal.client's image encoding: the teacher must see exactly the student's pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from genrecal.client import image_bytes
from genrecal.sample import load_image


@pytest.mark.parametrize("mode,side", [("RGB", 64), ("RGB", 97), ("L", 33), ("RGBA", 16)])
def test_image_bytes_round_trip_is_lossless(rng, mode, side):
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (side, side, channels), dtype=np.uint8).squeeze()
    image = Image.fromarray(pixels)  # mode from the array: L (2-D), RGB or RGBA
    assert image.mode == mode
    data = image_bytes(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = load_image(data, sample_id="s")  # what the teacher server does with the bytes
    assert np.array_equal(np.asarray(decoded), np.asarray(image.convert("RGB")))
