"""Training records as users have them: the one parser, record -> :class:`~genrecal.sample.Sample`
(:func:`record_to_sample`). :mod:`student_trainer.sources` opens the sources records come from (files, datasets,
Hub ids); :mod:`student_trainer.dataset` (lazy, in ``DataLoader`` workers) and :mod:`student_trainer.data` (eager,
for evaluation and scripts) both read through :func:`student_trainer.sources.open_index` and :func:`record_to_sample`.

**Formats**, detected per record (one file may mix them):

1. LLaVA / ShareGPT, a record with ``"conversations"``::

       {"id": "r1", "image": "a.jpg",
        "conversations": [{"from": "system", "value": "You answer in one word."},
                          {"from": "human", "value": "<image>\\nWhat animal is this?"},
                          {"from": "gpt", "value": "Cat."}]}

   ``from`` is ``system`` (optional, first only), ``human``/``user`` or ``gpt``/``assistant``; a top-level
   ``"system"`` string (LLaMA-Factory's ShareGPT) is the system turn when the conversation has none. The images
   (key ``image`` or ``images``: one entry or a list) go where ``<image>`` appears, else before the first question.
2. OpenAI / Hugging Face chat messages, a record with ``"messages"``::

       {"messages": [{"role": "system", "content": "You answer in one word."},
                     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "Cat."}]}],
        "images": ["a.jpg"]}

   ``role`` is ``system`` (or ``developer``), ``user`` or ``assistant``; ``content`` a string (``<image>`` marks
   an image) or a list of parts: ``{"type": "text", "text": ...}``; ``{"type": "image"}`` takes the next entry of
   the ``images`` list beside ``messages`` (as TRL and Hub sets such as ``HuggingFaceH4/llava-instruct-mix-vsft``
   store them; an integer ``"index"`` picks the entry); or an image inline, ``{"type": "image", "image" | "url" |
   "path": ...}`` or ``{"type": "image_url", "image_url": {"url": ...}}``.

The system turn reaches the chat template as a system message. Every assistant turn is an answer span. A record
without images is text-only; a turn may hold several images. An image entry is a file name (relative to the image
folder) or an absolute path, a ``file://`` URL, a ``data:image/...;base64,`` URL, a ``datasets.Image`` feature
(``{"bytes", "path"}`` or a PIL image) or encoded bytes. An ``http(s)://`` URL makes the record bad: the loader
reads offline, so download the pictures first. A record without an ``id`` gets its row index as its sample id.

**Bad records and unknown formats.** A record that cannot become a sample (in no known shape, a malformed
conversation, a missing or corrupt image, an empty answer, a line that is not JSON) raises
:class:`genrecal.errors.SampleError` naming it; the loaders skip and count it. But a source whose first
records are all in no known shape is refused when it is opened (:func:`student_trainer.sources.check_formats`),
before step 0, with one error that lists the formats above.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from genrecal.errors import SampleError
from genrecal.sample import IMAGE_PLACEHOLDER, Sample, Turn, load_image

IMAGE_KEYS = ("image", "images")
QUESTION_TYPE_KEYS = ("type", "question_type")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
INLINE_IMAGE_KEYS = ("image", "url", "path", "base64")  # where an image part may carry its picture
FORMATS = (
    'LLaVA / ShareGPT: {"id", "image": file | [files], "conversations": [{"from": "system"|"human"|"gpt", '
    '"value": text}, ...]}',
    'OpenAI / HF messages: {"messages": [{"role": "system"|"user"|"assistant", "content": text | [{"type": '
    '"text", "text"}, {"type": "image"}, {"type": "image", "image"|"url"|"path": ...}, {"type": "image_url", '
    '"image_url": {"url"}}]}, ...], "images": [...]}',
)


# ---- one record -> Sample ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnparsableLine:
    """A JSONL line that is not valid JSON: skipped (or raised) like any other bad record."""

    line_number: int  # 1-based, counting non-empty lines
    reason: str


def record_format(record: object) -> str | None:
    """``"conversations"`` (LLaVA / ShareGPT), ``"messages"`` (OpenAI / HF chat) or None (no known shape)."""
    if not isinstance(record, dict):
        return None
    for key in ("conversations", "messages"):
        if record.get(key) is not None:
            return key
    return None


def sample_id_of(record: dict, index: int) -> str:
    sample_id = record.get("id")
    return str(index) if sample_id is None else str(sample_id)


def record_to_sample(record: object, index: int, image_folder: str | Path) -> Sample:
    """Record ``index`` of a source, in any format above, as a :class:`Sample`; raises :class:`SampleError`."""
    if isinstance(record, UnparsableLine):
        raise SampleError(f"<line {record.line_number}>", record.reason)
    if not isinstance(record, dict):
        raise SampleError(f"<record {index}>", f"a record must be a JSON object, got {type(record).__name__}")
    sample_id = sample_id_of(record, index)
    kind = record_format(record)
    if kind is None:
        raise SampleError(sample_id, "record has neither a 'conversations' list (LLaVA / ShareGPT) nor a 'messages' "
                                     f"list (OpenAI / HF chat); its keys are {sorted(map(str, record))[:10]}")
    folder = Path(image_folder)
    if kind == "conversations":
        turns, entries = _conversation_turns(record, sample_id)
    else:
        turns, entries = _message_turns(record, sample_id)
    images = [_open_image(entry, folder, sample_id) for entry in entries]
    return Sample(sample_id=sample_id, turns=turns, images=images)


def _conversation_turns(record: dict, sample_id: str) -> tuple[list[Turn], list]:
    conversations = record["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(sample_id, "record has no 'conversations' list")
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise SampleError(sample_id, f"conversation turn {i} is a {type(message).__name__}, not an object")
        speaker = message.get("from")
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise SampleError(
                sample_id, f"conversation turn {i} has 'from'={speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}"
            )
        value = message.get("value")
        if not isinstance(value, str):
            raise SampleError(sample_id, f"conversation turn {i} has no text 'value' (got {type(value).__name__})")
        if role != "system" or value.strip():  # an empty system prompt says nothing
            turns.append(Turn(role, value))
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not any(t.role == "system" for t in turns):
        turns.insert(0, Turn("system", system))
    return turns, _image_entries(record, sample_id)


def _message_turns(record: dict, sample_id: str) -> tuple[list[Turn], list]:
    """Turns with an ``<image>`` where each image part was, and the image entries in that order."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise SampleError(sample_id, "record has no 'messages' list")
    listed = _image_entries(record, sample_id)  # the `images` beside `messages`, taken by {"type": "image"} parts
    taken: list[int] = []  # indices into `listed`, in placeholder order
    placed: list = []  # the image entries in placeholder order

    def take(index: object, where: str) -> None:
        position = index if isinstance(index, int) else len(taken)
        if not 0 <= position < len(listed):
            raise SampleError(sample_id, f"{where} refers to image {position}, but the record lists {len(listed)} "
                                         f"(key {'/'.join(IMAGE_KEYS)})")
        taken.append(position)
        placed.append(listed[position])

    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise SampleError(sample_id, f"message {i} is a {type(message).__name__}, not an object")
        role = MESSAGE_ROLES.get(message.get("role"))
        if role is None:
            raise SampleError(sample_id, f"message {i} has role {message.get('role')!r}; expected one of "
                                         f"{sorted(MESSAGE_ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            for _ in range(content.count(IMAGE_PLACEHOLDER)):
                take(None, f"message {i}'s {IMAGE_PLACEHOLDER!r}")
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise SampleError(sample_id, f"message {i} part {j} is a text part without a 'text' string")
                    pieces.append(part["text"])
                elif kind in ("image", "image_url"):
                    inline = _inline_image(part, sample_id, f"message {i} part {j}")
                    if inline is None:
                        take(part.get("index"), f"message {i} part {j}")
                    else:
                        placed.append(inline)
                    pieces.append(IMAGE_PLACEHOLDER)
                else:
                    raise SampleError(sample_id, f"message {i} part {j} has type {kind!r}; the parts read are "
                                                 "'text', 'image' and 'image_url'")
            text = _join_parts(pieces)
        else:
            raise SampleError(sample_id, f"message {i} has no 'content' string or list (got {type(content).__name__})")
        if role != "system" or text.strip():
            turns.append(Turn(role, text))
    if not placed:
        return turns, listed  # no placeholders: every listed image goes before the first question
    unused = sorted(set(range(len(listed))) - set(taken))
    if unused:
        raise SampleError(sample_id, f"the record lists {len(listed)} images but the messages place only "
                                     f"{len(taken)} of them (images {unused} unused)")
    return turns, placed


def _join_parts(pieces: list[str]) -> str:
    """Text parts concatenate (as the chat templates render them); an image placeholder is set off by newlines,
    which :meth:`Sample.messages` strips again around it."""
    text = ""
    for piece in pieces:
        if text and IMAGE_PLACEHOLDER in (piece, text[-len(IMAGE_PLACEHOLDER):]):
            text += "\n"
        text += piece
    return text


def _inline_image(part: dict, sample_id: str, where: str) -> object | None:
    """The picture an image part carries itself, or None for a bare ``{"type": "image"}`` placeholder."""
    if part["type"] == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise SampleError(sample_id, f"{where} is an image_url part without an 'image_url': {{'url': ...}}")
        return url
    for key in INLINE_IMAGE_KEYS:
        value = part.get(key)
        if value is not None:
            if key == "base64" and isinstance(value, str) and not value.startswith("data:"):
                value = "data:image/*;base64," + value
            return value
    return None


def _image_entries(record: dict, sample_id: str) -> list:
    """The record's listed images (file names, URLs, ``{"bytes", "path"}`` dicts, PIL images), in order."""
    for key in IMAGE_KEYS:
        entries = record.get(key)
        if entries is None or (isinstance(entries, str) and not entries):
            continue
        if isinstance(entries, str | bytes | dict | Image.Image):
            return [entries]
        if not isinstance(entries, list | tuple):
            raise SampleError(sample_id, f"'{key}' must be a file name or a list of them, got {type(entries).__name__}")
        return [e for e in entries if e is not None]
    return []


def _open_image(entry: object, image_folder: Path, sample_id: str) -> Image.Image:
    if isinstance(entry, Image.Image):  # a decoded datasets.Image feature
        try:
            return entry.convert("RGB")
        except OSError as exc:
            raise SampleError(sample_id, f"image cannot be decoded ({exc})") from exc
    if isinstance(entry, bytes | bytearray):
        return load_image(entry, sample_id=sample_id, keep_source=True)
    if isinstance(entry, str):
        return _image_from_text(entry, image_folder, sample_id)
    if isinstance(entry, dict):  # an undecoded datasets.Image feature: {"bytes": ..., "path": ...}
        if entry.get("bytes"):
            return load_image(entry["bytes"], sample_id=sample_id, keep_source=True)
        if entry.get("path"):
            return _image_from_text(entry["path"], image_folder, sample_id)
    raise SampleError(sample_id, f"cannot read an image from a {type(entry).__name__} entry")


def _image_from_text(text: str, image_folder: Path, sample_id: str) -> Image.Image:
    """A file name (relative to ``image_folder``), an absolute path, a ``file://`` URL or a base64 ``data:`` URL."""
    if text.startswith("data:"):
        header, comma, payload = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise SampleError(sample_id, f"image data URL {header[:40]!r}... is not base64 "
                                         "('data:image/png;base64,...')")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SampleError(sample_id, f"image data URL is not valid base64 ({exc})") from exc
        return load_image(data, sample_id=sample_id, keep_source=True)
    url = urllib.parse.urlsplit(text)
    if url.scheme.lower() in ("http", "https"):
        raise SampleError(sample_id, f"image {text[:80]!r} is an {url.scheme} URL, which this loader cannot fetch (it "
                                     "runs offline); download the images and give their paths")
    path = Path(urllib.request.url2pathname(url.path)) if url.scheme.lower() == "file" else image_folder / text
    return load_image(path, sample_id=sample_id, keep_source=True)
