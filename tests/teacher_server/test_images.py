"""Decoding clients' image bytes: the pixel limit read from the header, and the bound on concurrent decodes."""

from __future__ import annotations

import io
import threading

import pytest
from PIL import Image

from genrecal.errors import SampleError
from teacher_server.errors import status_for
from teacher_server.images import decode_image


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_over_the_pixel_limit_is_refused_naming_its_size_and_the_flag():
    data = png(120, 50)
    assert decode_image(data, sample_id="s", index=0, max_pixels=6000).size == (120, 50)  # exactly at the limit
    with pytest.raises(SampleError) as caught:
        decode_image(data, sample_id="big", index=2, max_pixels=5999)
    message = str(caught.value)
    assert "'big'" in message and "image 2 has 120 x 50 = 6000 pixels" in message
    assert "limit of 5999 (--max-image-pixels)" in message
    assert status_for(caught.value)[0] == "INVALID_ARGUMENT"


def test_decodes_wait_for_a_free_slot():
    """With every slot taken, a decode blocks; it finishes once a slot frees (the engine's semaphore has
    --max-concurrent-decodes slots, shared by all calls)."""
    slots = threading.BoundedSemaphore(1)
    done = threading.Event()
    result = {}

    def decode():
        result["image"] = decode_image(png(64, 64), sample_id="s", index=0, max_pixels=10_000, decodes=slots)
        done.set()

    slots.acquire()  # another call's decode holds the only slot
    worker = threading.Thread(target=decode)
    worker.start()
    assert not done.wait(0.5), "decoded without a free slot"
    slots.release()
    assert done.wait(30)
    worker.join()
    assert result["image"].mode == "RGB" and result["image"].getpixel((0, 0)) == (200, 30, 40)
    assert slots.acquire(blocking=False)  # the decode gave its slot back
