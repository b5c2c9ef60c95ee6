"""DeepSpeed's C++ ops, built before they are first needed, with a progress line while they compile.

A DeepSpeed installed from PyPI compiles some ops just in time, in the first process that needs them: the
shared-memory collective of CPU (gloo) runs inside ``deepspeed.init_distributed`` and CPU Adam (ZeRO-Offload's
optimizer) when the optimizer is built. On a 2-core machine that is one to four minutes of silence in a user's first
run. :func:`build_ops` loads them up front: a cached build (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) loads in about a second and prints nothing; otherwise a progress line shows what is
compiling and for how long. ``DS_BUILD_CPU_ADAM=1 pip install deepspeed`` (or ``.ci/deepspeed-ops``) builds them
at install time instead.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

QUIET_S = 2.0  # an op that loads within this long was cached: no progress line


def build_ops_for(deepspeed_json: str | Path, *, show_progress: bool = True) -> None:
    """:func:`build_ops` for what a run with this DeepSpeed JSON needs (an unreadable JSON: nothing here; the
    config resolution reports it)."""
    from student_trainer.deepspeed_config import offloaded_optimizer

    try:
        ds_config = json.loads(Path(deepspeed_json).read_text())
    except (OSError, json.JSONDecodeError):
        return
    build_ops(needed_ops(offloaded_optimizer=isinstance(ds_config, dict) and offloaded_optimizer(ds_config)),
              show_progress=show_progress)


def needed_ops(*, offloaded_optimizer: bool) -> list[str]:
    """DeepSpeed op builders this run will load: the CPU collective under gloo, CPU Adam under ZeRO-Offload."""
    from deepspeed.accelerator import get_accelerator

    ops = ["ShareMemCommBuilder"] if get_accelerator().device_name() == "cpu" else []
    if offloaded_optimizer:
        ops.append("CPUAdamBuilder")
    return ops


def extensions_dir() -> Path:
    """Where torch keeps just-in-time builds (``$TORCH_EXTENSIONS_DIR`` or torch's default)."""
    from torch.utils.cpp_extension import _get_build_directory

    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(configured) if configured else Path(_get_build_directory("", verbose=False)).parent


def build_ops(names: list[str], *, show_progress: bool = True) -> None:
    """Load (compiling on first use) the DeepSpeed ops ``names``; a progress line after ``QUIET_S`` seconds.

    Every rank calls it: torch's build lock lets one process compile while the others wait for it. An op this
    machine cannot build is left to DeepSpeed, which runs without the shared-memory collective and reports a
    missing CPU Adam where the optimizer is built.
    """
    from deepspeed.accelerator import get_accelerator

    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):  # not here: DeepSpeed does without it
            continue
        done = threading.Event()
        ticker = threading.Thread(target=_progress, args=(builder.name, done, show_progress), daemon=True)
        ticker.start()
        try:
            builder.load(verbose=False)
        except Exception as exc:  # noqa: BLE001 (any build failure) DeepSpeed reports it where the op is used
            logger.warning("could not build DeepSpeed's %s op ahead of training (%s); DeepSpeed will try again "
                           "where it needs it", builder.name, exc)
        finally:
            done.set()
            ticker.join()


def _progress(op: str, done: threading.Event, show: bool) -> None:
    if done.wait(QUIET_S) or not show:
        return
    from tqdm.auto import tqdm

    where = extensions_dir()
    logger.info("compiling DeepSpeed's %s op (first run only; cached in %s)", op, where)
    with tqdm(desc=f"compiling DeepSpeed's {op} op (first run only)", bar_format="{desc}: {elapsed}",
              dynamic_ncols=True) as bar:
        while not done.wait(1.0):
            bar.refresh()
