"""``python -m student_trainer [train|eval|align] ...``: the student trainer's command line.

- ``train`` (the default command): run or resume GenRecal's stages under DeepSpeed. Works as a plain single
  process, under ``torchrun --nproc_per_node N -m student_trainer ...`` and under the ``deepspeed`` launcher.
- ``eval``: exact-match VQA evaluation of a checkpoint (:func:`student_trainer.evaluate.evaluate`).
- ``align``: the paper's alignment check (Fig. 7) of a student and its Recalibrator against the teacher.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

COMMANDS = ("train", "eval", "align")

TRAIN_DESCRIPTION = """\
Train a small VLM (the student) from a large one (the teacher) with GenRecal: stage 1 aligns a Recalibrator,
stage 2 distils through it, stage 3 fine-tunes the student alone. Rerunning the same command resumes the run
in --output. Other commands: 'python -m student_trainer eval --help', 'python -m student_trainer align --help'.
"""

EPILOG = """\
examples:
  python -m student_trainer --teacher-addr teacher:50051 --student ckpt/small --data train.json --output runs/a
  torchrun --nproc_per_node 8 -m student_trainer --config run.yaml
  python -m student_trainer eval --model runs/a/final --data test.json
  python -m student_trainer align --student runs/a/stage1/student \\
      --recalibrator runs/a/stage1/recalibrator.safetensors --teacher-addr teacher:50051 --data val.json --out fig7.png
