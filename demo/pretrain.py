"""Our own "pre-training" of the demo's tiny VLMs: every part trains, the vision encoder included.

GenRecal starts from pretrained VLMs whose vision encoders already see (CLIP / SigLIP / InternViT were trained on
images first); it keeps them frozen in stages 1-3. A tiny random checkpoint has no such encoder, so the demo
models get one here, in one loop:

- next-token CE on the answers (:func:`genrecal.losses.student_sft_loss`), AdamW over ALL parameters (vision
  encoder, projector, body, head), linear warm-up then linear decay;
- plus, standing in for the vision encoder's own pre-training, a **vision probe**: a linear classifier on the
  mean of the projector's output tokens (what the language model receives) predicts the picture's colour and
  shape; its CE trains the vision encoder and projector directly. Without it, the language model and the vision
  tower wait on each other: in runs of 600-1,000 steps the CE plateaued at the answer prior (yes/no 84 % from
  the wording alone, colour and shape at chance). The probe is thrown away; the checkpoint keeps the VLM only.
- optionally first (``vision_steps``), the vision encoder's own pre-training, as real ones had before their VLM
  was trained: the probe alone trains the vision encoder and projector on pictures drawn on the fly
  (:mod:`demo.pictures`, never an easy-VQA picture); the language model is not trained in that phase.

This is model preparation, not a GenRecal stage: the distillation itself always runs in ``student_trainer``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genrecal.families import load_vlm
from genrecal.head_scoring import IGNORE_INDEX
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
    probe_weight: float = 1.0  # weight of the vision probe's CE (0 = no probe)
    seed: int = 0
    vision_steps: int = 0  # steps of the vision encoder's own pre-training on drawn pictures, before the VLM's
    vision_batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "vision_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr_end <= self.lr:
            raise ValueError(f"PretrainConfig needs 0 < lr_end <= lr, got lr={self.lr}, lr_end={self.lr_end}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"PretrainConfig.warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if self.probe_weight < 0:
            raise ValueError(f"PretrainConfig.probe_weight must be >= 0, got {self.probe_weight}")
        if self.vision_steps < 0:
            raise ValueError(f"PretrainConfig.vision_steps must be >= 0, got {self.vision_steps}")
        if self.vision_steps and not self.probe_weight:
            raise ValueError("PretrainConfig.vision_steps trains the vision encoder through the vision probe; "
                             "it needs probe_weight > 0")


@dataclass(frozen=True)
class PictureLabels:
    """What a picture shows, for the vision probe: class indices, or ``IGNORE_INDEX`` where unknown."""

    colour: int = IGNORE_INDEX
    shape: int = IGNORE_INDEX


def _schedule(config: PretrainConfig, steps: int | None = None):
    """Multiplier of ``lr`` at each of ``steps`` (default ``config.steps``): linear warm-up to 1, then linear decay
    to ``lr_end / lr``."""
    floor = config.lr_end / config.lr
    steps = config.steps if steps is None else steps
    warmup = min(config.warmup_steps, steps - 1)
    span = max(steps - warmup - 1, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 1.0 + (floor - 1.0) * min(step - warmup, span) / span

    return factor


class VisionProbe(nn.Module):
    """Linear colour and shape classifiers on the mean of one picture's projector output tokens."""

    def __init__(self, width: int, colours: int, shapes: int):
        super().__init__()
        self.colour = nn.Linear(width, colours)
        self.shape = nn.Linear(width, shapes)

    def loss(self, pooled: torch.Tensor, labels: Sequence[PictureLabels]) -> torch.Tensor:
        """``pooled`` (B, D): one row per picture; mean CE over the known labels of both heads."""
        colour = torch.tensor([lab.colour for lab in labels])
        shape = torch.tensor([lab.shape for lab in labels])
        terms = [F.cross_entropy(head(pooled).float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
                 for head, target in ((self.colour, colour), (self.shape, shape))]
        known = int((colour != IGNORE_INDEX).sum() + (shape != IGNORE_INDEX).sum())
        return (terms[0] + terms[1]) / max(known, 1)


class ProjectorTap:
    """Captures the output of the family's vision projector (the tokens the language model receives)."""

    def __init__(self, vlm):
        name = vlm.adapter.projector_prefixes[0].rstrip(".")
        self.module = vlm.model.get_submodule(name)
        self.output: torch.Tensor | None = None
        self._hook = self.module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.output = output[0] if isinstance(output, tuple) else output

    def pooled(self, pictures: int) -> torch.Tensor:
        """(pictures, D): the mean output token of each picture (every picture gives the same token count)."""
        tokens = self.output.reshape(pictures, -1, self.output.shape[-1])  # (B, T, D)
        return tokens.mean(dim=1)

    def remove(self) -> None:
        self._hook.remove()


def picture_features(vlm, images: Sequence) -> torch.Tensor:
    """(pictures, D): the mean projector output token of each picture, from the pictures alone (no text, no
    language model): the family's image processor, then its ``get_image_features``."""
    import inspect

    inputs = vlm.processor.image_processor(images=list(images), return_tensors="pt")
    get_features = vlm.model.model.get_image_features
    accepted = inspect.signature(get_features).parameters
    output = get_features(**{k: v for k, v in inputs.items() if k in accepted})
    tokens = getattr(output, "pooler_output", output)
    if isinstance(tokens, (tuple, list)):  # families that return one tensor per picture
        tokens = torch.cat(list(tokens))
    return tokens.reshape(len(images), -1, tokens.shape[-1]).mean(dim=1)


def pretrain_vision(vlm, probe: VisionProbe, config: PretrainConfig) -> list[float]:
    """The vision encoder's own pre-training: ``config.vision_steps`` steps of the probe's CE on drawn pictures,
    training the vision encoder, the projector and the probe only. Returns the per-step losses."""
    from tqdm.auto import tqdm

    from demo.pictures import labelled_pictures

    groups = vlm.adapter.parameter_groups(vlm.model)
    parameters = groups["vision_encoder"] + groups["projector"] + list(probe.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, config.vision_steps))
    pictures = labelled_pictures(config.seed)
    losses: list[float] = []
    bar = tqdm(range(config.vision_steps), desc="pre-training the vision encoder", unit="step", mininterval=5)
    for _ in bar:
        drawn = [next(pictures) for _ in range(config.vision_batch_size)]
        loss = probe.loss(picture_features(vlm, [image for image, _ in drawn]), [labels for _, labels in drawn])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(_finite(float(loss.detach()), "the vision encoder"))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    return losses


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"pre-training {what}: the loss became {value}; lower the learning rate")
    return value


