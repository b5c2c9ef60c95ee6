"""The training data as a lazy, map-style ``torch.utils.data.Dataset``: a record is read and its images decoded
only when a step uses it, in ``DataLoader`` worker processes.

Start-up cost and memory per rank, by source (N records):

- **JSONL** (``.jsonl``, or a ``.json`` file written one record a line): one pass over the file records the byte
  offset and length of every non-empty line (:class:`JsonlIndex`; 16 bytes a record: 3.2 MB for 200k records).
  Reading record ``i`` is a seek, one read and one ``json.loads``.
- **One JSON array** (LLaVA's usual ``.json``): JSON cannot be indexed without parsing it, so the file is parsed
  once and every record is re-serialised into one compact byte buffer with an offset array
  (:class:`JsonBufferIndex`); the parsed objects are then freed. Memory ≈ the file's size (LLaVA-665k's 1 GB
  JSON: ≈ 1 GB) in the rank and again in each worker process (they receive a copy), plus the parse's transient
  peak (several x the file). Convert big arrays to JSONL once (``jq -c '.[]' a.json > a.jsonl``) to avoid both.
- **datasets** (``save_to_disk`` folder, ``.parquet``, ``.arrow``): rows are read from the memory-mapped Arrow
  table by index, undecoded.

A record that cannot become a sample (missing or corrupt image, malformed conversation, bad JSON line) comes back
as a :class:`BadRecord` instead of raising, so a worker never dies of it; the trainer skips it, counts it and
trains on a replacement (:class:`student_trainer.step_inputs.StepBuilder`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.utils.data

from genrecal.errors import SampleError
from genrecal.sample import Sample
from student_trainer.data import (
    JSON_SUFFIXES,
    _default_image_folder,
    _looks_like_json_lines,
    _open_dataset,
    _UnparsableLine,
    record_to_sample,
)

logger = logging.getLogger(__name__)
_SCAN_BYTES = 1 << 24  # 16 MiB blocks while indexing a JSONL file


@dataclass(frozen=True)
class BadRecord:
    """A record the trainer cannot use, and why (a :class:`SampleError`'s sample id and reason)."""

    index: int
    sample_id: str
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
            return _UnparsableLine(i + 1, f"not valid JSON ({exc})")

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
    """Rows of a Hugging Face dataset, as stored (an ``Image`` feature stays ``{"bytes", "path"}``)."""

    def __init__(self, dataset):
        self.table = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.table)

    def record(self, i: int) -> object:
        return self.table[i : i + 1].to_pylist()[0]


def open_index(path: Path, split: str = "train"):
    """The record index of a data source (:class:`JsonlIndex`, :class:`JsonBufferIndex` or :class:`ArrowIndex`)."""
    if path.is_file() and path.suffix in JSON_SUFFIXES:
        if path.suffix == ".jsonl":
            return JsonlIndex(path)
        with path.open(encoding="utf-8") as f:
            head = f.read(1 << 16)
        if head.lstrip().startswith("["):
            text = path.read_text(encoding="utf-8")
            try:
                records = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); LLaVA data is a JSON list of records") from exc
            del text
            return JsonBufferIndex(records)
        if _looks_like_json_lines(head):
            return JsonlIndex(path)
        raise ValueError(f"{path} holds neither a JSON list of LLaVA records nor one record per line")
    return ArrowIndex(_open_dataset(path, split))


class LazySamples(torch.utils.data.Dataset):
    """``dataset[i]``: record ``i`` as a :class:`Sample` (images decoded now), or a :class:`BadRecord`."""

    def __init__(self, path: str | Path, *, image_folder: str | Path | None = None, split: str = "train",
                 limit: int | None = None):
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of records or None, got {limit}")
        self.path = Path(path)
        self.image_folder = Path(image_folder) if image_folder is not None else _default_image_folder(self.path)
        self.index = open_index(self.path, split)
        self.size = len(self.index) if limit is None else min(limit, len(self.index))
        if self.size == 0:
            raise ValueError(f"{self.path}: no records; check the data path and split")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Sample | BadRecord:
        if not 0 <= i < self.size:
            raise IndexError(f"record {i} of {self.size}")
        try:
            return record_to_sample(self.index.record(i), i, self.image_folder)
        except SampleError as error:
            return BadRecord(i, error.sample_id, error.reason)


def collate_records(items: list) -> list:
    """A micro-batch stays a list of samples (the student's processor formats it in the trainer)."""
    return items


class MicroBatchOrder(torch.utils.data.Sampler):
    """The ``DataLoader``'s batch sampler: this rank's micro-batches ``start, start+1, ..., stop-1`` in the order of
    :class:`student_trainer.data.ShardedBatches` (so a run resumed at ``start`` reads exactly what an
    uninterrupted one would)."""

    def __init__(self, batches, start: int, stop: int):
        self.batches, self.start, self.stop = batches, start, stop

    def __iter__(self):
        for index in range(self.start, self.stop):
            yield self.batches.batch(index)

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


class MicroBatchLoader:
    """This rank's micro-batches ``start .. stop-1`` as lists of samples, read and decoded by ``workers``
    ``DataLoader`` processes (0: in the calling thread), in order.

    Workers start with the ``forkserver`` method: a trainer holds gRPC channels and threads, which a forked child
    must not inherit. ``next()`` must be called from one thread at a time (the trainer's prefetch thread).
    """

    def __init__(self, dataset, batches, *, start: int, stop: int, workers: int, prefetch_factor: int = 2):
        self.dataset = dataset
        options = dict(num_workers=workers, collate_fn=collate_records)
        if workers > 0:
            options.update(prefetch_factor=prefetch_factor, multiprocessing_context="forkserver",
                           persistent_workers=False)
        self._loader = torch.utils.data.DataLoader(dataset, batch_sampler=MicroBatchOrder(batches, start, stop),
                                                   **options)
        self._iterator = None

    def next(self) -> list:
        if self._iterator is None:
            self._iterator = iter(self._loader)  # starts the workers
        return next(self._iterator)

    def close(self) -> None:
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


@dataclass
class ValidationReport:
    """:func:`validate_records`' verdict: how many records were read and which were bad."""

    total: int
    bad: list[BadRecord]

    def __str__(self) -> str:
        text = f"{len(self.bad)} of {self.total} records are bad"
        if self.bad:
            text += " (first: " + "; ".join(f"{b.sample_id!r}: {b.reason}" for b in self.bad[:5]) + ")"
        return text


def validate_records(dataset: LazySamples, *, workers: int, rank: int = 0, world_size: int = 1,
                     batch_size: int = 64) -> ValidationReport:
    """Read and decode records ``rank, rank + world_size, ...`` once, in ``workers`` processes; report the bad."""
    options = dict(num_workers=workers, batch_size=batch_size, collate_fn=_verdicts)
    if workers > 0:
        options.update(multiprocessing_context="forkserver")
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    bad = [b for chunk in torch.utils.data.DataLoader(share, **options) for b in chunk]
    return ValidationReport(len(share), bad)


def _verdicts(items: list) -> list[BadRecord]:
    """Only the bad records of a chunk travel back from the worker (not the decoded images)."""
    return [item for item in items if isinstance(item, BadRecord)]
