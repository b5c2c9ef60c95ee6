"""One training sample: images plus a conversation, independent of any model's chat format.

A conversation is an optional leading ``system`` turn, then ``user`` and ``assistant`` turns alternating, ending
with an assistant turn. Every assistant turn is an answer span (docs/method.md, "Spans": ``a`` = the answer
tokens including the end-of-turn token); everything else, the system turn included, is question. The system turn
reaches the chat template as a system message (``{"role": "system", "content": [{"type": "text", ...}]}``).
Images are placed where ``<image>`` appears in a user turn (LLaVA convention); when no turn carries the
placeholder, all images go before the text of the first user turn.

Records on disk (LLaVA, ShareGPT, OpenAI-style messages, Hugging Face datasets) become samples in
:mod:`student_trainer.records`; this module only holds the type and the image decoding.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from genrecal.errors import SampleError

IMAGE_PLACEHOLDER = "<image>"
SOURCE_BYTES = "genrecal.source_bytes"  # Image.info key: (size, the encoded bytes the image was decoded from)
ROLES = ("system", "user", "assistant")
DIALOGUE_ROLES = ("user", "assistant")  # after the optional system turn, in this order, alternating


@dataclass(frozen=True)
class Turn:
    role: str  # "system" (only as the first turn), "user" or "assistant"
    text: str


@dataclass
class Sample:
    sample_id: str
    turns: list[Turn]
    images: list[Image.Image] = field(default_factory=list)
    # The record's row in the trainer's data source (set by its loader, so a sample the student cannot format is
    # skipped like a bad record); never sent to the teacher.
    source_index: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.turns:
            raise SampleError(self.sample_id, "the conversation has no turns")
        first = 1 if self.turns[0].role == "system" else 0  # the dialogue starts after the system turn
        if first and IMAGE_PLACEHOLDER in self.turns[0].text:
            raise SampleError(self.sample_id,
                              f"the system turn contains {IMAGE_PLACEHOLDER!r}; images go in user turns")
        if first == len(self.turns):
            raise SampleError(self.sample_id, "the conversation has a system turn but no user and assistant turns")
        for i, turn in enumerate(self.turns[first:], start=first):
            if turn.role not in ROLES:
                raise SampleError(self.sample_id, f"turn {i} has role {turn.role!r}; expected one of {ROLES}")
            expected = DIALOGUE_ROLES[(i - first) % 2]
            if turn.role != expected:
                where = " (a system turn may only come first)" if turn.role == "system" else ""
                raise SampleError(
                    self.sample_id,
                    f"turn {i} is {turn.role!r} but turns must alternate user, assistant, user, ... after an "
                    f"optional leading system turn (expected {expected!r}){where}",
                )
        if self.turns[-1].role != "assistant":
            raise SampleError(self.sample_id, "the conversation must end with an assistant turn (the answer)")
        for i, turn in enumerate(self.turns):
            if turn.role == "assistant" and not turn.text.strip():
                raise SampleError(self.sample_id, f"assistant turn {i} is empty: there is no answer to learn")
            if turn.role == "assistant" and IMAGE_PLACEHOLDER in turn.text:
                raise SampleError(self.sample_id, f"assistant turn {i} contains {IMAGE_PLACEHOLDER!r}")
        n_placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in self.turns)
        if n_placeholders and n_placeholders != len(self.images):
            raise SampleError(
                self.sample_id,
                f"the conversation has {n_placeholders} {IMAGE_PLACEHOLDER!r} placeholders but "
                f"{len(self.images)} images were given",
            )

    @property
    def answers(self) -> list[str]:
        return [t.text for t in self.turns if t.role == "assistant"]

    def messages(self) -> list[dict]:
        """HF chat messages (content lists with ``{"type": "image"}`` entries) for ``apply_chat_template``."""
        has_placeholders = any(IMAGE_PLACEHOLDER in t.text for t in self.turns)
        first_user = next(i for i, t in enumerate(self.turns) if t.role == "user")
        messages = []
        for i, turn in enumerate(self.turns):
            content: list[dict] = []
            if turn.role == "user":
                if not has_placeholders and i == first_user:
                    content += [{"type": "image"} for _ in self.images]
                pieces = turn.text.split(IMAGE_PLACEHOLDER)
                for j, piece in enumerate(pieces):
                    if j > 0:
                        content.append({"type": "image"})
                    piece = piece.strip("\n") if has_placeholders else piece
                    if piece:
                        content.append({"type": "text", "text": piece})
            else:  # a system turn or an answer: text only
                content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        return messages


def load_image(source: str | Path | bytes, *, sample_id: str, keep_source: bool = False) -> Image.Image:
    """Open an image from a path or encoded bytes as RGB, or raise a ``SampleError`` naming the sample.

    ``keep_source``: remember the encoded bytes in ``image.info[SOURCE_BYTES]`` as ``(size, bytes)``, so that the
    teacher client can send what the file holds (a JPEG stays a JPEG) instead of re-encoding the pixels
    (:func:`source_bytes`).
    """
    try:
        if isinstance(source, bytes | bytearray):
            data = bytes(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise SampleError(sample_id, f"image file {str(path)!r} does not exist")
            data = path.read_bytes()
        image = Image.open(io.BytesIO(data))
        image.load()
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        what = "image bytes" if isinstance(source, bytes | bytearray) else f"image file {str(source)!r}"
        raise SampleError(sample_id, f"{what} cannot be decoded ({exc})") from exc
    rgb = image.convert("RGB")
    if keep_source:
        rgb.info[SOURCE_BYTES] = (rgb.size, data)
    return rgb


def source_bytes(image: Image.Image) -> bytes | None:
    """The encoded bytes ``image`` was decoded from (``load_image(..., keep_source=True)``), or None.

    None also when the image's size no longer matches them (PIL copies ``info`` into resized images).
    """
    source = image.info.get(SOURCE_BYTES)
    if isinstance(source, tuple) and len(source) == 2 and tuple(source[0]) == image.size:
        return source[1]
    return None

