"""Run by ``torchrun`` from ``test_step.py``: ``python export_probe.py OUT.pt``. A tiny model (tied embedding and
head, a buffer, parameters below and above ZeRO-3's persistence threshold) trains two steps under ZeRO-3 and, from
the same start, under ZeRO-2; rank 0 saves the export's gather (:func:`student_trainer.module.full_state_dict`),
DeepSpeed's internal ZeRO-3 consolidation (the oracle), the ZeRO-2 gather and the initial weights."""

from __future__ import annotations

import sys
import warnings

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from student_trainer.distributed import init_distributed
from student_trainer.module import full_state_dict

warnings.filterwarnings("ignore", category=FutureWarning)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)  # 2,048 weights: partitioned (above the threshold below)
        self.body = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32))  # the LayerNorm's 32: persistent
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, ids):  # (B, L) -> (B, L, 64)
        return self.head(self.body(self.embed(ids)) * self.scale)


def train(zero: int, rank: int):
    torch.manual_seed(0)
    model = Tiny()
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": 100},
              "zero_force_ds_cpu_optimizer": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=config, dist_init_required=False)
    for step in range(2):
        ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(10 * rank + step))
        loss = F.cross_entropy(engine(ids).flatten(0, 1), ids.flatten())
        engine.backward(loss)
        engine.step()
    return engine


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    ctx = init_distributed()
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in Tiny().state_dict().items()}
    engine = train(3, ctx.rank)
    ours = full_state_dict(engine.module, is_main=ctx.is_main)
    reference = engine._zero3_consolidated_16bit_state_dict()  # the oracle: DeepSpeed's private consolidation
    engine.destroy()
    zero2 = full_state_dict(train(2, ctx.rank).module, is_main=ctx.is_main)
    if ctx.is_main:
        torch.save({"ours": ours, "reference": dict(reference), "zero2": zero2, "initial": initial}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
