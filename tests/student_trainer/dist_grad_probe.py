"""Run by ``torchrun`` from ``test_recipe.py``: the reduced gradients of one optimizer step of the real recipe.

``python dist_grad_probe.py OUT.pt TEACHER STUDENT DATA WORKDIR ZERO_JSON...``: for each DeepSpeed config and
each micro-batch loop (sequential; overlapped, key ``NAME+overlap``), one stage-2 step (``grad_accum``
micro-batches per rank) through :class:`student_trainer.recipe.StageRecipe`; rank 0 saves every trainable
parameter's full gradient (after DeepSpeed's reduction over ranks, before the update), the sample ids each rank
used and the logged metrics. The teacher is in process; for the overlapped loop its Score runs in the wrapper's
worker thread (``async_score``, as for a remote teacher), so the loop's DeepSpeed call order is the real one.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from genrecal.stages import Stage
from student_trainer.config import TrainConfig
from student_trainer.data import load_dataset_samples
from student_trainer.distributed import init_distributed
from student_trainer.driver import connect_teacher
from student_trainer.recipe import StageRecipe

warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    out, teacher, student, data, workdir, *zero_configs = sys.argv[1:]
    torch.set_num_threads(1)
    ctx = init_distributed()
    results = {}
    for ds_json, overlap in [(ds_json, overlap) for ds_json in zero_configs for overlap in (False, True)]:
        name = Path(ds_json).stem + ("+overlap" if overlap else "")
        config = TrainConfig(
            student=student, data=data, output=str(Path(workdir) / name), teacher_model=teacher,
            stages="2", deepspeed=ds_json, grad_accum=3, micro_batch_size=1, steps_per_stage=4, seed=3,
            tensorboard=False, data_workers=0,  # the samples are in memory already; prefetch stays on
            score_overlap=overlap,
        )
        samples, _ = load_dataset_samples(config.data)
        resilient = connect_teacher(config, ctx)
        resilient.async_score = overlap
        recipe = StageRecipe(config, Stage.DISTILLATION, ctx, samples, resilient, student, None)
        try:
            recipe.setup()
            metrics = recipe.train_step.run(0, update=False)  # the gradients reduced over ranks, not yet applied
            grads = {}
            for param_name, param in recipe.engine.module.named_parameters():
                if param.requires_grad:
                    grad = safe_get_full_grad(param)  # a collective: every rank asks
                    grads[param_name] = grad.detach().float().cpu().clone()
            used = [samples[i].sample_id for m in range(config.grad_accum) for i in recipe.batches.batch(m)]
            results[name] = {
                "grads": grads, "sample_ids": ctx.all_gather_object(used), "row": metrics.to_row(),
                "world_size": ctx.world_size, "overlap": recipe.train_step.overlap,
            }
        finally:
            recipe.cleanup()
            resilient.close()
    if ctx.is_main:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
