"""Training and evaluation data loaded eagerly, and the order in which each rank sees it.

:func:`load_dataset_samples` reads every record of a source into memory as a :class:`~genrecal.sample.Sample`
(for evaluation and scripts; training reads lazily, :mod:`student_trainer.dataset`). The record formats are
:mod:`student_trainer.records`' (LLaVA / ShareGPT, OpenAI / HF messages), the sources :mod:`student_trainer.sources`'
(JSON, JSONL, datasets by path or Hub id), read through the same index and parser. Bad records raise
:class:`genrecal.errors.SampleError`; by default they are skipped and counted in a :class:`SkipReport`.

:class:`ShardedBatches` gives the deterministic, resumable micro-batch order for distributed training.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genrecal.errors import SampleError
from genrecal.sample import Sample
from student_trainer.records import QUESTION_TYPE_KEYS, record_to_sample, sample_id_of
from student_trainer.sources import default_image_folder, open_index

logger = logging.getLogger(__name__)


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
    config_name: str | None = None,
    limit: int | None = None,
    skip_bad: bool = True,
) -> tuple[list[Sample], SkipReport]:
    """Load the samples of any source :mod:`student_trainer.sources` opens.

    Args:
        path: a ``.json`` / ``.jsonl`` file, a ``.parquet`` / ``.arrow`` file, a ``save_to_disk`` folder or a
            Hugging Face Hub dataset id (``owner/name`` or ``owner/name:split``; through ``datasets``, offline from its cache with ``HF_HUB_OFFLINE=1``).
        image_folder: where image file names are resolved; default the data file's folder (or the dataset folder;
            the working directory for a Hub id).
        split: the split of a saved ``DatasetDict`` or Hub dataset (ignored for single-split sources).
        config_name: the configuration of a Hub dataset that has several (``datasets.load_dataset``'s ``name``).
        limit: return at most this many samples (reading stops once that many usable ones are found).
        skip_bad: skip records that raise :class:`SampleError` (counted in the report, with a warning); when
            False the first bad record's error propagates, naming the sample.

    Returns:
        The samples, in file order, and the :class:`SkipReport`.

    Raises:
        ValueError: the source cannot be read, is in no known format, or no usable sample remains.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples or None, got {limit}")
    root = Path(image_folder) if image_folder is not None else default_image_folder(path)
    samples: list[Sample] = []
    report = SkipReport()
    for index, record in _records(path, split, config_name):
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


def load_question_types(path: str | Path, *, split: str = "train", config_name: str | None = None) -> dict[str, str]:
    """``{sample_id: question type}`` for the records that carry a ``"type"`` or ``"question_type"`` key.

    Reads only the id and type columns of a dataset (images are not decoded); sample ids match
    :func:`load_dataset_samples`.
    """
    types = {}
    for index, record in _records(path, split, config_name, columns=("id", *QUESTION_TYPE_KEYS)):
        if not isinstance(record, dict):
            continue
        value = next((record[key] for key in QUESTION_TYPE_KEYS if record.get(key) is not None), None)
        if value is not None:
            types[sample_id_of(record, index)] = str(value)
    return types


def _records(path: str | Path, split: str, config_name: str | None,
             columns: tuple[str, ...] | None = None) -> Iterator[tuple[int, object]]:
    index = open_index(path, split, config_name=config_name, columns=columns)
    for i in range(len(index)):
        yield i, index.record(i)


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
