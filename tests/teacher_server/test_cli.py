"""The teacher's command line (ServeConfig): --config files below the flags, the limits it builds, its refusals."""

from __future__ import annotations

import argparse

import pytest

from genrecal.cli import config_from_args
from teacher_server.__main__ import build_parser
from teacher_server.config import GIB, MIB, EngineConfig, ServeConfig, VllmOptions
from teacher_server.limits import CallLimits
from teacher_server.request_limits import RequestLimits


def parse(argv: list[str]) -> ServeConfig:
    return config_from_args(ServeConfig, build_parser("genrecal-teacher").parse_args(argv))


def test_defaults_are_the_engine_and_limit_defaults(tiny_checkpoint):
    """ServeConfig repeats CallLimits' and RequestLimits' defaults (their modules import torch, the CLI's must
    not): they must stay the same numbers."""
    path = tiny_checkpoint("qwen2_vl")
    serve = parse(["--model", str(path)])
    assert serve.call_limits() == CallLimits()
    assert serve.request_limits() == RequestLimits()
    assert serve.engine_config() == EngineConfig(path)


def test_config_file_then_flags(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen2_vl")
    file = tmp_path / "teacher.yaml"
    file.write_text(f"model: {path}\nbackend: vllm\ntensor-parallel-size: 2\nmax_batch_tokens: 4096\n"
                    "handle_store_gib: 0.5\nmax_inflight_mib: 64\ndtype: float32\nport: 6000\n")
    serve = parse(["--config", str(file), "--max-batch-tokens", "8192", "--port", "0"])
    assert (serve.port, serve.max_batch_tokens) == (0, 8192)  # flags over the file
    engine = serve.engine_config()
    assert engine.max_batch_tokens == 8192 and engine.handle_store_bytes == GIB // 2 and engine.dtype == "float32"
    assert engine.backend == "vllm" and engine.vllm == VllmOptions(tensor_parallel_size=2)  # the rest: defaults
    assert serve.call_limits().max_inflight_bytes == 64 * MIB
    file.write_text(f"model: {path}\nmax_batch_token: 1\n")
    with pytest.raises(ValueError, match=r"unknown option 'max_batch_token'; did you mean 'max_batch_tokens'\?"):
        parse(["--config", str(file)])


def test_refusals_say_which_flags(tiny_checkpoint):
    model = ["--model", str(tiny_checkpoint("qwen2_vl"))]
    with pytest.raises(ValueError, match="--tensor-parallel-size, --max-model-len only apply to --backend vllm"):
        parse([*model, "--tensor-parallel-size", "2", "--max-model-len", "512"])
    with pytest.raises(ValueError, match="TLS needs both --tls-cert and --tls-key"):
        parse([*model, "--tls-cert", "cert.pem"])
    with pytest.raises(ValueError, match="missing --model"):
        parse(["--port", "1"])
    with pytest.raises(ValueError, match="max_calls_per_client=300 exceeds max_calls=256"):
        parse([*model, "--max-calls-per-client", "300"]).call_limits()
    parser = build_parser("genrecal-teacher")
    parser.exit_on_error = False
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'bf16'"):
        parser.parse_args([*model, "--dtype", "bf16"])
