"""Training and evaluation data: LLaVA-style conversations from JSON or Hugging Face ``datasets``, and the order
in which each rank sees them.

Sources (:func:`load_dataset_samples`):

- LLaVA-style JSON (``.json``: a list of records) or JSON Lines (``.jsonl``: one record a line). A record is
  ``{"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] | absent, "conversations": [{"from": "human"|"gpt",
  "value": ...}, ...]}``; image names are relative to ``image_folder`` (default: the JSON file's folder).
- A Hugging Face dataset saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (a folder; ``split``
  picks a split of a ``DatasetDict``), or a ``.parquet`` / ``.arrow`` data file. Rows carry the same keys; the
  image column (``image`` or ``images``) holds file names (relative to ``image_folder``, default the dataset's
  folder) or ``datasets.Image`` features (decoded to PIL images, or ``{"bytes", "path"}`` when not decoded).

Every assistant turn of a conversation is an answer span (:mod:`genrecal.sample`): multi-turn records train on
all their answers. A record without an ``id`` gets its row index (as a string) as its sample id.

Bad records — a missing or undecodable image, a malformed conversation, an empty answer — raise
:class:`genrecal.errors.SampleError`; by default they are skipped and counted in a :class:`SkipReport`.

:class:`ShardedBatches` gives the deterministic, resumable micro-batch order for distributed training.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from genrecal.errors import SampleError
from genrecal.sample import LLAVA_ROLES, Sample, Turn, load_image

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".json", ".jsonl")
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # suffix -> datasets.load_dataset builder
IMAGE_KEYS = ("image", "images")
QUESTION_TYPE_KEYS = ("type", "question_type")


@dataclass
class SkipReport:
    """What :func:`load_dataset_samples` left out: how many records, and the first few with their reasons."""

    count: int = 0  # records skipped
    total: int = 0  # records read (used + skipped)
    examples: list[tuple[str, str]] = field(default_factory=list)  # first `max_examples` (sample_id, reason)
    max_examples: int = 5

    def add(self, error: SampleError) -> None:
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((error.sample_id, error.reason))

    def __str__(self) -> str:
        text = f"skipped {self.count} of {self.total} records"
        if self.examples:
            shown = "; ".join(f"{sample_id!r}: {reason}" for sample_id, reason in self.examples)
            more = f" (first {len(self.examples)})" if self.count > len(self.examples) else ""
            text += f"{more}: {shown}"
        return text


def load_dataset_samples(
    path: str | Path,
    *,
    image_folder: str | Path | None = None,
    split: str = "train",
    limit: int | None = None,
    skip_bad: bool = True,
) -> tuple[list[Sample], SkipReport]:
    """Load samples from a LLaVA-style JSON/JSONL file or a Hugging Face dataset (see the module docstring).

    Args:
        path: a ``.json`` / ``.jsonl`` file, a ``.parquet`` / ``.arrow`` file, or a ``save_to_disk`` folder.
        image_folder: where image file names are resolved; default the data file's folder (or the dataset folder).
        split: the split of a saved ``DatasetDict`` (ignored for single-split sources).
        limit: return at most this many samples (reading stops once that many usable ones are found).
        skip_bad: skip records that raise :class:`SampleError` (counted in the report, with a warning); when
            False the first bad record's error propagates, naming the sample.

    Returns:
        The samples, in file order, and the :class:`SkipReport`.

    Raises:
        ValueError: the source cannot be read, or no usable sample remains.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples or None, got {limit}")
    path = Path(path)
    root = Path(image_folder) if image_folder is not None else _default_image_folder(path)
    samples: list[Sample] = []
    report = SkipReport()
    for index, record in _iter_records(path, split):
        if limit is not None and len(samples) >= limit:
            break
        report.total += 1
        try:
            samples.append(record_to_sample(record, index, root))
        except SampleError as error:
            if not skip_bad:
                raise
            report.add(error)
    if report.count:
        logger.warning("%s: %s", path, report)
    if not samples:
        raise ValueError(f"{path}: no usable samples ({report}); check the data path, split and image_folder")
    duplicates = [sample_id for sample_id, n in Counter(s.sample_id for s in samples).items() if n > 1]
    if duplicates:
        logger.warning("%s: %d sample ids occur more than once (e.g. %r)", path, len(duplicates), duplicates[0])
    return samples, report


