"""The training data as a lazy, map-style ``torch.utils.data.Dataset``: a record is read and its images decoded
only when a step uses it, in ``DataLoader`` worker processes.

Before step 0 a rank only opens the source's index (:func:`student_trainer.sources.open_index`: JSONL byte offsets,
one JSON array re-serialised into a buffer, or Arrow rows of a local or Hub dataset; the cost of each is in
:mod:`student_trainer.sources`), which also refuses a source in no known record format. ``dataset[i]`` then parses
record ``i`` with :func:`student_trainer.records.record_to_sample`, whatever its format.

A record that cannot become a sample (missing or corrupt image, malformed conversation, bad JSON line, no known
shape) comes back as a :class:`BadRecord` instead of raising, so a worker never dies of it; the trainer skips it,
counts it and trains on a replacement (:class:`student_trainer.step_inputs.StepBuilder`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch.utils.data

from genrecal.errors import SampleError
from genrecal.sample import Sample
from student_trainer.records import record_to_sample
from student_trainer.sources import default_image_folder, open_index

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadRecord:
    """A record the trainer cannot use, and why (a :class:`SampleError`'s sample id and reason)."""

    index: int
    sample_id: str
    reason: str


class LazySamples(torch.utils.data.Dataset):
    """``dataset[i]``: record ``i`` as a :class:`Sample` (images decoded now), or a :class:`BadRecord`."""

    def __init__(self, path: str | Path, *, image_folder: str | Path | None = None, split: str = "train",
                 config_name: str | None = None, limit: int | None = None):
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of records or None, got {limit}")
        self.path = path  # a local path or a Hub dataset id
        self.image_folder = Path(image_folder) if image_folder is not None else default_image_folder(path)
        self.index = open_index(path, split, config_name=config_name)
        self.size = len(self.index) if limit is None else min(limit, len(self.index))
        if self.size == 0:
            raise ValueError(f"{self.path}: no records; check the data path and split")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Sample | BadRecord:
        if not 0 <= i < self.size:
            raise IndexError(f"record {i} of {self.size}")
        try:
            sample = record_to_sample(self.index.record(i), i, self.image_folder)
        except SampleError as error:
            return BadRecord(i, error.sample_id, error.reason)
        sample.source_index = i
        return sample


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
