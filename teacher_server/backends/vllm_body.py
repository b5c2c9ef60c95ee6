"""The teacher's body in vLLM: tensor / pipeline parallel over GPUs (and nodes), the head stays a torch tensor.

``python -m teacher_server --backend vllm`` serves the same API as the transformers backend; only where the
body runs changes. The family adapter still formats each sample (chat template, answer spans) with the
checkpoint's own processor; vLLM then runs the body over the same full chat text (answers included) and the
same images as a pooling model — ``runner="pooling"``, ``convert="embed"``, the ``token_embed`` task with
``use_activation=False`` (otherwise vLLM normalises each row) — which returns, per sample, ``(L, D_l)``: the
body's output after its final norm, the exact input of the LM head, the same tensor transformers' backend
takes from ``model.model(...).last_hidden_state``. vLLM's prompt token ids must equal the adapter's; if a
processor or template disagreed the answer spans would point at the wrong rows, so that is an error
(:class:`TokenMismatch`), checked once at start-up on a probe sample and again on every forward.

vLLM drops the LM head of a pooling model, so the head is read alone from the checkpoint's safetensors
(``teacher_server.backends.head``) and Score is unchanged. On GPUs it sits on ``cuda:0`` beside vLLM's share of
that GPU: leave room for it (``V_l x D_l`` in the compute dtype, 2.5 GB for a 72B Qwen) and for the scoring
chunks when choosing ``gpu_memory_utilization``.

Parallelism is vLLM's: ``tensor_parallel_size`` GPUs split every layer, ``pipeline_parallel_size`` stages split
the layer stack; ``distributed_executor_backend="ray"`` spans nodes (see docs/teacher_server.md, "vLLM backend").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from genrecal.families import EncodedBatch, FamilyAdapter, adapter_for_architecture
from genrecal.sample import Sample, Turn
from teacher_server.backends.head import load_head
from teacher_server.errors import IdentityMismatch

logger = logging.getLogger(__name__)

EXECUTOR_BACKENDS = ("mp", "ray", "uni", "external_launcher")
# Defaults for a CPU-only host (tests, CI): one process, a small KV cache, no thread pinning. A user's own
# environment variables win.
CPU_ENVIRONMENT = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


class TokenMismatch(IdentityMismatch):
    """vLLM tokenised a sample differently from the family adapter (maps to FAILED_PRECONDITION).

    The answer spans come from the adapter's token ids, so features taken from vLLM's rows would be
    misaligned. Usually the checkpoint's processor or chat template differs from what vLLM applies.
    """


@dataclass(frozen=True)
class VllmOptions:
    """How vLLM places and sizes the teacher body (vLLM's own engine arguments of the same names)."""

    tensor_parallel_size: int = 1  # GPUs that split every layer
    pipeline_parallel_size: int = 1  # stages that split the layer stack (GPUs = tensor x pipeline)
    gpu_memory_utilization: float = 0.85  # share of each GPU vLLM may take (weights, activations, KV cache)
    max_model_len: int | None = None  # longest sample in tokens; None = the checkpoint's limit
    distributed_executor_backend: str | None = None  # None = vLLM's choice; "ray" for several nodes
    max_images_per_sample: int = 4  # vLLM reserves memory for this many images per prompt

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_images_per_sample"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1] (a share of each GPU), got {self.gpu_memory_utilization}"
            )
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len must be a positive integer or None, got {self.max_model_len!r}")
        if self.distributed_executor_backend not in (None, *EXECUTOR_BACKENDS):
            raise ValueError(
                f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)} (or unset), "
                f"got {self.distributed_executor_backend!r}"
            )

    def engine_kwargs(self) -> dict:
        """The keyword arguments of ``vllm.LLM`` these options set."""
        kwargs = dict(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            limit_mm_per_prompt={"image": self.max_images_per_sample},
        )
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = self.distributed_executor_backend
        return kwargs


