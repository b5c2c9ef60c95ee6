"""Our own "pre-training" of the demo's tiny VLMs: every part trains, the vision encoder included.

GenRecal starts from pretrained VLMs whose vision encoders already see; it keeps them frozen in stages 1-3. A
tiny random checkpoint has no such encoder, so the demo models get one here: plain next-token CE on the answers
(:func:`genrecal.losses.student_sft_loss`), AdamW over ALL parameters (vision encoder, projector, body, head),
linear warm-up then linear decay. This is model preparation, not a GenRecal stage: the distillation itself
always runs in ``student_trainer``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from genrecal.families import load_vlm
from genrecal.losses import student_sft_loss
from genrecal.sample import Sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    lr_end: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    # Keep the token embeddings and the LM head at their seeded random initialisation: fixed random vocabulary
    # vectors work for these tiny models (the body learns to point at the answer tokens' rows), the optimizer
    # skips most of the parameters (the vocabulary dominates a tiny checkpoint), and the trained part that the
    # demo ships stays a few MB.
    freeze_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr_end <= self.lr:
            raise ValueError(f"PretrainConfig needs 0 < lr_end <= lr, got lr={self.lr}, lr_end={self.lr_end}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"PretrainConfig.warmup_steps must be in [0, steps), got {self.warmup_steps}")


def _schedule(config: PretrainConfig):
    """Multiplier of ``lr`` at each step: linear warm-up to 1, then linear decay to ``lr_end / lr``."""
    floor = config.lr_end / config.lr
    span = max(config.steps - config.warmup_steps - 1, 1)

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        return 1.0 + (floor - 1.0) * min(step - config.warmup_steps, span) / span

    return factor


def frozen_parameter_names(vlm) -> set[str]:
    """Names of the token-embedding and LM-head parameters (one tensor when tied) of a loaded VLM."""
    embedding = vlm.adapter.text_model(vlm.model).get_input_embeddings().weight
    vocab = (embedding, vlm.head.weight)
    names = {name for name, p in vlm.model.named_parameters(remove_duplicate=False) if any(p is v for v in vocab)}
    if not names:
        raise ValueError(f"{vlm.adapter.model_type}: found no token-embedding parameter to freeze")
    return names


def pretrain(init: str | Path, samples: Sequence[Sample], out: str | Path, config: PretrainConfig) -> list[float]:
    """Train every parameter of the checkpoint ``init`` on ``samples``; save to ``out``; return per-step losses."""
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("pretrain needs at least one training sample")
    torch.manual_seed(config.seed)
    vlm = load_vlm(init)
    vlm.model.train()
    frozen = frozen_parameter_names(vlm) if config.freeze_embeddings else set()
    for name, parameter in vlm.model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    trainable = [p for p in vlm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    rng = random.Random(config.seed)
    order: list[int] = []
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc=f"pretrain {Path(out).name}", unit="step", mininterval=5)
    for _ in bar:
        if len(order) < config.batch_size:
            fresh = list(range(len(samples)))
            rng.shuffle(fresh)
            order += fresh
        batch_samples = [samples[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        batch = vlm.encode(batch_samples)
        loss, _ = student_sft_loss(vlm.body_hidden_states(batch), vlm.head, batch.labels())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"pretraining {init}: the loss became {value}; lower the learning rate")
        losses.append(value)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    vlm.model.eval()
    out = Path(out)
    vlm.model.save_pretrained(out, safe_serialization=True)
    vlm.processor.save_pretrained(out)
    return losses
