"""What one optimizer step trains on (:class:`StepInputs`) and how it is built (:class:`StepBuilder`): the step's
micro-batches read in order from the :class:`~student_trainer.dataset.MicroBatchLoader`, bad records replaced,
the student's encoded batches and the teacher's features of all of them. The builder runs in the prefetch thread
(:mod:`student_trainer.prefetch`): local work only, no collective."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from genrecal.errors import SampleError
from genrecal.families import EncodedBatch, LoadedVLM
from genrecal.resilient_teacher import ResilientTeacher
from genrecal.sample import Sample
from genrecal.teacher import TeacherFeatures
from student_trainer.config import TrainConfig
from student_trainer.dataset import BadRecord, MicroBatchLoader

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """One optimizer step's inputs, per micro-batch."""

    step: int
    groups: list[list[Sample]]
    student_batches: list[EncodedBatch]
    features: list[list[TeacherFeatures]] | list[None]  # None: a stage without the teacher


class StepBuilder:
    """Builds steps ``start, start+1, ...`` in order (each call consumes the loader's next ``grad_accum``
    micro-batches) and releases their teacher handles.

    ``bad_records`` (record index -> :class:`BadRecord`) collects every bad record met, logged once each.
    """

    def __init__(self, dataset: Sequence[Sample | BadRecord], loader: MicroBatchLoader, student: LoadedVLM,
                 teacher: ResilientTeacher | None, config: TrainConfig, bad_records: dict[int, BadRecord],
                 encode_options: dict | None = None):
        self.dataset, self.loader, self.student, self.teacher = dataset, loader, student, teacher
        self.config = config
        self.encode_options = encode_options or {}  # e.g. answer_log_probs for the logit-distillation baselines
        self.bad_records = bad_records

    def build(self, step: int) -> StepInputs:
        config = self.config
        groups, student_batches = [], []
        for _ in range(config.grad_accum):  # micro-batches in order
            group, batch = self._encoded(self._usable(self.loader.next()))
            groups.append(group)
            student_batches.append(batch)
        if self.teacher is None:
            return StepInputs(step, groups, student_batches, [None] * len(groups))
        while True:  # a sample the teacher refuses (too long in its tokens, ...) is skipped like a bad record
            try:
                # Built ahead, the encode's time is hidden behind compute; the prefetcher times what is not.
                features = self.teacher.encode_step(groups, timed=config.prefetch_steps == 0, **self.encode_options)
                return StepInputs(step, groups, student_batches, features)
            except SampleError as error:
                replaced = False
                for k, group in enumerate(groups):
                    j = next((i for i, s in enumerate(group) if s.sample_id == error.sample_id), None)
                    if j is not None and group[j].source_index is not None:
                        groups[k], student_batches[k] = self._encoded(self._without(group, j, error))
                        replaced = True
                if not replaced:
                    raise

    def release(self, inputs: StepInputs) -> None:
        """Free the step's teacher states (one call; a sample repeated in the step has one handle)."""
        if self.teacher is not None:
            unique = {id(f): f for feats in inputs.features for f in feats}
            self.teacher.release(list(unique.values()))

    def close(self) -> None:
        self.loader.close()

    def _usable(self, items: list) -> list[Sample]:
        """The micro-batch with each bad record skipped (counted) and replaced by the next usable record.

        The replacement is the first good record after the bad one (wrapping) that is not in the micro-batch
        already: it depends on the data alone, so a resumed run replaces exactly as an uninterrupted one, and the
        micro-batch keeps its size (every rank runs the same number of forwards, as ZeRO-3 needs).
        """
        group = list(items)
        for j, item in enumerate(group):
            if not isinstance(item, BadRecord):
                continue
            self._skip(item)
            taken = {s.sample_id for s in group if isinstance(s, Sample)}
            for k in range(1, len(self.dataset)):
                candidate = self.dataset[(item.index + k) % len(self.dataset)]
                if isinstance(candidate, BadRecord):
                    self._skip(candidate)
                elif candidate.sample_id not in taken:
                    group[j] = candidate
                    break
            else:
                raise ValueError(
                    f"{self.config.data}: too few usable records to fill a micro-batch of {len(group)} "
                    f"({len(self.bad_records)} bad, e.g. {item.sample_id!r}: {item.reason})"
                )
        return group

    def _encoded(self, group: list[Sample]) -> tuple[list[Sample], EncodedBatch]:
        """The student's batch of ``group``. A sample the student cannot format (longer than ``max_length``, an
        answer its template cannot split off, ...) is skipped, counted and replaced as a bad record is, so the
        micro-batch keeps its size."""
        while True:
            try:
                return group, self.student.encode(group, max_length=self.config.max_length)
            except SampleError as error:
                j = next((k for k, s in enumerate(group) if s.sample_id == error.sample_id), None)
                if j is None or group[j].source_index is None:
                    raise
                group = self._without(group, j, error)

    def _without(self, group: list[Sample], j: int, error: SampleError) -> list[Sample]:
        """``group`` with sample ``j`` skipped (counted) as a bad record and replaced."""
        bad = BadRecord(group[j].source_index, error.sample_id, error.reason)
        return self._usable([*group[:j], bad, *group[j + 1:]])

    def _skip(self, bad: BadRecord) -> None:
        if bad.index not in self.bad_records:
            self.bad_records[bad.index] = bad
            logger.warning("skipping bad record %d (%r): %s", bad.index, bad.sample_id, bad.reason)
