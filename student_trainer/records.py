"""Training records as users have them: the one parser (record -> :class:`~genrecal.sample.Sample`) and the one
index over every source. :mod:`student_trainer.dataset` (lazy, in ``DataLoader`` workers) and
:mod:`student_trainer.data` (eager, for evaluation and scripts) both read through :func:`open_index` and
:func:`record_to_sample`.

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

**Sources** (:func:`open_index`): a ``.json`` array or JSON Lines file (``.jsonl``, or a ``.json`` written one record
a line); a Hugging Face dataset by local path (a ``save_to_disk`` folder, whose ``split`` picks a split of a
``DatasetDict``; a ``.parquet`` / ``.arrow`` file); or by Hub id (``owner/name``, or ``owner/name:split``; a set of
several configurations, such as ``lmms-lab/LLaVA-OneVision-Data``, also needs ``config_name``) through
``datasets.load_dataset``, which reads its cache offline (``HF_HUB_OFFLINE=1``): a set not in the cache is refused
with an error saying so. Start-up cost and memory per rank (N records):

- JSONL: one pass records the byte offset and length of every non-empty line (:class:`JsonlIndex`; 16 bytes a record:
  3.2 MB for 200k records); reading record ``i`` is a seek, one read and one ``json.loads``.
- One JSON array (LLaVA's usual ``.json``): JSON cannot be indexed without parsing it, so the file is parsed once and
  every record re-serialised into one compact byte buffer with an offset array (:class:`JsonBufferIndex`); the parsed
  objects are then freed. Memory ≈ the file's size (LLaVA-665k's 1 GB JSON: ≈ 1 GB) in the rank and again in each
  worker process (they receive a copy), plus the parse's transient peak (several x the file). Convert big arrays to
  JSONL once (``jq -c '.[]' a.json > a.jsonl``) to avoid both.
- datasets (local or Hub): rows are read from the memory-mapped Arrow table by index, undecoded (:class:`ArrowIndex`).

**Bad records and unknown formats.** A record that cannot become a sample (in no known shape, a malformed
conversation, a missing or corrupt image, an empty answer, a line that is not JSON) raises
:class:`genrecal.errors.SampleError` naming it; the loaders skip and count it. But a source whose first
:data:`CHECKED_RECORDS` records are all in no known shape is refused when it is opened, before step 0, with one
error that lists the formats above.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from genrecal.errors import SampleError
from genrecal.sample import IMAGE_PLACEHOLDER, Sample, Turn, load_image

JSON_SUFFIXES = (".json", ".jsonl")
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # suffix -> datasets.load_dataset builder
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
CHECKED_RECORDS = 8  # a source whose first records are all in no known format is refused when opened
_SCAN_BYTES = 1 << 24  # 16 MiB blocks while indexing a JSONL file
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name


# ---- one record -> Sample ---------------------------------------------------------------------------------------


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


# ---- one index over every source --------------------------------------------------------------------------------


class RecordIndex(Protocol):
    """Random access to a source's records as stored (``record(i)`` may return an :class:`UnparsableLine`)."""

    def __len__(self) -> int: ...

    def record(self, i: int) -> object: ...


@dataclass(frozen=True)
class UnparsableLine:
    """A JSONL line that is not valid JSON: skipped (or raised) like any other bad record."""

    line_number: int  # 1-based, counting non-empty lines
    reason: str