def load_question_types(path: str | Path, *, split: str = "train") -> dict[str, str]:
    """``{sample_id: question type}`` for the records that carry a ``"type"`` or ``"question_type"`` key.

    Reads only the id and type columns (images are not decoded); sample ids match :func:`load_dataset_samples`.
    """
    types = {}
    for index, record in _iter_records(Path(path), split, columns=("id", *QUESTION_TYPE_KEYS)):
        if not isinstance(record, dict):
            continue
        value = next((record[key] for key in QUESTION_TYPE_KEYS if record.get(key) is not None), None)
        if value is not None:
            types[_sample_id(record, index)] = str(value)
    return types


def record_to_sample(record: object, index: int, image_folder: str | Path) -> Sample:
    """One LLaVA-style record (from JSON or a dataset row) as a :class:`Sample`; raises :class:`SampleError`."""
    if isinstance(record, _UnparsableLine):
        raise SampleError(f"<line {record.line_number}>", record.reason)
    if not isinstance(record, dict):
        raise SampleError(f"<record {index}>", f"a record must be a JSON object, got {type(record).__name__}")
    sample_id = _sample_id(record, index)
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(sample_id, "record has no 'conversations' list")
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise SampleError(sample_id, f"conversation turn {i} is a {type(message).__name__}, not an object")
        speaker = message.get("from")
        if speaker not in LLAVA_ROLES:
            raise SampleError(
                sample_id, f"conversation turn {i} has 'from'={speaker!r}; expected one of {sorted(LLAVA_ROLES)}"
            )
        value = message.get("value")
        if not isinstance(value, str):
            raise SampleError(sample_id, f"conversation turn {i} has no text 'value' (got {type(value).__name__})")
        turns.append(Turn(LLAVA_ROLES[speaker], value))
    images = [_open_image(entry, Path(image_folder), sample_id) for entry in _image_entries(record, sample_id)]
    return Sample(sample_id=sample_id, turns=turns, images=images)


def _sample_id(record: dict, index: int) -> str:
    sample_id = record.get("id")
    return str(index) if sample_id is None else str(sample_id)


def _image_entries(record: dict, sample_id: str) -> list:
    """The record's image entries (file names, ``{"bytes", "path"}`` dicts or PIL images), in order."""
    for key in IMAGE_KEYS:
        entries = record.get(key)
        if entries is None or (isinstance(entries, str) and not entries):
            continue
        if isinstance(entries, str | dict | Image.Image):
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
    if isinstance(entry, str):
        return load_image(image_folder / entry, sample_id=sample_id, keep_source=True)
    if isinstance(entry, dict):  # an undecoded datasets.Image feature: {"bytes": ..., "path": ...}
        if entry.get("bytes"):
            return load_image(entry["bytes"], sample_id=sample_id, keep_source=True)
        if entry.get("path"):
            return load_image(image_folder / entry["path"], sample_id=sample_id, keep_source=True)
    raise SampleError(sample_id, f"cannot read an image from a {type(entry).__name__} entry")


def _default_image_folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _iter_records(path: Path, split: str, columns: tuple[str, ...] | None = None) -> Iterator[tuple[int, object]]:
    """``(row index, record)`` in file order. ``columns`` restricts dataset rows to those (when present)."""
    if path.is_file() and path.suffix in JSON_SUFFIXES:
        yield from _iter_json_records(path)
        return
    dataset = _open_dataset(path, split)
    if columns is not None:
        dataset = dataset.select_columns([c for c in columns if c in dataset.column_names])
    yield from enumerate(_raw_rows(dataset))


