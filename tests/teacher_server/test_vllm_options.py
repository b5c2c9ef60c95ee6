"""The vLLM backend's configuration and token check (in the main venv; vLLM's own EngineArgs in the vLLM venv)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from teacher_server.backends.vllm_body import TokenMismatch, _check_tokens
from teacher_server.config import EngineConfig, VllmOptions
from teacher_server.errors import status_for

ENGINE_ARGS_SCRIPT = """
import dataclasses, json, sys
from vllm.engine.arg_utils import EngineArgs

out = []
for kwargs in json.load(sys.stdin):
    args = EngineArgs(model=sys.argv[1], **kwargs)  # what vllm.LLM(**kwargs) builds: unknown names are a TypeError
    out.append({field.name: getattr(args, field.name) for field in dataclasses.fields(args)
                if isinstance(getattr(args, field.name), (int, float, str, dict, type(None)))})
json.dump(out, sys.stdout)
"""


def test_options_reach_vllm_engine_args(vllm_python, tiny_checkpoint):
    """``engine_kwargs()`` goes to ``vllm.LLM``: vLLM's own ``EngineArgs`` takes every key, and each option lands on
    vLLM's argument of the same name (the image count on ``limit_mm_per_prompt``); unset ones keep vLLM's default."""
    options = [
        VllmOptions(tensor_parallel_size=4, pipeline_parallel_size=2, gpu_memory_utilization=0.7,
                    max_model_len=8192, distributed_executor_backend="ray", max_images_per_sample=2),
        VllmOptions(),
    ]
    result = subprocess.run([vllm_python, "-c", ENGINE_ARGS_SCRIPT, str(tiny_checkpoint("qwen2_vl"))],
                            input=json.dumps([o.engine_kwargs() for o in options]), capture_output=True, text=True,
                            timeout=300, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    full, defaults = json.loads(result.stdout)
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "max_model_len",
                 "distributed_executor_backend"):
        assert full[name] == getattr(options[0], name), name
        assert defaults[name] == (getattr(options[1], name) or defaults[name]), name  # None: vLLM's own default
    assert full["limit_mm_per_prompt"]["image"] == 2 and defaults["limit_mm_per_prompt"]["image"] == 4
    assert defaults["max_model_len"] is None and defaults["distributed_executor_backend"] is None  # vLLM decides


@pytest.mark.parametrize("bad, message", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be a positive integer"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\]"),
    (dict(max_model_len=-1), "max_model_len must be a positive integer"),
    (dict(distributed_executor_backend="slurm"), "distributed_executor_backend must be one of mp, ray"),
])
def test_bad_options_say_how_to_fix_them(bad, message):
    with pytest.raises(ValueError, match=message):
        VllmOptions(**bad)


def test_engine_config_backend_rules(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_vl")
    assert EngineConfig(path, backend="vllm").vllm == VllmOptions()
    with pytest.raises(ValueError, match="backend must be one of transformers, vllm"):
        EngineConfig(path, backend="tgi")
    with pytest.raises(ValueError, match="vLLM places the body itself"):
        EngineConfig(path, backend="vllm", device_map="cuda:0")
    with pytest.raises(ValueError, match="set backend='vllm'"):
        EngineConfig(path, vllm=VllmOptions())


def test_image_options_vllm_cannot_apply_are_refused_before_start_up(tiny_checkpoint):
    path = tiny_checkpoint("llava_onevision")
    assert EngineConfig(path, image_options="vision_aspect_ratio=anyres_max_4").image_options == {
        "vision_aspect_ratio": "anyres_max_4"}  # transformers applies it
    with pytest.raises(ValueError, match="vLLM backend cannot apply image option.*anyres_max_9 fixed"):
        EngineConfig(path, backend="vllm", image_options="vision_aspect_ratio=anyres_max_4")
    pinpoints = '{"image_grid_pinpoints": [[28, 28], [56, 56]]}'  # vLLM gets it (mm_processor_kwargs, hf_overrides)
    assert EngineConfig(path, backend="vllm", image_options=pinpoints).image_options == {
        "image_grid_pinpoints": [[28, 28], [56, 56]]}


def test_cli_refuses_vllm_flags_without_the_vllm_backend(tiny_checkpoint):
    result = subprocess.run([sys.executable, "-m", "teacher_server", "--model", str(tiny_checkpoint("qwen2_vl")),
                             "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--tensor-parallel-size only apply to --backend vllm" in result.stderr


def test_token_mismatch_names_the_sample_and_position_and_is_failed_precondition():
    _check_tokens("same", [1, 2, 3], [1, 2, 3])
    with pytest.raises(TokenMismatch) as info:
        _check_tokens("s7", [1, 2, 3, 4], [1, 2, 9, 4, 5])
    message = str(info.value)
    assert "'s7'" in message and "5 tokens" in message and "4" in message and "position 2" in message
    assert status_for(info.value)[0] == "FAILED_PRECONDITION"
