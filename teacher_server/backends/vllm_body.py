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
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from genrecal.families import LoadedVLM, adapter_for_architecture
from genrecal.families.resolution import apply_image_options, vllm_image_arguments
from genrecal.sample import Sample, Turn
from teacher_server.backends.head import load_head
from teacher_server.batcher import FormattedSample
from teacher_server.config import VllmOptions
from teacher_server.errors import IdentityMismatch

logger = logging.getLogger(__name__)

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


class HeadOnlyModel(nn.Module):
    """The teacher without its body: its config and LM head, what formatting, Info and Score need.

    Stands in for the transformers model in ``LoadedVLM`` when vLLM runs the body (``get_output_embeddings``
    is what ``FamilyAdapter.head`` calls).
    """

    def __init__(self, config, head: nn.Linear):
        super().__init__()
        self.config = config
        self.lm_head = head

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head


class VllmBody:
    """``BodyBackend`` (teacher_server.batcher) running the frozen teacher body in a vLLM engine.

    ``vlm`` is what the engine formats with and scores with: the checkpoint's processor, its family adapter and
    a ``HeadOnlyModel``; the body's weights live only in vLLM.
    """

    name = "vllm"

    def __init__(self, model_path: str | Path, *, dtype: torch.dtype, options: VllmOptions | None = None,
                 image_options: dict | None = None):
        from transformers import AutoConfig, AutoProcessor

        self.model_path = Path(model_path)
        self.options = options or VllmOptions()
        config = AutoConfig.from_pretrained(self.model_path)
        adapter = adapter_for_architecture(config.architectures)
        processor = AutoProcessor.from_pretrained(self.model_path)
        processor.tokenizer.padding_side = "right"
        # The adapter's processor (formatting, answer spans) and vLLM's own copy get the same resolution.
        image_options = apply_image_options(adapter, processor, config, image_options)
        self._probe_size = (512, 384) if image_options else (64, 64)  # exercise changed knobs at start-up
        self._llm = _start_engine(self.model_path, config, dtype, self.options,
                                  vllm_image_arguments(adapter, processor, image_options))
        head_device = "cuda:0" if torch.cuda.is_available() else "cpu"
        model = HeadOnlyModel(config, load_head(self.model_path, dtype=dtype, device=head_device))
        model.requires_grad_(False)
        self.vlm = LoadedVLM(model=model.eval(), processor=processor, adapter=adapter)
        self._check_probe()

    @torch.no_grad()
    def hidden_states(self, samples: Sequence[FormattedSample]) -> list[Tensor]:
        """Per sample ``(L_i, D_l)``: the body's output after its final norm, on the head's device.

        Raises ``TokenMismatch`` if vLLM's prompt token ids differ from the adapter's.
        """
        prompts = []
        for formatted in samples:
            (text,) = formatted.batch.texts
            prompt = {"prompt": text}
            if formatted.sample.images:
                prompt["multi_modal_data"] = {"image": list(formatted.sample.images)}
            prompts.append(prompt)
        outputs = self._llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        device = self.vlm.head.weight.device
        states = []
        for formatted, output in zip(samples, outputs, strict=True):
            expected = formatted.batch.input_ids[0, : formatted.num_tokens].tolist()
            _check_tokens(formatted.sample_id, expected, list(output.prompt_token_ids))
            states.append(output.outputs.data.to(device))  # (L_i, D_l)
        return states

    def close(self) -> None:
        """Stop the vLLM engine and free its memory."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(engine_core, "shutdown", None)):
            engine_core.shutdown()
        del llm, engine_core
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # noqa: BLE001 - best effort; the server process usually ends right after
            logger.debug("vLLM cleanup after shutdown failed", exc_info=True)

    def _check_probe(self) -> None:
        """Tokenisation agrees on a one-image sample before serving (a wrong processor fails at start-up)."""
        image = Image.new("RGB", self._probe_size, (200, 30, 30))
        probe = Sample("start-up probe", [Turn("user", "<image>\nWhat colour is this?"), Turn("assistant", "red")],
                       [image])
        batch = self.vlm.encode([probe])
        formatted = FormattedSample(probe, batch, int(batch.inputs["attention_mask"].sum()))
        (states,) = self.hidden_states([formatted])
        logger.info("vLLM body: start-up probe of %d tokens agrees with the %s adapter's tokenisation",
                    states.shape[0], self.vlm.adapter.model_type)


def _start_engine(model_path: Path, config, dtype: torch.dtype, options: VllmOptions, image_arguments: dict):
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
        **image_arguments,  # mm_processor_kwargs / hf_overrides of --image-options (genrecal.families.resolution)
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