def _raw_rows(dataset, chunk_size: int = 256) -> Iterator[dict]:
    """Rows as stored, without feature decoding: an ``Image`` feature stays ``{"bytes", "path"}``, so that a
    corrupt image becomes a :class:`SampleError` of its record in :func:`record_to_sample` instead of failing
    the iteration."""
    arrow = dataset.with_format("arrow")
    for start in range(0, len(arrow), chunk_size):
        yield from arrow[start : start + chunk_size].to_pylist()


def _iter_json_records(path: Path) -> Iterator[tuple[int, object]]:
    """A ``.json`` list of records, or JSON Lines (``.jsonl``, or a ``.json`` file written one record a line,
    as ``Dataset.to_json`` does)."""
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            if not _looks_like_json_lines(text):
                raise ValueError(f"{path} is not valid JSON ({exc}); LLaVA data is a JSON list of records") from exc
        else:
            if not isinstance(records, list):
                raise ValueError(
                    f"{path} holds a JSON {type(records).__name__}; expected a list of LLaVA records "
                    "(or one record per line)"
                )
            yield from enumerate(records)
            return
    with path.open(encoding="utf-8") as f:
        index = 0
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record = _UnparsableLine(line_number, f"not valid JSON ({exc})")
            yield index, record
            index += 1


def _looks_like_json_lines(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


@dataclass(frozen=True)
class _UnparsableLine:
    """A JSONL line that is not valid JSON: skipped (or raised) like any other bad record."""

    line_number: int
    reason: str


def _open_dataset(path: Path, split: str):
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder or a parquet/arrow file."""
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise ValueError(
                f"{path} is a folder but not a dataset saved with save_to_disk ({exc}); pass a LLaVA .json/.jsonl "
                "file, a .parquet/.arrow file or a saved dataset folder"
            ) from exc
    elif path.is_file() and path.suffix in DATA_FILE_BUILDERS:
        loaded = datasets.load_dataset(DATA_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    elif not path.exists():
        raise ValueError(f"data path {str(path)!r} does not exist")
    else:
        raise ValueError(
            f"cannot read {str(path)!r}: expected a LLaVA .json/.jsonl file, a "
            f"{'/'.join(DATA_FILE_BUILDERS)} file or a folder saved with datasets' save_to_disk"
        )
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} has no split {split!r}; its splits are {sorted(loaded)}")
        loaded = loaded[split]
    return loaded


class ShardedBatches:
    """Deterministic, resumable micro-batch order for ``world_size`` data-parallel ranks.

    Global micro-batch ``index`` lies in epoch ``index // batches_per_epoch``; each epoch is a fresh permutation
    of ``range(num_samples)`` drawn from ``(seed, epoch)``, cut into global batches of
    ``batch_size * world_size`` samples (the ragged tail is dropped); rank ``r`` takes the ``r``-th
    ``batch_size`` slice of each. So every rank's batches are disjoint within an epoch and together cover it
    (up to the tail), and a run resumed at micro-batch ``k`` sees exactly what an uninterrupted run would.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of batch_size={batch_size} x "
                f"world_size={world_size}; use more data or a smaller batch"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch (= global batches per epoch)."""
        return self.num_samples // (self.batch_size * self.world_size)

    def epoch_of(self, index: int) -> int:
        return index // self.batches_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """(num_samples,) the sample order of ``epoch``; depends only on ``(seed, epoch)``."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached = (epoch, rng.permutation(self.num_samples))
        return self._cached[1]

    def batch(self, index: int) -> list[int]:
        """Sample indices of this rank's micro-batch number ``index`` (0-based, counted across epochs)."""
        if index < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {index}")
        epoch, within = divmod(index, self.batches_per_epoch)
        start = (within * self.world_size + self.rank) * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(0)

    def iter_from(self, index: int) -> Iterator[list[int]]:
        """Endless micro-batches starting at ``index`` (e.g. the position saved with a checkpoint)."""
        while True:
            yield self.batch(index)
            index += 1
