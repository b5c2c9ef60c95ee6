"""One optimizer step of a stage: :meth:`TrainStep.run` reads top to bottom — the prefetched inputs, the step's
global token counts, per micro-batch the forward to the Recalibrator outputs, the Score sent, (overlap) the
previous micro-batch finished, its loss back-propagated; the optimizer step; the metrics (:class:`StepMetrics`).

**Loss normalisation.** An optimizer step is ``grad_accum`` micro-batches on each of ``W`` ranks and must equal
one big batch's mean loss. Before its micro-batches run, a rank counts the student and teacher answer tokens of
all of them; one ``all_reduce(SUM)`` gives the global counts ``N_s`` and ``N_t`` (:func:`global_counts`), the
normalisers of L3 and of L1/L2, so each micro-batch's loss is its *sum* over answer tokens divided by the global
count. The sum of those over micro-batches and ranks is the big batch's mean. DeepSpeed would scale that twice:
``backward`` divides the loss by ``grad_accum`` (undone with ``engine.backward(loss, scale_wrt_gas=False)``) and
the gradient reduction *averages* over the ``W`` data-parallel ranks (undone by back-propagating ``W * loss``;
ZeRO 0-3 all divide by the data-parallel world size). ``tests/student_trainer/test_recipe.py`` checks the result
against a single-process big-batch gradient, with and without the overlap below.

**The Score in flight.** A micro-batch's forward (``engine(...)``: :class:`student_trainer.module.DistillationModule`)
stops at the Recalibrator outputs; their Score goes to the teacher without waiting
(:meth:`genrecal.resilient_teacher.ResilientTeacher.score_paths_async`), and the loss is built once it is back
(:func:`genrecal.distill.finish_objective`). With the overlap (``--score-overlap``, default on; used in the stages
that score with a remote teacher when ``grad_accum > 1``) ``AHEAD`` (1) micro-batch runs its forward before the
oldest one is finished:

    forward(0) -> send Score(0);  forward(1) -> send Score(1);  wait Score(0), backward(0), micro-step;
    forward(2) -> send Score(2);  wait Score(1), backward(1), micro-step;  ...;  wait Score(G-1), backward(G-1)

so Score(k) travels while forward(k+1) computes; without it, each micro-batch is finished right after its own
forward (0 ahead). Memory: one more micro-batch's graph alive. Score calls go out and are answered in order (one
worker thread, with the wrapper's retries and lost-handle recovery). Micro-batches never cross an optimizer step
(the boundary step changes the weights), so a step of ``G`` micro-batches hides ``G - 1`` round trips. The losses
are the same tensors added in the same order and the backwards run in micro-batch order, so losses, metrics and
gradients equal the sequential loop's bit for bit (tested against a real teacher server).

**DeepSpeed.** ``engine(...)`` (forward) hooks DeepSpeed's backward prologue on the returned tensors (the loss
flows through all of them: :class:`genrecal.distill.Recalibrated`) and resets the ZeRO optimizer's per-backward
bookkeeping of the previous backward (ZeRO-3 counts micro-steps there: the first backward of a step overwrites the
gradient partition, later ones add to it; ZeRO-1/2 clear accumulated gradients). With the overlap the last backward
of a step follows another backward, so the step makes that same reset call itself first
(``clear_backward_seen_flag``, what ``engine.forward`` calls). ``engine.step()`` follows every backward: a
micro-step, and after the last micro-batch the optimizer step. ZeRO 0-3 are tested; under ZeRO-3 the
parameter-prefetch trace, which follows module order, sees one longer forward/backward window per step and
re-records it (a prefetch cost on GPUs; unmeasured). L3 runs the student's head in chunks of answer positions
(:func:`genrecal.losses.student_sft_loss`); under ZeRO-3 each head call all-gathers its weight, so every rank must
make as many calls as the others: micro-batch ``k`` uses the largest chunk count any rank needs for its ``k``-th
micro-batch, found in the same ``all_reduce`` as the token counts (each rank writes its counts into its own slots
of the summed vector).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from genrecal.distill import LossParts, Recalibrated, finish_objective
from genrecal.losses import sft_head_calls
from genrecal.resilient_teacher import ResilientTeacher, ScoreInFlight
from genrecal.stages import STAGES, Stage
from genrecal.teacher import TeacherFeatures
from student_trainer.config import TrainConfig
from student_trainer.dataset import BadRecord
from student_trainer.distributed import DistContext
from student_trainer.prefetch import StepPrefetcher
from student_trainer.step_inputs import StepBuilder, StepInputs

AHEAD = 1  # with the overlap: micro-batches whose forward (and Score) runs before the oldest one is finished


@dataclass
class StepMetrics:
    """One optimizer step's metrics, global over ranks unless said: one row of ``metrics/stage{n}.jsonl``."""

    loss: float  # the big-batch mean loss (the micro-batches' shares summed over ranks)
    parts: LossParts  # each part's big-batch mean; None where the stage does not compute it
    student_answer_tokens: int  # N_s, L3's normaliser
    teacher_answer_tokens: int | None  # N_t, the normaliser of L1/L2; None without a teacher
    teacher_ce: float | None  # the teacher's own CE on its answers, token-weighted; None if unknown or no teacher
    samples: int
    data_position: int  # the next micro-batch index of the data order (the resume position)
    skipped_records: int  # bad records met so far in this stage
    lr: float  # the rate this step used
    step_time_s: float  # this rank's
    tokens_per_s: float  # all ranks' sequence tokens / this rank's step time
    teacher_wait_share: float | None  # share of the step spent waiting on the teacher, mean over ranks
    wire_bytes: dict[str, int] | None  # this rank's bytes to and from a remote teacher ({"Score_sent": n, ...})
    sample_ids: list[str] | None  # rank 0's samples of the step (--log-sample-ids)

    def to_row(self) -> dict:
        """The metrics row: the loss parts under their names (``L1_ce``, ``L3``, ...) and the fields above."""
        row = {**self.parts.to_row(), "loss": self.loss, "skipped_records": self.skipped_records,
               "student_answer_tokens": self.student_answer_tokens, "samples": self.samples,
               "data_position": self.data_position}
        optional = {"teacher_answer_tokens": self.teacher_answer_tokens, "teacher_ce": self.teacher_ce,
                    "sample_ids": self.sample_ids}
        row.update({key: value for key, value in optional.items() if value is not None})
        row.update(lr=self.lr, step_time_s=self.step_time_s, tokens_per_s=self.tokens_per_s)
        if self.teacher_wait_share is not None:
            row["teacher_wait_share"] = self.teacher_wait_share
        row.update({f"wire_{key.lower()}_bytes": n for key, n in (self.wire_bytes or {}).items()})
        return row