class JsonlIndex:
    """Byte offsets of the non-empty lines of a JSON Lines file; record ``i`` is line ``offsets[i]``."""

    def __init__(self, path: Path):
        self.path = path
        starts, lengths = [], []
        position = 0
        with path.open("rb") as f:
            carry = b""
            while block := f.read(_SCAN_BYTES):
                data = carry + block
                base = position - len(carry)
                ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
                begin = 0
                for end in ends.tolist():
                    if data[begin:end].strip():
                        starts.append(base + begin)
                        lengths.append(end - begin)
                    begin = end + 1
                carry = data[begin:]
                position += len(block)
            if carry.strip():
                starts.append(position - len(carry))
                lengths.append(len(carry))
        self.offsets = np.asarray(starts, dtype=np.int64)  # (N,)
        self.lengths = np.asarray(lengths, dtype=np.int64)  # (N,)
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, i: int) -> object:
        if self._file is None or self._pid != os.getpid():  # one handle per (worker) process
            self._file, self._pid = self.path.open("rb"), os.getpid()
        self._file.seek(int(self.offsets[i]))
        line = self._file.read(int(self.lengths[i]))
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            return UnparsableLine(i + 1, f"not valid JSON ({exc})")

    def __getstate__(self) -> dict:  # a spawned worker opens its own file handle
        return {**self.__dict__, "_file": None, "_pid": None}


class JsonBufferIndex:
    """The records of one JSON array, re-serialised compactly into one byte buffer (see the module docstring)."""

    def __init__(self, records: list):
        pieces = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() for r in records]
        self.ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)  # (N,)
        self.buffer = np.frombuffer(b"".join(pieces), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.ends)

    def record(self, i: int) -> object:
        start = int(self.ends[i - 1]) if i else 0
        return json.loads(self.buffer[start : int(self.ends[i])].tobytes())


class ArrowIndex:
    """Rows of a Hugging Face dataset, as stored (an ``Image`` feature stays ``{"bytes", "path"}``, so that a
    corrupt image becomes a :class:`SampleError` of its record instead of failing the read)."""

    def __init__(self, dataset, columns: tuple[str, ...] | None = None):
        if columns is not None:
            dataset = dataset.select_columns([c for c in columns if c in dataset.column_names])
        self.column_names = list(dataset.column_names)
        self.table = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.table)

    def record(self, i: int) -> object:
        return self.table[i : i + 1].to_pylist()[0]


def open_index(source: str | Path, split: str = "train", *, config_name: str | None = None,
               columns: tuple[str, ...] | None = None) -> RecordIndex:
    """The record index of ``source`` (see the module docstring), its format checked on the first records.

    ``config_name`` picks a configuration (subset) of a Hub dataset that has several (``load_dataset(id, name)``).
    ``columns`` restricts dataset rows to those columns (when present) and skips the format check.
    Raises ``ValueError`` naming the fix: a missing path, an uncached Hub id offline, an unknown split or
    configuration, a source in no known format.
    """
    path = Path(source)
    if config_name is not None and (path.exists() or not is_hub_id(str(source))):
        raise ValueError(f"a dataset configuration ({config_name!r}) applies to a Hugging Face Hub dataset id "
                         f"only, and {str(source)!r} is not one; leave the configuration out")
    if path.is_file() and path.suffix in JSON_SUFFIXES:
        index = _open_json(path)
    elif path.exists():
        index = ArrowIndex(_open_local_dataset(path, split), columns)
    elif is_hub_id(str(source)):
        index = ArrowIndex(_open_hub_dataset(str(source), split, config_name), columns)
    else:
        raise ValueError(f"data path {str(source)!r} does not exist; pass a .json/.jsonl file, a .parquet/.arrow "
                         "file, a datasets save_to_disk folder or a Hugging Face Hub dataset id (owner/name)")
    if columns is None:
        check_formats(index, source)
    return index


