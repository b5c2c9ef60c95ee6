"""``genrecal-train`` (or ``python -m student_trainer``) ``[train|eval|align] ...``: the student trainer's CLI.

- ``train`` (the default command): run or resume GenRecal's stages under DeepSpeed. Works as a plain single
  process, under ``torchrun --nproc_per_node N -m student_trainer ...`` and under the ``deepspeed`` launcher.
- ``eval`` (also ``genrecal-eval``): evaluate a checkpoint (:func:`student_trainer.evaluate.run_eval`).
- ``align``: the paper's alignment check (Fig. 7) of a student and its Recalibrator against the teacher.

Each command's flags are generated from its config dataclass (:mod:`genrecal.cli`): ``TrainConfig``,
``EvalConfig``, ``AlignConfig``; each takes ``--config FILE`` with flags overriding it. With no command the
arguments are train's: when the first argument is neither a command name nor ``-h``/``--help``, ``train`` is put
in front, so ``torchrun -m student_trainer --config run.yaml`` and the deepspeed launcher's
``--local_rank=0 ...`` train. Nothing here imports torch before the arguments are parsed (``--help`` is quick).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

COMMANDS = ("train", "eval", "align")

DESCRIPTION = """\
Train a small VLM (the student) from a large one (the teacher) with GenRecal, evaluate checkpoints, and check
the Recalibrator's alignment. Without a command the arguments are train's:
  {prog} --config run.yaml        is        {prog} train --config run.yaml
'{prog} COMMAND --help' lists a command's options.
"""
TRAIN_DESCRIPTION = """\
Train a small VLM (the student) from a large one (the teacher) with GenRecal: stage 1 aligns a Recalibrator,
stage 2 distils through it, stage 3 fine-tunes the student alone. Rerunning the same command resumes the run
in --output. Precedence: option defaults < --config FILE < flags.
"""
TRAIN_EPILOG = """\
examples:
  genrecal-train --teacher-addr teacher:50051 --student ckpt/small --data train.json --output runs/a
  torchrun --nproc_per_node 8 -m student_trainer --config run.yaml --lr 2e-4
  genrecal-eval --model runs/a/final --data test.json
  genrecal-train align --student runs/a/stage1/student \\
      --recalibrator runs/a/stage1/recalibrator.safetensors --teacher-addr teacher:50051 --data val.json --output fig7.png
"""
EVAL_DESCRIPTION = "Evaluate a checkpoint (a trained student or a teacher) on a VQA-style set: greedy answers scored " \
                   "by exact match, token F1 and ROUGE-L (docs/evaluate.md)."
ALIGN_DESCRIPTION = ("Alignment check (paper Fig. 7): cosine similarities of the Recalibrator's mean-pooled outputs "
                     "on the student path and the regularisation path for N question-answer pairs; an aligned "
                     "student shows a clearly higher diagonal.")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The whole command line: one subparser per command, its flags generated from its config dataclass."""
    from genrecal.cli import USAGE, add_arguments, program_name
    from student_trainer.align_config import AlignConfig
    from student_trainer.config import TrainConfig
    from student_trainer.eval_config import EvalConfig

    prog = prog or program_name("python -m student_trainer")
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION.format(prog=prog),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = commands.add_parser("train", help="run or resume GenRecal's stages (the default command)",
                                usage=USAGE, description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(train, TrainConfig)
    train.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)  # set by the deepspeed launcher; the rank is read from LOCAL_RANK
    train.set_defaults(config_class=TrainConfig, run=run_train, command_parser=train)
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a VQA-style set (also genrecal-eval)",
                                   usage=USAGE, description=EVAL_DESCRIPTION)
    add_arguments(evaluate, EvalConfig)
    evaluate.set_defaults(config_class=EvalConfig, run=run_eval, command_parser=evaluate)
    align = commands.add_parser("align", help="the alignment check (paper Fig. 7) of a student and its "
                                "Recalibrator", usage=USAGE, description=ALIGN_DESCRIPTION)
    add_arguments(align, AlignConfig)
    align.set_defaults(config_class=AlignConfig, run=run_align, command_parser=align)
    return parser


def with_command(argv: list[str]) -> list[str]:
    """``argv`` with ``train`` in front unless it starts with a command name or -h/--help: the command lines of
    torchrun and the deepspeed launcher (``--config run.yaml``, ``--local_rank=0 ...``) train."""
    return argv if argv and argv[0] in (*COMMANDS, "-h", "--help") else ["train", *argv]


def main(argv: list[str] | None = None) -> int:
    """``genrecal-train`` / ``python -m student_trainer``; returns the exit status."""
    argv = with_command(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    return _run(args, args.command_parser)


def eval_main(argv: list[str] | None = None) -> int:
    """``genrecal-eval``: the ``eval`` command on its own."""
    from genrecal.cli import USAGE, add_arguments, program_name
    from student_trainer.eval_config import EvalConfig

    parser = argparse.ArgumentParser(prog=program_name("genrecal-eval"), usage=USAGE, description=EVAL_DESCRIPTION)
    add_arguments(parser, EvalConfig)
    parser.set_defaults(config_class=EvalConfig, run=run_eval)
    return _run(parser.parse_args(argv), parser)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from genrecal.cli import config_from_args

    try:
        config = config_from_args(args.config_class, args)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2 with the command's usage
    return args.run(config)


def _setup_logging(rank: int) -> None:
    # DeepSpeed 0.19 calls collectives that torch deprecates; one warning per call floods the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_train(config) -> int:
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


def run_eval(config) -> int:
    _setup_logging(0)
    from student_trainer.evaluate import run_eval as evaluate

    return evaluate(config)


def run_align(config) -> int:
    _setup_logging(0)
    from student_trainer.alignment import run_alignment

    gap, path = run_alignment(config)
    print(f"diagonal gap (mean diagonal - mean off-diagonal): {gap:.4f}; plot written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