@dataclass(frozen=True)
class TokenCounts:
    """A step's global counts (all micro-batches, all ranks): the loss normalisers and L3's head calls."""

    student: float  # N_s: answer tokens L3 scores
    teacher: float  # N_t: the teacher's answer tokens (0 without the teacher)
    sequence: float  # every token of the student's sequences (throughput)
    teacher_ce_sum: float  # the teacher's own CE summed over its answer tokens
    unreported: int  # samples whose teacher did not report its CE
    head_calls: list[int]  # per micro-batch: the largest L3 head-call count any rank needs


def global_counts(ctx: DistContext, inputs: StepInputs) -> TokenCounts:
    """One ``all_reduce`` of this rank's counts of the step (a sync point)."""
    batches = inputs.student_batches
    teacher_features = [f for fs in inputs.features if fs for f in fs]
    scored = [int((b.labels()[:, 1:] != -100).sum()) for b in batches]  # L3 tokens per micro-batch
    local = [
        sum(scored),
        sum(f.num_answer_tokens for f in teacher_features),
        sum(int(b.inputs["attention_mask"].sum()) for b in batches),
        sum(f.teacher_ce * f.num_answer_tokens for f in teacher_features if f.teacher_ce is not None),
        sum(f.teacher_ce is None for f in teacher_features),
    ]
    calls = [0] * (ctx.world_size * len(scored))  # (rank, micro-batch) slots: L3's head calls, this rank's own
    calls[ctx.rank * len(scored):(ctx.rank + 1) * len(scored)] = [sft_head_calls(n) for n in scored]
    student, teacher, sequence, teacher_ce_sum, unreported, *calls = ctx.all_reduce_sum(local + calls)
    head_calls = [int(max(calls[m::len(scored)])) for m in range(len(scored))]  # per micro-batch, max over ranks
    return TokenCounts(student, teacher, sequence, teacher_ce_sum, int(unreported), head_calls)


