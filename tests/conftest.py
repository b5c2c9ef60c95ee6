"""Shared fixtures: real-format tiny checkpoints written to disk once per test session."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
# Under pytest-xdist (README's command: two workers, one per core) each worker computes with one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


# The longest files, longest first (serial seconds, 2-core VM, 2026-12-02): e2e trainer 201, trainer recipe 153,
# teacher service 105, vLLM backend 96, distillation benchmark ~70, demo 68, hardening 55, data runs 51, soak 40.
LONGEST_FIRST = ("e2e/test_trainer_e2e.py", "student_trainer/test_recipe.py", "e2e/test_teacher_service.py",
                 "teacher_server/test_vllm_backend.py", "benchmarks/test_distillation_benchmark.py", "demo/test_run.py",
                 "e2e/test_teacher_hardening.py", "student_trainer/test_data_runs.py", "benchmarks/test_soak_benchmark.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the others in their usual order (a stable sort).

    With ``-n 2 --dist loadfile`` (README's command) each file runs whole on one worker, handed out in this order:
    starting the long multi-process files first keeps one of them from running alone at the end."""
    def rank(item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(f"/tests/{name}")), len(LONGEST_FIRST))

    items.sort(key=rank)


def pytest_configure(config):
    """One folder for DeepSpeed's JIT-compiled ops (the shared-memory comm op, CPU Adam: ~30-120 s each to build on
    2 cores) for this process and every subprocess the tests start: the trainer runs of the benchmark, the demo,
    the e2e and the recipe tests all load the ones built first. Kept in the pytest cache, so later sessions reuse
    them; an outside ``$TORCH_EXTENSIONS_DIR`` wins: ``.ci/run`` builds both ops at install time
    (``.ci/deepspeed-ops``) into ``.venv/torch_extensions`` and exports it, so CI's tests build nothing."""
    # And pytest-xdist, which sorts test files by their number of tests unless told not to, keeps LONGEST_FIRST's
    # order (see pytest_collection_modifyitems).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    cache = getattr(config, "cache", None)
    extensions = (cache.mkdir("torch_extensions") if cache is not None
                  else Path(tempfile.gettempdir()) / "genrecal-torch-extensions")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(family, tokenizer="gpt2", **sizes)`` -> path of a saved checkpoint (built once)."""
    from genrecal.tiny import TinySizes, write_tiny_checkpoint

    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny")

    def build(family: str, tokenizer: str = "gpt2", seed: int = 0, **sizes):
        key = (family, tokenizer, seed, tuple(sorted(sizes.items())))
        if key not in cache:
            out = root / f"{family}-{tokenizer}-{seed}-{len(cache)}"
            cache[key] = write_tiny_checkpoint(family, out, sizes=TinySizes(**sizes), tokenizer=tokenizer, seed=seed)
        return cache[key]

    return build


VLLM_PYTHON_ENV = "GENRECAL_VLLM_PYTHON"
LMMS_EVAL_PYTHON_ENV = "GENRECAL_LMMS_EVAL_PYTHON"


def _other_venv_python(variable: str, script: str, venv: str) -> str:
    """The python of a tool's own venv, from ``$variable``: ``.ci/run`` always creates the venv and sets the
    variable; without it the tests that need the tool skip, and a path that is set but wrong fails them."""
    python = os.environ.get(variable)
    if not python:
        pytest.skip(f"${variable} is unset: create the venv with `{script}` and set {variable}={venv}/bin/python "
                    "(.ci/run does both)")
    if not Path(python).is_file():
        pytest.fail(f"${variable}={python!r} is not a file; run {script} or fix the path")
    return python


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The python of the vLLM venv (``.ci/vllm-venv``; vLLM cannot share the main venv), from $GENRECAL_VLLM_PYTHON.
    Tests of the vLLM backend start the teacher server with it."""
    return _other_venv_python(VLLM_PYTHON_ENV, ".ci/vllm-venv", ".venv-vllm")


@pytest.fixture(scope="session")
def lmms_eval_python() -> str:
    """The python of the lmms-eval venv (``.ci/lmms-eval-venv``; lmms-eval needs filelock < 4, which the main
    venv's libraries do not accept), from $GENRECAL_LMMS_EVAL_PYTHON."""
    return _other_venv_python(LMMS_EVAL_PYTHON_ENV, ".ci/lmms-eval-venv", ".venv-lmms-eval")


@pytest.fixture(scope="session")
def teacher_student_checkpoints(tiny_checkpoint):
    """(teacher, student) checkpoint folders for the trainer tests: a tiny Qwen2-VL teacher with the GPT-2
    tokenizer and a tiny InternVL student with the Llama-2 tokenizer — different families, tokenizers, sizes."""
    teacher = tiny_checkpoint("qwen2_vl", tokenizer="gpt2", hidden_size=96, intermediate_size=192)
    student = tiny_checkpoint("internvl", tokenizer="llama2", hidden_size=64)
    return teacher, student


def tiny_qwen2_config(hidden_size: int, vocab_size: int, **overrides):
    """A 2-layer Qwen2 text config for unit tests of the losses and stages (special ids 0/1/2)."""
    from transformers import Qwen2Config

    kwargs = dict(hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen2Config(**(kwargs | overrides))


@pytest.fixture(scope="session")
def subprocess_env() -> dict:
    """The environment of the trainers and servers the tests start: offline, one thread each, unbuffered, this
    checkout importable, no leftover rank variables; ``TORCH_EXTENSIONS_DIR`` (see :func:`pytest_configure`)
    inherited."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _outcomes(calls) -> list[tuple[object, BaseException | None]]:
    """(result, error) of each call, all run at the same time (one thread each) and all finished."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [(None, f.exception()) if f.exception() is not None else (f.result(), None) for f in futures]


def concurrently(*calls):
    """Run independent calls (e.g. trainer invocations, one torch thread each: the CI machine has 2 cores) at the
    same time; return their results in order, or raise the first error once all have finished."""
    outcomes = _outcomes(calls)
    for _, error in outcomes:
        if error is not None:
            raise error
    return [result for result, _ in outcomes]


def start_concurrently(*starts):
    """Start servers at the same time: each of ``starts`` (no arguments) returns a started process with ``kill()``
    (e.g. a ``TeacherProcess``). Returns them in order; if any start fails, the others are killed and its error is
    raised. A server start is mostly imports and model loading (~5-10 s on 2 cores; vLLM ~25-40 s)."""
    outcomes = _outcomes(starts)
    errors = [error for _, error in outcomes if error is not None]
    if errors:
        for process, error in outcomes:
            if error is None:
                process.kill()
        raise errors[0]
    return [process for process, _ in outcomes]


def random_image(rng: np.random.Generator, size: int = 64) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from a stable hash of the test's id so a failure reproduces in any
    process (``hash()`` of a string is salted per interpreter)."""
    digest = hashlib.sha256(request.node.nodeid.encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def load_benchmark_script(name: str, module_name: str | None = None):
    """``benchmarks/NAME.py`` (a script, not a package module) imported as ``module_name`` (default: ``NAME``)."""
    spec = importlib.util.spec_from_file_location(module_name or name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
