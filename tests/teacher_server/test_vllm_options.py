"""The vLLM backend's configuration and token check, without vLLM (they run in the main venv)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from teacher_server.backends.vllm_body import TokenMismatch, _check_tokens
from teacher_server.config import EngineConfig, VllmOptions
from teacher_server.errors import status_for


def test_options_become_vllm_engine_arguments():
    options = VllmOptions(tensor_parallel_size=4, pipeline_parallel_size=2, gpu_memory_utilization=0.7,
                          max_model_len=8192, distributed_executor_backend="ray", max_images_per_sample=2)
    assert options.engine_kwargs() == dict(
        tensor_parallel_size=4, pipeline_parallel_size=2, gpu_memory_utilization=0.7,
        limit_mm_per_prompt={"image": 2}, max_model_len=8192, distributed_executor_backend="ray")
    assert "max_model_len" not in VllmOptions().engine_kwargs()  # unset: vLLM takes the checkpoint's limit


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
