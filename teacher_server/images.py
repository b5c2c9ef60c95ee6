"""Image bytes from clients -> RGB images: an allowlist of formats, a pixel limit read from the header, and every
decode failure a SampleError naming the sample (INVALID_ARGUMENT), never INTERNAL.

Accepted formats (``IMAGE_FORMATS``): PNG, JPEG, WebP, GIF, BMP, TIFF. PIL's other plugins (DDS, TGA, SGI, PCX,
...) are never tried: they are rarely exercised code for untrusted bytes, and no data set needs them.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings

from PIL import Image, UnidentifiedImageError

from genrecal.errors import SampleError
from genrecal.sample import Sample
from teacher_server.errors import InvalidRequest

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # PIL format names; docs/teacher_server.md


def decode_sample_images(sample: Sample, position: int, *, max_pixels: int,
                         decodes: threading.BoundedSemaphore | None = None) -> Sample:
    """``sample`` with encoded image bytes decoded to RGB images (SampleError naming the sample if corrupt)."""
    if not isinstance(sample, Sample):
        raise InvalidRequest(f"encode item {position} must be a genrecal.sample.Sample, got {type(sample).__name__}")
    if all(isinstance(image, Image.Image) for image in sample.images):
        return sample
    images = []
    for k, image in enumerate(sample.images):
        if isinstance(image, bytes | bytearray):
            image = decode_image(bytes(image), sample_id=sample.sample_id, index=k, max_pixels=max_pixels,
                                 decodes=decodes)
        elif not isinstance(image, Image.Image):
            raise SampleError(sample.sample_id, f"image {k} must be encoded bytes or a PIL image, got {type(image)}")
        images.append(image)
    return Sample(sample.sample_id, list(sample.turns), images)


def decode_image(data: bytes, *, sample_id: str, index: int, max_pixels: int,
                 decodes: threading.BoundedSemaphore | None = None) -> Image.Image:
    """Encoded bytes -> RGB image, refusing one of more than ``max_pixels`` from its header, before decoding.

    A 450 KB PNG can announce 12000 x 12000 pixels (1.7 GB decoded): the size is read first (``Image.open``
    parses the header only), and only images within the limit are decoded, at most ``decodes`` at a time.
    Only ``IMAGE_FORMATS`` are tried (PIL's other plugins, DDS, TGA, SGI, PCX, ..., are rarely exercised code
    for untrusted bytes). Every problem, whatever a plugin raises, is a SampleError naming the sample
    (INVALID_ARGUMENT).
    """
    def too_large(size: str) -> SampleError:
        return SampleError(sample_id, f"image {index} has {size} pixels, more than this teacher's limit of "
                                      f"{max_pixels} (--max-image-pixels); resize it before sending")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own hard limit (2x its MAX_IMAGE_PIXELS)
        raise too_large(f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0)}") from exc
    except UnidentifiedImageError as exc:
        raise SampleError(sample_id, f"image {index}: image bytes cannot be decoded as one of the accepted formats "
                                     f"({', '.join(IMAGE_FORMATS)})") from exc
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: whatever a plugin raises is the sample's fault
        raise SampleError(sample_id, f"image {index}: image bytes cannot be decoded ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise too_large(f"{width} x {height} = {width * height}")
    try:
        with decodes if decodes is not None else contextlib.nullcontext():
            image.load()
            return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - as above (OSError, ValueError, SyntaxError, struct.error, ...)
        raise SampleError(sample_id, f"image {index}: image bytes cannot be decoded ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})") from exc
