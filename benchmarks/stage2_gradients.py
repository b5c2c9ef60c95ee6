"""Which way do GenRecal's stage-2 gradients push the student? A diagnostic for the distillation benchmark.

After stage 1 (the Recalibrator aligned), it sums over the first ``--questions`` colour and shape questions of the
benchmark's noisy distillation set (micro-batches of 8) the gradient on the student's stage-2 trainable parameters of

- ``L1``: GenRecal's alignment loss through the Recalibrator and the teacher's head (CE + KL), the teacher's signal;
- ``L1_kl``: its KL part alone;
- ``L3_noisy``: the student's own SFT loss on the labels the run trains on (40 % of them wrong);
- ``L3_clean``: the same SFT loss on the clean labels, i.e. the direction we would like the student to move,

each normalised per answer token of the whole set, and prints their norms, the cosines with ``L3_clean`` and the
projections on it. Same objective code as the trainer (:func:`genrecal.distill.genrecal_objective`), in-process.

    # stage 1 as the benchmark runs it (seed 1; the teacher in-process), then the diagnostic; OUT/ is benchmarks/distillation.py's --out
    python -m student_trainer --student OUT/models/student/model --teacher-model OUT/models/teacher/model \\
        --data OUT/data/train_distill.json --output runs/stage1 --stages 1 --deepspeed \\
        student_trainer/configs/zero2.json --steps-per-stage 40 --grad-accum 2 --micro-batch-size 8 --lr 3e-4 \\
        --lr-end 3e-5 --seed 1 --save-every 1000000 --no-tensorboard --alignment-steps 200 --alignment-lr 1e-3
    python benchmarks/stage2_gradients.py --teacher OUT/models/teacher/model --student OUT/models/student/model \\
        --recalibrator runs/stage1/stage1/recalibrator.safetensors --data OUT/data/train_distill.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from demo.splits import without_label_noise
from genrecal.distill import LossConfig, genrecal_objective
from genrecal.families import load_vlm
from genrecal.losses import student_sft_loss
from genrecal.recalibrator import Recalibrator
from genrecal.stages import Stage, frozen_modules_to_eval, set_trainable
from genrecal.teacher import InProcessTeacher
from student_trainer.records import record_to_sample

MICRO_BATCH = 8


def naming_records(path: Path, limit: int) -> tuple[list[dict], list[dict]]:
    """The first ``limit`` colour / shape records as trained on (noisy) and with their clean answers restored."""
    noisy = [r for r in json.loads(path.read_text()) if r.get("type") in ("colour", "shape")][:limit]
    clean = without_label_noise(noisy)
    return noisy, clean


def stage2_gradients(teacher_path: Path, student_path: Path, recalibrator_path: Path, data: Path,
                     limit: int) -> dict[str, torch.Tensor]:
    """Flat gradients (one vector over the student's trainable stage-2 parameters) of each loss."""
    noisy_records, clean_records = naming_records(data, limit)
    noisy = [record_to_sample(r, i, data.parent) for i, r in enumerate(noisy_records)]
    clean = [record_to_sample(r, i, data.parent) for i, r in enumerate(clean_records)]
    teacher = InProcessTeacher(load_vlm(teacher_path))
    student = load_vlm(student_path)
    recalibrator = Recalibrator(student.adapter.recalibrator_spec(student.model), teacher.hidden_size, num_blocks=2)
    recalibrator.load_state_dict(load_file(recalibrator_path), strict=True)
    student.model.train()
    params = set_trainable(Stage(2), student.adapter.parameter_groups(student.model), recalibrator)
    frozen_modules_to_eval(student.model)
    body = [p for p in student.model.parameters() if p.requires_grad]

    def take() -> torch.Tensor:  # the student's gradient as one vector; every gradient cleared
        out = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in body])
        for p in params:
            p.grad = None
        return out

    starts = range(0, len(noisy) - MICRO_BATCH + 1, MICRO_BATCH)
    encoded = [(student.encode(noisy[s:s + MICRO_BATCH]), student.encode(clean[s:s + MICRO_BATCH]),
                teacher.encode(noisy[s:s + MICRO_BATCH])) for s in starts]
    teacher_tokens = sum(f.num_answer_tokens for _, _, feats in encoded for f in feats)
    student_tokens = {key: sum(int((batches[i].labels()[:, 1:] != -100).sum()) for batches in encoded)
                      for i, key in enumerate(("L3_noisy", "L3_clean"))}
    grads = {key: torch.zeros(sum(p.numel() for p in body)) for key in ("L1", "L1_kl", "L3_noisy", "L3_clean")}
    for noisy_batch, clean_batch, features in encoded:
        for key, ce_weight in (("L1", 1.0), ("L1_kl", 0.0)):  # L1 alone: no L3, no regularisation path
            losses = LossConfig(ce_weight=ce_weight, sft_weight=0.0, regularisation=False)
            genrecal_objective(Stage(2), student, noisy_batch, recalibrator=recalibrator, teacher=teacher,
                               features=features, teacher_tokens=teacher_tokens, losses=losses).loss.backward()
            grads[key] += take()
        for key, batch in (("L3_noisy", noisy_batch), ("L3_clean", clean_batch)):
            loss, _ = student_sft_loss(student.body_hidden_states(batch), student.head, batch.labels(),
                                       normalizer=student_tokens[key])
            loss.backward()
            grads[key] += take()
    return grads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint folder")
    parser.add_argument("--student", type=Path, required=True, help="base student checkpoint folder")
    parser.add_argument("--recalibrator", type=Path, required=True, help="stage 1's recalibrator.safetensors")
    parser.add_argument("--data", type=Path, required=True, help="the benchmark's train_distill.json")
    parser.add_argument("--questions", type=int, default=128, help="colour/shape questions used, in micro-batches of 8 (a remainder is left out; default 128)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    grads = stage2_gradients(args.teacher, args.student, args.recalibrator, args.data, args.questions)
    clean = grads["L3_clean"] / grads["L3_clean"].norm()
    print(f"{'gradient':<10} {'norm':>8} {'cos to L3_clean':>16} {'along L3_clean':>15}")
    for key, g in grads.items():
        print(f"{key:<10} {float(g.norm()):8.4f} {float(g @ clean / g.norm()):16.3f} {float(g @ clean):15.4f}")


if __name__ == "__main__":
    main()
