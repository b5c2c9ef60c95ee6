"""The DeepSpeed JSON a stage runs with: the file named by ``--deepspeed`` with its ``"auto"`` entries filled from
the trainer's flags, and explicit values that contradict them refused (so the JSON and the flags cannot disagree
silently about batch size, accumulation, clipping or precision)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from student_trainer.config import TrainConfig

_FLAGS = {
    "train_micro_batch_size_per_gpu": "--micro-batch-size",
    "gradient_accumulation_steps": "--grad-accum",
    "gradient_clipping": "--grad-clip",
}


def resolve_deepspeed_config(config: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON with its ``"auto"`` entries filled from ``config``; conflicting explicit values refused."""
    path = Path(config.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({exc})") from exc
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(
                f"DeepSpeed config {path} declares an {section!r}; the trainer uses its own AdamW and linear "
                "schedule (--lr, --lr-end, --weight-decay): remove that section"
            )
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"DeepSpeed config {path} enables fp16; use bfloat16 (--dtype bfloat16) or float32")
    bf16 = config.torch_dtype == torch.bfloat16
    wanted = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch_size * config.grad_accum * world_size,
        "gradient_clipping": float(config.grad_clip),
    }
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif current != value:
            flag = _FLAGS.get(key, "--micro-batch-size/--grad-accum")
            raise ValueError(
                f"DeepSpeed config {path} sets {key}={current!r} but the trainer's options give {value!r}; set it "
                f"to \"auto\" in the JSON (it is then filled from {flag}) or make them agree"
            )
    section = ds.setdefault("bf16", {})
    if section.get("enabled", "auto") == "auto":
        section["enabled"] = bf16
    elif bool(section["enabled"]) != bf16:
        raise ValueError(
            f"DeepSpeed config {path} sets bf16.enabled={section['enabled']} but the precision is "
            f"{config.dtype!r} ({config.torch_dtype}); set it to \"auto\" or pass a matching --dtype"
        )
    ds.pop("fp16", None)
    # With the optimizer offloaded the trainer passes DeepSpeedCPUAdam (recipe.make_optimizer), so DeepSpeed's check
    # that ZeRO-Offload runs its own CPU optimizer holds; without offload the check does not apply.
    ds.setdefault("zero_force_ds_cpu_optimizer", offloaded_optimizer(ds))
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloaded_optimizer(ds_config: dict) -> bool:
    """Does the config put the optimizer states on the CPU (or NVMe): ZeRO-Offload / ZeRO-Infinity?"""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in ("cpu", "nvme")
