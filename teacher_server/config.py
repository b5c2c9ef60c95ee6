"""Configuration of the teacher engine: which checkpoint, how it is placed, and the serving limits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from genrecal.families.resolution import check_image_options
from genrecal.identity import checkpoint_fingerprint  # noqa: F401 (re-exported)
from teacher_server.request_limits import RequestLimits

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
GIB = 1 << 30
MIB = 1 << 20
BACKENDS = ("transformers", "vllm")  # where the teacher body runs (teacher_server.backends)
EXECUTOR_BACKENDS = ("mp", "ray", "uni", "external_launcher")  # vLLM's distributed executors


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

@dataclass
class EngineConfig:
    """A served teacher and the engine's limits. Validated on construction; messages say how to fix a value."""

    model_path: str | Path  # checkpoint folder (config.json, safetensors, tokenizer, processor)
    model_name: str | None = None  # reported by Info; default: the folder name
    revision: str | None = None  # reported by Info; default: content fingerprint (see `checkpoint_fingerprint`)
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bfloat16" or "float32"
    device_map: str | dict | None = "auto"  # "auto": spread over visible GPUs with accelerate (None on CPU)
    max_batch_tokens: int = 16384  # padded B * L budget of one teacher forward
    max_batch_samples: int = 32  # samples of one teacher forward (across merged requests)
    batch_wait_ms: float = 5.0  # how long the batcher waits for more requests after the first one
    handle_store_bytes: int = 2 * GIB  # memory budget for kept prediction states; oldest evicted beyond it
    handle_store_client_share: float = 1.0  # most of the handle store one client may hold (fraction)
    encode_cache_bytes: int = 1 * GIB  # Encode results kept by content for other clients (0 = off); LRU
    max_request_bytes: int = 256 * MIB  # largest request the server accepts (enforced on the wire)
    chunk_size: int = 512  # tokens per head-scoring chunk (peak extra memory ~ 12 B x chunk_size x V)
    max_length: int = 0  # refuse samples longer than this many teacher tokens; 0 = no limit
    max_image_pixels: int = 36_000_000  # width x height of one image, checked from its header before decoding
    max_concurrent_decodes: int = 4  # images decoded at once, across callers (bounds decoded-image memory)
    backend: str = "transformers"  # where the body runs: "transformers" (device_map) or "vllm" (`vllm` options)
    vllm: VllmOptions | None = None  # the vLLM backend's placement; None = its defaults
    request_limits: RequestLimits = field(default_factory=RequestLimits)  # work one request may ask for
    # The teacher's image-resolution knobs, e.g. {"max_pixels": 802816} (genrecal.families.resolution), or their
    # text form "k=v,k=v" / JSON; None = the checkpoint's own settings. Info reports every knob's value.
    image_options: dict | None = None

    def __post_init__(self) -> None:
        path = Path(self.model_path).expanduser()
        if not path.is_dir():
            raise ValueError(f"model_path {str(path)!r} is not a directory; point it at a checkpoint folder")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model_path {str(path)!r} has no config.json; point it at a Hugging Face checkpoint folder "
                "(the one holding config.json and *.safetensors)"
            )
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"model_path {str(path)!r} holds no *.safetensors weights; convert the checkpoint first")
        self.model_path = path
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {self.dtype!r}")
        if not (self.device_map is None or isinstance(self.device_map, str | dict)):
            raise ValueError(
                "device_map must be 'auto', a device string ('cpu', 'cuda:0'), an accelerate device-map dict or "
                f"None, got {self.device_map!r}"
            )
        for name in ("max_batch_tokens", "max_batch_samples", "handle_store_bytes", "max_request_bytes", "chunk_size",
                     "max_image_pixels", "max_concurrent_decodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.encode_cache_bytes, int) or self.encode_cache_bytes < 0:
            raise ValueError(f"encode_cache_bytes must be an integer >= 0 (0 = no cache), got {self.encode_cache_bytes!r}")
        if not (isinstance(self.handle_store_client_share, int | float) and 0 < self.handle_store_client_share <= 1):
            raise ValueError(
                f"handle_store_client_share must be a fraction in (0, 1], got {self.handle_store_client_share!r}"
            )
        if not isinstance(self.max_length, int) or self.max_length < 0:
            raise ValueError(f"max_length must be a non-negative integer (0 = no limit), got {self.max_length!r}")
        if self.max_length and self.max_length > self.max_batch_tokens:
            raise ValueError(
                f"max_length={self.max_length} exceeds max_batch_tokens={self.max_batch_tokens}: a sample that "
                "long could never be run; raise max_batch_tokens or lower max_length"
            )
        if not self.batch_wait_ms >= 0:
            raise ValueError(f"batch_wait_ms must be >= 0 (0 = no waiting for more requests), got {self.batch_wait_ms}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "vllm":
            if self.device_map not in ("auto", None):
                raise ValueError(
                    f"device_map={self.device_map!r} places the transformers backend; vLLM places the body itself "
                    "(tensor_parallel_size, pipeline_parallel_size): leave device_map at 'auto'"
                )
            if self.vllm is None:
                self.vllm = VllmOptions()
        elif self.vllm is not None:
            raise ValueError("vLLM options were given but backend is 'transformers'; set backend='vllm'")
        # Knob names and types for the checkpoint's family now; values against its processor when it loads.
        self.image_options = check_image_options(path, self.image_options, vllm=self.backend == "vllm")
        if self.model_name is None:
            self.model_name = path.resolve().name
        if not self.model_name:
            raise ValueError("model_name must not be empty; pass a name or leave it unset for the folder name")
        if self.revision is None:
            self.revision = checkpoint_fingerprint(path)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the teacher computes in."""
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return DTYPES[self.dtype]

    @property
    def resolved_device_map(self) -> str | dict | None:
        """What ``from_pretrained(device_map=...)`` gets: "auto" means accelerate on CUDA and None on CPU."""
        if self.device_map == "auto" and not torch.cuda.is_available():
            return None
        return self.device_map

    def to_dict(self) -> dict:
        """JSON-friendly resolved config, for logs."""
        out = asdict(self)
        out["model_path"] = str(self.model_path)
        out["resolved_dtype"] = str(self.torch_dtype).removeprefix("torch.")
        out["resolved_device_map"] = self.resolved_device_map if self.backend == "transformers" else None
        return out
