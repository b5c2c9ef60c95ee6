"""The micro-batches of one optimizer step: forward, backward and the step's metrics (:class:`GradientAccumulator`).

**Loss normalisation.** An optimizer step is ``grad_accum`` micro-batches on each of ``W`` ranks and must equal
one big batch's mean loss. Before its micro-batches run, a rank counts the student and teacher answer tokens of
all of them; one ``all_reduce(SUM)`` gives the global counts ``N_s`` and ``N_t``, passed as ``student_tokens`` /
``teacher_tokens`` so each micro-batch's loss is its *sum* over answer tokens divided by the global count. The sum
of those over micro-batches and ranks is the big batch's mean. DeepSpeed would scale that twice: ``backward``
divides the loss by ``grad_accum`` (undone with ``engine.backward(loss, scale_wrt_gas=False)``) and the gradient
reduction *averages* over the ``W`` data-parallel ranks (undone by back-propagating ``W * loss``; ZeRO 0-3 all
divide by the data-parallel world size). ``tests/student_trainer/test_recipe.py`` checks the result against a
single-process big-batch gradient, for both loops below.

**Two loops, one result.** The *sequential* loop runs, per micro-batch ``k``: forward (which waits for the
teacher's Score of ``k``), backward, ``engine.step()``. Against a remote teacher each micro-batch then waits a
full round trip. The *overlapped* loop (``--score-overlap``, default on; used in the stages that score with a
remote teacher when ``grad_accum > 1``) splits the forward in two (:func:`genrecal.distill.start_objective`):

    forward(0) -> send Score(0);  forward(1) -> send Score(1);  wait Score(0), backward(0), step;
    forward(2) -> send Score(2);  wait Score(1), backward(1), step;  ...;  wait Score(G-1), backward(G-1)

so Score(k) travels while forward(k+1) computes. At most ``AHEAD`` (1) micro-batch's graph is alive besides the
current one (memory: one more micro-batch of activations); Score calls go out and are answered in order (one
worker thread, :meth:`genrecal.resilient_teacher.ResilientTeacher.score_paths_async`, with its retries and
lost-handle recovery). Micro-batches never cross an optimizer step (the boundary step changes the weights), so a
step of ``G`` micro-batches hides ``G - 1`` round trips and the last one still waits. The losses are the same
tensors added in the same order and the backwards run in micro-batch order, so losses, metrics and gradients
equal the sequential loop's bit for bit (tested against a real teacher server).

**DeepSpeed.** ``engine(...)`` (forward) resets the ZeRO optimizer's per-backward bookkeeping of the previous
backward (ZeRO-3 counts micro-steps there: the first backward of a step overwrites the gradient partition, later
ones add to it; ZeRO-1/2 clear accumulated gradients). In the overlapped loop the last backward of a step has no
forward before it, so the loop makes that same reset call itself first (``clear_backward_seen_flag``, what
``engine.forward`` calls). ZeRO 0-3 are tested; under ZeRO-3 the parameter-prefetch trace, which follows module
order, sees one longer forward/backward window per step and re-records it (a prefetch cost on GPUs; unmeasured).
L3 runs the student's head in chunks of answer positions (:func:`genrecal.losses.student_sft_loss`); under ZeRO-3
each head call all-gathers its weight, so every rank must make as many calls as the others: micro-batch ``k`` uses
the largest chunk count any rank needs for its ``k``-th micro-batch, found in the same ``all_reduce`` as the
token counts (each rank writes its counts into its own slots of the summed vector).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence

from genrecal.distill import PendingObjective
from genrecal.families import EncodedBatch
from genrecal.losses import sft_head_calls
from genrecal.resilient_teacher import ResilientTeacher
from genrecal.stages import STAGES, Stage
from genrecal.teacher import TeacherFeatures
from student_trainer.config import TrainConfig
from student_trainer.dataset import BadRecord
from student_trainer.distributed import DistContext
from student_trainer.prefetch import StepPrefetcher
from student_trainer.step_inputs import StepBuilder

logger = logging.getLogger(__name__)

# Loss parts summed over micro-batches and ranks (each is already divided by the global token count).
LOSS_PARTS = ("L1_ce", "L1_kl", "L2_ce", "L2_kl", "L3", "KD", "ULD")
AHEAD = 1  # micro-batches whose forward (and Score) runs before the backward of the oldest one


class GradientAccumulator:
    """``run(step)``: forward and backward of optimizer step ``step``'s micro-batches; the gradients end reduced
    over ranks (the caller's ``engine.step()`` is the accumulation boundary)."""

    def __init__(self, engine, ctx: DistContext, config: TrainConfig, stage: Stage, teacher: ResilientTeacher | None,
                 inputs: StepPrefetcher, builder: StepBuilder, bad_records: dict[int, BadRecord],
                 dp_world_size: int):
        self.engine, self.ctx, self.config = engine, ctx, config
        self.stage, self.spec = Stage(stage), STAGES[Stage(stage)]
        self.teacher, self.inputs, self.builder = teacher, inputs, builder
        self.bad_records, self.dp_world_size = bad_records, dp_world_size
        self.overlap = bool(
            config.score_overlap and self.spec.needs_teacher and teacher is not None and teacher.async_score
            and config.grad_accum > 1
        )
        self._backward_since_forward = False

    def run(self, step: int) -> dict:
        """Returns the step's metrics as global values: loss parts (big-batch means), token counts, samples."""
        config, ctx = self.config, self.ctx
        wait_before = self.teacher_wait_s()
        inputs = self.inputs.get(step)
        student_batches, features = inputs.student_batches, inputs.features

        # Global answer-token counts of the whole step (all micro-batches, all ranks): the normalisers. Also the
        # teacher's own CE on its answers, summed over tokens (and the samples whose teacher did not report it).
        teacher_feats = [f for fs in features if fs for f in fs]
        scored = [int((b.labels()[:, 1:] != -100).sum()) for b in student_batches]  # L3 tokens per micro-batch
        local = [
            sum(scored),
            sum(f.num_answer_tokens for f in teacher_feats),
            sum(int(b.inputs["attention_mask"].sum()) for b in student_batches),
            sum(f.teacher_ce * f.num_answer_tokens for f in teacher_feats if f.teacher_ce is not None),
            sum(f.teacher_ce is None for f in teacher_feats),
        ]
        calls = [0] * (ctx.world_size * len(scored))  # (rank, micro-batch) slots: L3's head calls, this rank's own
        calls[ctx.rank * len(scored):(ctx.rank + 1) * len(scored)] = [sft_head_calls(n) for n in scored]
        student_tokens, teacher_tokens, sequence_tokens, teacher_ce_sum, unreported, *calls = (
            ctx.all_reduce_sum(local + calls)  # sync point
        )
        head_calls = [int(max(calls[m::len(scored)])) for m in range(len(scored))]  # per micro-batch, max over ranks
        totals = dict.fromkeys((*LOSS_PARTS, "loss"), 0.0)
        kwargs = dict(teacher=self.teacher, teacher_tokens=teacher_tokens if self.teacher else None,
                      student_tokens=student_tokens, losses=config.losses)
        loop = self._overlapped if self.overlap else self._sequential
        for loss, metrics in loop(student_batches, features, kwargs, head_calls):  # in micro-batch order
            for key in LOSS_PARTS:
                totals[key] += metrics.get(key, 0.0)
            totals["loss"] += loss
        self.builder.release(inputs)  # one call per step, in step order; every Score of the step is answered
        *values, skipped = ctx.all_reduce_sum([*totals.values(), len(self.bad_records)])  # sync point
        summed = dict(zip(totals, values, strict=True))
        row = {k: v for k, v in summed.items() if k == "loss" or self._has_part(k)}
        row.update(
            skipped_records=int(skipped),  # bad records met so far in this stage, all ranks
            student_answer_tokens=int(student_tokens), samples=config.micro_batch_size * config.grad_accum *
            ctx.world_size, data_position=(step + 1) * config.grad_accum, sequence_tokens=sequence_tokens,
            teacher_wait_s=self.teacher_wait_s() - wait_before,
        )
        if self.teacher is not None:
            row["teacher_answer_tokens"] = int(teacher_tokens)
            if teacher_tokens and not unreported:  # token-weighted mean over the step's samples, all ranks
                row["teacher_ce"] = teacher_ce_sum / teacher_tokens
        if config.log_sample_ids:
            row["sample_ids"] = [sample.sample_id for group in inputs.groups for sample in group]  # rank 0's
        return row

    # ---- the two loops: each yields (loss value, metrics) per micro-batch, after its backward ------------------
    def _sequential(self, batches: Sequence[EncodedBatch], features: Sequence[Sequence[TeacherFeatures] | None],
                    kwargs: dict, head_calls: Sequence[int]) -> Iterator[tuple[float, dict]]:
        last = len(batches) - 1
        for m, (batch, feats) in enumerate(zip(batches, features, strict=True)):
            loss, metrics = self.engine(self.stage, self._on_device(batch), features=feats,
                                        sft_head_calls=head_calls[m], **kwargs)
            self._backward(loss, boundary=m == last)
            yield float(loss.detach()), metrics

    def _overlapped(self, batches: Sequence[EncodedBatch], features: Sequence[Sequence[TeacherFeatures] | None],
                    kwargs: dict, head_calls: Sequence[int]) -> Iterator[tuple[float, dict]]:
        in_flight: deque[PendingObjective] = deque()
        last, done = len(batches) - 1, 0
        for batch, feats, calls in zip(batches, features, head_calls, strict=True):
            _, pending = self.engine(self.stage, self._on_device(batch), features=feats, pending=True,
                                     sft_head_calls=calls, **kwargs)
            self._backward_since_forward = False
            in_flight.append(pending)  # its Score is on its way
            if len(in_flight) > AHEAD:
                yield self._finish(in_flight.popleft(), boundary=done == last)
                done += 1
        while in_flight:
            yield self._finish(in_flight.popleft(), boundary=done == last)
            done += 1

    def _finish(self, pending: PendingObjective, *, boundary: bool) -> tuple[float, dict]:
        objective = pending.finish()  # sync point: waits for the micro-batch's Score
        if self._backward_since_forward:
            # Two backwards in a row: first what engine.forward would have done after the previous one.
            from deepspeed.runtime.base_optimizer import ZeROOptimizer

            if isinstance(self.engine.optimizer, ZeROOptimizer):  # as engine.forward does (ZeRO 1-3)
                self.engine.optimizer.clear_backward_seen_flag()
        self._backward(objective.loss, boundary=boundary)
        self._backward_since_forward = True
        return float(objective.loss.detach()), objective.metrics

    def _backward(self, loss, *, boundary: bool) -> None:
        # The loss is already this micro-batch's share of the big-batch mean: no 1/grad_accum, and
        # x dp_world_size against the gradient averaging over ranks.
        self.engine.backward(loss * self.dp_world_size, scale_wrt_gas=False)
        if not boundary:
            self.engine.step()  # not a boundary: only counts the micro-step

    def _on_device(self, batch: EncodedBatch) -> EncodedBatch:
        return batch.to(self.ctx.device, self.config.torch_dtype)

    # ---- metrics -----------------------------------------------------------------------------------------------
    def teacher_wait_s(self) -> float:
        """Seconds this rank has waited on the teacher: its calls, the Scores it blocked on, and prefetched steps
        that were not ready."""
        if self.teacher is None:
            return 0.0
        return self.teacher.wait_s + (self.inputs.wait_s if self.inputs is not None else 0.0)

    def _has_part(self, key: str) -> bool:
        name = key.split("_")[0]
        if name in ("KD", "ULD"):
            return self.config.uses_logit_distillation(self.stage) and name == self.config.logit_distillation.upper()
        return name in self.spec.losses and (name != "L2" or self.config.regularisation)