def check_formats(index: RecordIndex, source: str | Path) -> None:
    """Refuse a source whose first :data:`CHECKED_RECORDS` records are all in no known format (one error)."""
    n = min(len(index), CHECKED_RECORDS)
    if isinstance(index, ArrowIndex) and not {"conversations", "messages"} & set(index.column_names):
        found = f"its columns are {index.column_names}"
    elif n == 0 or any(record_format(index.record(i)) for i in range(n)):
        return
    else:
        first = index.record(0)
        found = (f"the first record's keys are {sorted(map(str, first))[:10]}" if isinstance(first, dict)
                 else f"the first record is {getattr(first, 'reason', type(first).__name__)}")
        found = f"none of its first {n} records is in a known format ({found})"
    formats = "\n".join(f"  - {f}" for f in FORMATS)
    raise ValueError(f"{source}: {found}. The formats read, detected per record:\n{formats}\nSee the "
                     "'Data formats' section of docs/student_trainer.md for an example record of each.")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub dataset id ``owner/name`` or ``owner/name:split`` (not a data file's name)."""
    name = text.partition(":")[0]
    return bool(_HUB_ID.fullmatch(name)) and not name.endswith((*JSON_SUFFIXES, *DATA_FILE_BUILDERS))


def default_image_folder(source: str | Path) -> Path:
    """Where relative image names resolve by default: the dataset folder, the data file's folder, or (for a Hub id,
    whose images are usually stored in the rows) the working directory."""
    path = Path(source)
    if path.is_dir():
        return path
    return path.parent if path.exists() else Path.cwd()


def _open_json(path: Path) -> RecordIndex:
    if path.suffix == ".jsonl":
        return JsonlIndex(path)
    with path.open(encoding="utf-8") as f:
        head = f.read(1 << 16)
    if head.lstrip().startswith("["):
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); a .json file holds a list of records") from exc
        del text
        return JsonBufferIndex(records)
    if _looks_like_json_lines(head):
        return JsonlIndex(path)
    raise ValueError(f"{path} holds neither a JSON list of records nor one record per line")


def _looks_like_json_lines(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _open_local_dataset(path: Path, split: str):
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder or a parquet/arrow file."""
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise ValueError(
                f"{path} is a folder but not a dataset saved with save_to_disk ({exc}); pass a .json/.jsonl file, a "
                ".parquet/.arrow file, a saved dataset folder or a Hub dataset id"
            ) from exc
    elif path.suffix in DATA_FILE_BUILDERS:
        loaded = datasets.load_dataset(DATA_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        raise ValueError(
            f"cannot read {str(path)!r}: expected a .json/.jsonl file, a {'/'.join(DATA_FILE_BUILDERS)} file, a "
            "folder saved with datasets' save_to_disk or a Hugging Face Hub dataset id"
        )
    return _pick_split(loaded, split, str(path))


def _open_hub_dataset(source: str, split: str, config_name: str | None):
    """``owner/name[:split]`` through ``datasets.load_dataset`` (its cache when offline), one split of it."""
    import datasets

    name, _, pinned = source.partition(":")
    split = pinned or split
    config = f", {config_name!r}" if config_name else ""
    try:
        return datasets.load_dataset(name, config_name, split=split)
    except OSError as exc:  # ConnectionError (offline, unreachable), FileNotFoundError (no such set), HTTP errors
        if datasets.config.HF_HUB_OFFLINE:
            raise ValueError(
                f"{source!r} is not a local path, and the Hugging Face Hub dataset {name!r}{config} is not in the "
                f"datasets cache ({datasets.config.HF_DATASETS_CACHE}) while this machine is offline "
                f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): load it once where the Hub is reachable, with the same "
                f"HF_HOME (python -c \"import datasets; datasets.load_dataset('{name}'{config})\"), or pass a "
                "local path"
            ) from exc
        raise ValueError(f"{source!r} is not a local path, and loading it as a Hugging Face Hub dataset failed "
                         f"({exc}); check the path or the dataset id") from exc
    except ValueError as exc:  # a configuration missing or unknown (several in the set or the cache), a split unknown
        reason = str(exc).rstrip(".")
        raise ValueError(f"Hugging Face Hub dataset {name!r}{config}, split {split!r}: {reason}. Pick the "
                         f"configuration with --data-config NAME and the split with '{name}:SPLIT'") from exc


def _pick_split(loaded, split: str, source: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{source} has no split {split!r}; its splits are {sorted(loaded)}")
        loaded = loaded[split]
    return loaded