"""


def build_train_parser() -> argparse.ArgumentParser:
    from student_trainer.config import add_train_arguments

    parser = argparse.ArgumentParser(
        prog="python -m student_trainer [train]", description=TRAIN_DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS,
                        help="set by the deepspeed launcher (the rank is read from LOCAL_RANK); do not pass it")
    return parser


def build_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m student_trainer eval", description="Exact-match VQA evaluation of a checkpoint."
    )
    parser.add_argument("--model", required=True, help="checkpoint folder to evaluate, e.g. OUTPUT/final")
    parser.add_argument("--data", required=True, help="evaluation data in any format of student_trainer/records.py "
                        "(.json/.jsonl, .parquet/.arrow, a datasets save_to_disk folder or a Hub dataset id)")
    parser.add_argument("--image-folder", help="folder image names are relative to (default: the data's folder)")
    parser.add_argument("--split", default="train", help="split of a saved DatasetDict (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N usable samples")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per generate call (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="generation budget per answer (default: %(default)s)")
    parser.add_argument("--image-options",
                        help="the model's image resolution in its family's processor knobs, 'KNOB=VALUE,...' or "
                             "JSON, e.g. 'max_pixels=802816' (docs/student_trainer.md, 'Image resolution'; default: "
                             "the checkpoint's own settings, which a training run's exports already hold)")
    parser.add_argument("--out", help="also write the JSON report (with every prediction) to this file")
    return parser


def build_align_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m student_trainer align",
        description="Alignment check (paper Fig. 7): cosine similarities of the Recalibrator's mean-pooled outputs "
                    "on the student path and the regularisation path for N question-answer pairs; an aligned "
                    "student shows a clearly higher diagonal.",
    )
    parser.add_argument("--student", required=True, help="student checkpoint folder, e.g. OUTPUT/stage1/student")
    parser.add_argument("--recalibrator", required=True,
                        help="the Recalibrator trained with it, e.g. OUTPUT/stage1/recalibrator.safetensors")
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher-addr", help="HOST:PORT of the teacher service; several comma-separated (or a "
                         "name resolving to several) spread Encode over teacher replicas and survive losing one")
    teacher.add_argument("--teacher-model", help="teacher checkpoint folder, run in this process")
    parser.add_argument("--data", required=True, help="question-answer pairs (same formats as training data)")
    parser.add_argument("--image-folder", help="folder image names are relative to (default: the data's folder)")
    parser.add_argument("--limit", type=int, default=32, help="number of pairs N (default: %(default)s)")
    parser.add_argument("--centre", action=argparse.BooleanOptionalAction, default=True,
                        help="subtract each path's mean pooled output over the N pairs before the cosine, so the "
                             "matrix shows what tells pairs apart (default: on)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default: %(default)s)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto = bf16 on GPUs that support it, else fp32 (default: %(default)s)")
    parser.add_argument("--teacher-timeout-s", type=float, default=300.0,
                        help="seconds one teacher call may take (default: %(default)s)")
    parser.add_argument("--image-options",
                        help="the student's image resolution in its family's processor knobs, 'KNOB=VALUE,...' or "
                             "JSON (docs/student_trainer.md, 'Image resolution'; default: the checkpoint's own)")
    parser.add_argument("--teacher-image-options",
                        help="the same for an in-process teacher (--teacher-model); a teacher service uses its own "
                             "--image-options")
    parser.add_argument("--out", required=True, help="PNG file for the similarity matrix")
    return parser


def _setup_logging(rank: int) -> None:
    # DeepSpeed 0.19 calls collectives that torch deprecates; one warning per call floods the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train(argv: list[str]) -> int:
    parser = build_train_parser()
    args = parser.parse_args(argv)
    from student_trainer.config import config_from_args

    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    _setup_logging(int(os.environ.get("RANK", 0)))

    import torch.distributed as dist

    from genrecal.resilient_teacher import TeacherMismatchError
    from student_trainer.deepspeed_ops import build_ops_for
    from student_trainer.distributed import init_distributed
    from student_trainer.driver import run_training
    from student_trainer.layout import RunRefusedError

    build_ops_for(config.deepspeed, show_progress=int(os.environ.get("LOCAL_RANK", 0)) == 0)  # before they are used
    ctx = init_distributed()
    try:
        run_training(config, ctx)
    except (RunRefusedError, TeacherMismatchError) as exc:
        if ctx.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def evaluate_command(argv: list[str]) -> int:
    args = build_eval_parser().parse_args(argv)
    _setup_logging(0)
    from student_trainer.evaluate import evaluate

    report = evaluate(
        args.model, args.data, image_folder=args.image_folder, limit=args.limit, split=args.split,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, image_options=args.image_options,
    )
    print(report.table())
    if args.out:
        print(f"report written to {report.write(args.out)}")
    return 0


def align_command(argv: list[str]) -> int:
    args = build_align_parser().parse_args(argv)
    _setup_logging(0)
    import torch
    from safetensors.torch import load_file

    from genrecal.families import load_vlm
    from genrecal.recalibrator import Recalibrator
    from genrecal.resilient_teacher import open_teacher
    from student_trainer.alignment import alignment_matrix, diagonal_gap, plot_alignment
    from student_trainer.data import load_dataset_samples

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and bf16) else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    samples, _ = load_dataset_samples(args.data, image_folder=args.image_folder, limit=args.limit)
    teacher = open_teacher(addr=args.teacher_addr, model=args.teacher_model, device=device, dtype=dtype,
                           timeout_s=args.teacher_timeout_s, image_options=args.teacher_image_options)
    student = load_vlm(args.student, dtype=dtype, image_options=args.image_options)
    student.model.to(device)
    state = load_file(args.recalibrator)
    blocks = len({key.split(".")[1] for key in state if key.startswith("rec_body.")})
    recalibrator = Recalibrator(student.adapter.recalibrator_spec(student.model), teacher.hidden_size,
                                num_blocks=blocks)
    recalibrator.load_state_dict(state, strict=True)
    recalibrator.to(device, dtype)
    matrix = alignment_matrix(student, teacher, recalibrator, samples, batch_size=args.batch_size, centre=args.centre)
    gap = diagonal_gap(matrix) if matrix.shape[0] >= 2 else float("nan")
    name = "/".join(Path(os.path.normpath(args.student)).parts[-2:])  # e.g. stage2/student
    title = f"Alignment (paper Fig. 7) of {name}, N={matrix.shape[0]}{', centred' if args.centre else ''}"
    path = plot_alignment(matrix, args.out, title=title)
    print(f"diagonal gap (mean diagonal - mean off-diagonal): {gap:.4f}; plot written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "train"
    if argv and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    return {"train": train, "eval": evaluate_command, "align": align_command}[command](argv)


if __name__ == "__main__":
    sys.exit(main())