def pretrain(init: str | Path, samples: Sequence[Sample], out: str | Path, config: PretrainConfig, *,
             picture_labels: Sequence[PictureLabels] | None = None, classes: tuple[int, int] = (8, 3)) -> list[float]:
    """Train every parameter of the checkpoint ``init`` on ``samples``; save to ``out``; return per-step losses.

    ``picture_labels`` (one per sample, for its single picture) switch the vision probe on, with ``classes`` =
    (colours, shapes).
    """
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("pretrain needs at least one training sample")
    use_probe = picture_labels is not None and config.probe_weight > 0
    if use_probe and len(picture_labels) != len(samples):
        raise ValueError(f"picture_labels has {len(picture_labels)} entries for {len(samples)} samples")
    torch.manual_seed(config.seed)
    vlm = load_vlm(init)
    vlm.model.train()
    vlm.model.requires_grad_(True)
    parameters = list(vlm.model.parameters())
    tap = probe = None
    if use_probe:
        tap = ProjectorTap(vlm)
        probe = VisionProbe(vlm.head.weight.shape[1], *classes)
        parameters += list(probe.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    if config.vision_steps:
        if not use_probe:
            raise ValueError("PretrainConfig.vision_steps needs picture_labels (the vision probe)")
        pretrain_vision(vlm, probe, config)
    rng = random.Random(config.seed)
    order: list[int] = []
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc=f"pre-training {Path(out).name}", unit="step", mininterval=5)
    for _ in bar:
        if len(order) < config.batch_size:
            fresh = list(range(len(samples)))
            rng.shuffle(fresh)
            order += fresh
        chosen = order[: config.batch_size]
        del order[: config.batch_size]
        batch = vlm.encode([samples[i] for i in chosen])
        loss, _ = student_sft_loss(vlm.body_hidden_states(batch), vlm.head, batch.labels())
        if use_probe:
            probe_loss = probe.loss(tap.pooled(len(chosen)), [picture_labels[i] for i in chosen])
            loss = loss + config.probe_weight * probe_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(_finite(float(loss.detach()), str(init)))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    if tap is not None:
        tap.remove()
    vlm.model.eval()
    out = Path(out)
    vlm.model.save_pretrained(out, safe_serialization=True)
    vlm.processor.save_pretrained(out)
    return losses
