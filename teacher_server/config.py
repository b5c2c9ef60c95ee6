"""Configuration of the teacher engine: which checkpoint, how it is placed, and the serving limits."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genrecal.identity import checkpoint_fingerprint  # noqa: F401 (re-exported)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
GIB = 1 << 30
MIB = 1 << 20

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
    max_request_bytes: int = 256 * MIB  # largest request the server accepts (enforced on the wire)
    chunk_size: int = 512  # tokens per head-scoring chunk (peak extra memory ~ 12 B x chunk_size x V)
    max_length: int = 0  # refuse samples longer than this many teacher tokens; 0 = no limit
    max_image_pixels: int = 36_000_000  # width x height of one image, checked from its header before decoding
    max_concurrent_decodes: int = 4  # images decoded at once, across callers (bounds decoded-image memory)

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
        out["resolved_device_map"] = self.resolved_device_map
        return out