class TrainStep:
    """``run(step)``: optimizer step ``step`` of the stage, from its prefetched inputs to its metrics."""

    def __init__(self, engine, ctx: DistContext, config: TrainConfig, stage: Stage, teacher: ResilientTeacher | None,
                 inputs: StepPrefetcher[StepInputs], builder: StepBuilder, bad_records: dict[int, BadRecord],
                 dp_world_size: int):
        self.engine, self.ctx, self.config = engine, ctx, config
        self.stage, self.spec = Stage(stage), STAGES[Stage(stage)]
        self.teacher, self.inputs, self.builder = teacher, inputs, builder
        self.bad_records, self.dp_world_size = bad_records, dp_world_size
        self.overlap = bool(
            config.score_overlap and self.spec.needs_teacher and teacher is not None and teacher.async_score
            and config.grad_accum > 1
        )
        self.ahead = AHEAD if self.overlap else 0
        traffic = teacher.traffic if teacher is not None else None  # a remote teacher's byte counts
        self._traffic_seen = traffic.snapshot() if traffic is not None else None
        self._backward_since_forward = False

    def run(self, step: int, *, update: bool = True) -> StepMetrics:
        """Forward and backward of the step's micro-batches, then the optimizer step. ``update=False`` stops before
        it, with the gradients reduced over ranks (what the gradient tests read)."""
        config, ctx, engine = self.config, self.ctx, self.engine
        start, wait_before = time.perf_counter(), self.teacher_wait_s()
        lr = engine.lr_scheduler.get_last_lr()[0]  # the rate this step uses
        inputs = self.inputs.get(step)  # built ahead: micro-batches, the student's batches, the teacher's features
        counts = global_counts(ctx, inputs)  # sync point: N_s, N_t over the step's micro-batches and ranks

        loss, parts = 0.0, None
        in_flight: deque[tuple[Recalibrated, ScoreInFlight | None, Sequence[TeacherFeatures] | None]] = deque()
        last, finished = len(inputs.student_batches) - 1, 0
        for m, (batch, features) in enumerate(zip(inputs.student_batches, inputs.features, strict=True)):
            recalibrated = engine(self.stage, batch.to(ctx.device, config.torch_dtype), features=features,
                                  student_tokens=counts.student, losses=config.losses,
                                  sft_head_calls=counts.head_calls[m])  # forward to the Recalibrator outputs
            self._backward_since_forward = False
            in_flight.append((recalibrated, self._send_score(features, recalibrated, counts.teacher), features))
            while len(in_flight) > (self.ahead if m < last else 0):  # after the last forward: every one left
                oldest, score, oldest_features = in_flight.popleft()
                objective = finish_objective(  # sync point: waits for the micro-batch's Score
                    oldest, score.result() if score is not None else None, config.losses, oldest_features)
                self._backward(objective.loss)
                finished += 1
                if finished <= last or update:
                    engine.step()  # a micro-step; after the last micro-batch the optimizer step (reduce, AdamW, LR)
                loss += float(objective.loss.detach())
                parts = objective.parts if parts is None else parts + objective.parts
        self.builder.release(inputs)  # one call per step, in step order; every Score of the step is answered
        step_time = time.perf_counter() - start

        wait_share = (self.teacher_wait_s() - wait_before) / step_time
        loss, *part_values, skipped, wait_share = ctx.all_reduce_sum(  # sync point
            [loss, *parts.values(), len(self.bad_records), wait_share])
        return StepMetrics(
            loss=loss, parts=parts.with_values(part_values), student_answer_tokens=int(counts.student),
            teacher_answer_tokens=int(counts.teacher) if self.teacher is not None else None,
            teacher_ce=(counts.teacher_ce_sum / counts.teacher  # token-weighted mean over the step's samples
                        if self.teacher is not None and counts.teacher and not counts.unreported else None),
            samples=config.micro_batch_size * config.grad_accum * ctx.world_size,
            data_position=(step + 1) * config.grad_accum, skipped_records=int(skipped), lr=lr,
            step_time_s=step_time, tokens_per_s=counts.sequence / step_time,
            teacher_wait_share=wait_share / ctx.world_size if self.spec.needs_teacher else None,
            wire_bytes=self._wire_bytes(),
            sample_ids=[s.sample_id for group in inputs.groups for s in group] if config.log_sample_ids else None,
        )

    def _send_score(self, features: Sequence[TeacherFeatures] | None, recalibrated: Recalibrated,
                    teacher_tokens: float) -> ScoreInFlight | None:
        """The Score of the micro-batch's Recalibrator outputs, sent without waiting; None without them."""
        if not recalibrated.outputs_by_path:
            return None
        losses = self.config.losses
        return self.teacher.score_paths_async(features, recalibrated.for_score(), normalizer=teacher_tokens,
                                              ce_weight=losses.ce_weight, kl_weight=losses.kl_weight)

    def _backward(self, loss) -> None:
        if self._backward_since_forward:
            # Two backwards in a row: first what engine.forward would have done after the previous one.
            from deepspeed.runtime.base_optimizer import ZeROOptimizer

            if isinstance(self.engine.optimizer, ZeROOptimizer):  # as engine.forward does (ZeRO 1-3)
                self.engine.optimizer.clear_backward_seen_flag()
        # The loss is already this micro-batch's share of the big-batch mean: no 1/grad_accum, and
        # x dp_world_size against the gradient averaging over ranks.
        self.engine.backward(loss * self.dp_world_size, scale_wrt_gas=False)
        self._backward_since_forward = True

    def teacher_wait_s(self) -> float:
        """Seconds this rank has waited on the teacher: its calls, the Scores it blocked on, and prefetched steps
        that were not ready."""
        if self.teacher is None:
            return 0.0
        return self.teacher.wait_s + self.inputs.wait_s

    def _wire_bytes(self) -> dict[str, int] | None:
        """This rank's bytes to and from the teacher since the last step (a prefetched Encode counts in the step it
        ran in); None for an in-process teacher."""
        if self._traffic_seen is None:
            return None
        now = self.teacher.traffic.snapshot()
        sent = {key: n - self._traffic_seen.get(key, 0) for key, n in now.items()}
        self._traffic_seen = now
        return sent