class VllmBody:
    """The frozen teacher body in a vLLM engine, with the adapter, processor and head the engine needs.

    ``hidden_states(batch)`` is the body's forward: ``(B, L, D_l)`` for a batch the adapter formatted,
    right-padded like the transformers backend's (padding rows are zeros and never read).
    """

    name = "vllm"

    def __init__(self, model_path: str | Path, *, dtype: torch.dtype, options: VllmOptions | None = None):
        from transformers import AutoConfig, AutoProcessor

        self.model_path = Path(model_path)
        self.options = options or VllmOptions()
        self.config = AutoConfig.from_pretrained(self.model_path)
        self.adapter: FamilyAdapter = adapter_for_architecture(self.config.architectures)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.processor.tokenizer.padding_side = "right"
        self.dtype = dtype
        self._llm = _start_engine(self.model_path, self.config, dtype, self.options)
        head_device = "cuda:0" if torch.cuda.is_available() else "cpu"
        self.head = load_head(self.model_path, dtype=dtype, device=head_device)
        self.forwards = 0
        self._check_probe()

    def encode(self, samples, max_length: int | None = None) -> EncodedBatch:
        """Format ``samples`` with the family adapter (what both backends share)."""
        return self.adapter.encode(self.processor, samples, max_length=max_length)

    @torch.no_grad()
    def hidden_states(self, batch: EncodedBatch) -> Tensor:
        """(B, L, D_l) float body states after the final norm; raises TokenMismatch if vLLM tokenised otherwise."""
        if len(batch.texts) != len(batch.sample_ids) or len(batch.images) != len(batch.sample_ids):
            raise ValueError("the vLLM backend needs the batch's texts and images (EncodedBatch.texts / .images)")
        prompts = []
        for text, images in zip(batch.texts, batch.images, strict=True):
            prompt = {"prompt": text}
            if images:
                prompt["multi_modal_data"] = {"image": list(images)}
            prompts.append(prompt)
        outputs = self._llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        self.forwards += 1
        input_ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        num_samples, padded_length = input_ids.shape
        hidden = None
        for i, output in enumerate(outputs):
            length = int(mask[i].sum())
            expected = input_ids[i, :length].tolist()
            _check_tokens(batch.sample_ids[i], expected, list(output.prompt_token_ids))
            states = output.outputs.data  # (L_i, D_l)
            if hidden is None:
                hidden = states.new_zeros(num_samples, padded_length, states.shape[-1])
            hidden[i, :length] = states
        return hidden

    def close(self) -> None:
        """Stop the vLLM engine and free its memory."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm, engine
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # noqa: BLE001 - best effort at exit; the process usually ends right after
            logger.debug("vLLM cleanup after shutdown failed", exc_info=True)

    def _check_probe(self) -> None:
        """Tokenisation agrees on a one-image sample before serving (a wrong processor fails at start-up)."""
        image = Image.new("RGB", (64, 64), (200, 30, 30))
        probe = Sample("start-up probe", [Turn("user", "<image>\nWhat colour is this?"), Turn("assistant", "red")],
                       [image])
        batch = self.encode([probe])
        hidden = self.hidden_states(batch)
        logger.info("vLLM body: start-up probe of %d tokens agrees with the %s adapter's tokenisation",
                    hidden.shape[1], self.adapter.model_type)


def _start_engine(model_path: Path, config, dtype: torch.dtype, options: VllmOptions):
    if not torch.cuda.is_available():
        for key, value in CPU_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
    try:
        from vllm import LLM
        from vllm.config import PoolerConfig
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise ImportError(
            "the vLLM backend needs vLLM: `pip install 'genrecal[vllm]'` on a CUDA host, or the CPU build as "
            f".ci/vllm-venv installs it ({exc})"
        ) from exc
    if current_platform.is_cpu():
        _check_cpu_head_size(config)
    kwargs = dict(
        model=str(model_path),
        runner="pooling",
        convert="embed",
        pooler_config=PoolerConfig(task="token_embed", use_activation=False),
        dtype=str(dtype).removeprefix("torch."),
        enforce_eager=current_platform.is_cpu(),  # no CUDA graphs to capture on CPU
        **options.engine_kwargs(),
    )
    logger.info("starting vLLM (%s platform): %s", current_platform.device_name,
                {k: v for k, v in kwargs.items() if k != "pooler_config"})
    return LLM(**kwargs)


def _check_cpu_head_size(config) -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    text = config.get_text_config()
    head_size = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise ValueError(
            f"vLLM's CPU attention supports head sizes {supported}, but this checkpoint's text model has "
            f"{head_size} (hidden_size {text.hidden_size} / {text.num_attention_heads} heads); run it on a GPU, "
            "use --backend transformers, or (tiny test checkpoints) write it with fewer, wider heads"
        )


def _check_tokens(sample_id: str, expected: list[int], got: list[int]) -> None:
    if expected == got:
        return
    first = next((k for k, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got)))
    raise TokenMismatch(
        f"sample {sample_id!r}: vLLM tokenised the formatted conversation into {len(got)} tokens, the family "
        f"adapter into {len(expected)}; first difference at position {first} (adapter "
        f"{expected[first:first + 5]}, vLLM {got[first:first + 5]}). The answer spans would be misaligned: the "
        "checkpoint's processor or chat template disagrees with what vLLM applies; serve it with "
        "--backend transformers or fix the processor config"
    )
