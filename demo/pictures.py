"""easy-VQA-style pictures drawn on the fly: the data of the vision encoders' own pre-training.

A real VLM's vision encoder was trained on images of its own (CLIP / SigLIP / InternViT pre-training) before the
VLM was. The demo's stands-in for that: an endless, seeded stream of 64x64 pictures of one coloured shape on a
light background, drawn as easy-VQA draws its own (one of its 8 colours and 3 shapes, size 8-36 px, anywhere in
the picture, anti-aliased), labelled with what they show. None of them is an easy-VQA picture, so the distillation
data never meets them. On easy-VQA's 1,000 test pictures a tiny InternViT trained on them with the vision probe
(7-px patches) tells the shape of 75-85 % after 1,000-1,250 steps of 64; with 14-px patches it stayed at 42-46 %
(``docs/demo.md``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from PIL import Image, ImageDraw

from demo.easy_vqa import SHAPES
from demo.pretrain import PictureLabels
from demo.splits import COLOURS

SIDE = 64  # easy-VQA's picture size
RGB = {"black": (0, 0, 0), "blue": (0, 0, 255), "brown": (165, 42, 42), "gray": (128, 128, 128),
       "green": (0, 255, 0), "red": (255, 0, 0), "teal": (0, 128, 128), "yellow": (255, 255, 0)}
SUPERSAMPLE = 4  # drawn at 4x, then scaled down: anti-aliased edges like easy-VQA's


def draw_picture(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """One SIDE x SIDE RGB picture of a ``colour`` ``shape`` at a random place and size on a light background."""
    if colour not in RGB or shape not in SHAPES:
        raise ValueError(f"draw_picture draws one of {sorted(RGB)} x {SHAPES}; got {colour!r} {shape!r}")
    big = SIDE * SUPERSAMPLE
    background = tuple(rng.randint(228, 255) for _ in range(3))
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    size = rng.uniform(8, 36) * SUPERSAMPLE
    x, y = rng.uniform(0, big - size), rng.uniform(0, big - size)
    fill = RGB[colour]
    if shape == "circle":
        draw.ellipse([x, y, x + size, y + size], fill=fill)
    elif shape == "rectangle":
        width, height = size, size * rng.uniform(0.5, 1.0) if rng.random() < 0.5 else size
        if rng.random() < 0.5:
            width, height = height, width
        draw.rectangle([x, y, x + width, y + height], fill=fill)
    else:  # an upward triangle, as easy-VQA's
        draw.polygon([(x + size / 2, y), (x, y + 0.87 * size), (x + size, y + 0.87 * size)], fill=fill)
    return image.resize((SIDE, SIDE), Image.LANCZOS)


def labelled_pictures(seed: int) -> Iterator[tuple[Image.Image, PictureLabels]]:
    """An endless seeded stream of (picture, its colour and shape class indices), colours and shapes uniform."""
    rng = random.Random(f"demo-pictures/{seed}")
    while True:
        colour, shape = rng.randrange(len(COLOURS)), rng.randrange(len(SHAPES))
        yield draw_picture(COLOURS[colour], SHAPES[shape], rng), PictureLabels(colour, shape)
