"""Configuration of the teacher: the engine's (:class:`EngineConfig`: which checkpoint, how it is placed, the
serving limits) and the command line's (:class:`ServeConfig`: one field per ``genrecal-teacher`` flag).

Importing this module does not import torch (``--help`` answers at once); validation imports what it needs.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from genrecal.cli import option
from genrecal.identity import checkpoint_fingerprint  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch

    from teacher_server.limits import CallLimits
    from teacher_server.request_limits import RequestLimits

Dtype = Literal["auto", "bfloat16", "float32"]  # torch / transformers / vLLM names, as the trainer's --dtype
Backend = Literal["transformers", "vllm"]  # where the teacher body runs (teacher_server.backends)
ExecutorBackend = Literal["mp", "ray", "uni", "external_launcher"]  # vLLM's distributed executors
DTYPES = typing.get_args(Dtype)
BACKENDS = typing.get_args(Backend)
EXECUTOR_BACKENDS = typing.get_args(ExecutorBackend)
GIB = 1 << 30
MIB = 1 << 20


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
    request_limits: RequestLimits | None = None  # work one request may ask for; None = RequestLimits()
    # The teacher's image-resolution knobs, e.g. {"max_pixels": 802816} (genrecal.families.resolution), or their
    # text form "k=v,k=v" / JSON; None = the checkpoint's own settings. Info reports every knob's value.
    image_options: dict | None = None

    def __post_init__(self) -> None:
        from genrecal.families.resolution import check_image_options
        from teacher_server.request_limits import RequestLimits

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
        if self.dtype not in DTYPES:
            names = ", ".join(map(repr, DTYPES[:-1])) + f" or {DTYPES[-1]!r}"
            raise ValueError(f"dtype must be {names}, got {self.dtype!r}")
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
        if self.request_limits is None:
            self.request_limits = RequestLimits()

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the teacher computes in: ``auto`` is bfloat16 on CUDA, float32 on the CPU."""
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, self.dtype)

    @property
    def resolved_device_map(self) -> str | dict | None:
        """What ``from_pretrained(device_map=...)`` gets: "auto" means accelerate on CUDA and None on CPU."""
        import torch

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


_ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}
MODEL = "model"
BATCHING = "batching and memory"
NETWORK = "network and security"
REQUEST_LIMITS = "limits per request (reported by Info; docs/teacher_server.md)"
CALL_LIMITS = "limits per call and per client"
VLLM = "vLLM backend (--backend vllm; docs/teacher_server.md)"
MONITORING = "monitoring and logging"
VLLM_FIELDS = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "max_model_len",
               "distributed_executor_backend", "max_images_per_sample")


@dataclass(kw_only=True)
class ServeConfig:
    """``genrecal-teacher`` / ``python -m teacher_server``: one field per flag, in the units a person gives (GiB,
    MiB, seconds); :meth:`engine_config`, :meth:`call_limits` and :meth:`request_limits` build what the server runs
    with (and validate it). The call and request limits' defaults are those of ``CallLimits`` and
    ``RequestLimits`` (a test keeps them equal: those modules import torch, this one must not)."""

    # ---- model ----------------------------------------------------------------------------------------------
    model: str = option(group=MODEL, metavar="PATH", help="teacher checkpoint folder (config.json, *.safetensors, "
                        "processor)")
    model_name: str | None = option(None, group=MODEL, metavar="NAME", help="name reported by Info (default: the "
                                    "checkpoint folder's name)")
    revision: str | None = option(None, group=MODEL, help="revision reported by Info (default: a fingerprint of "
                                  "config, tokenizer and weights)")
    dtype: Dtype = option("auto", group=MODEL, help="compute dtype: auto = bfloat16 on GPU, float32 on CPU")
    backend: Backend = option("transformers", group=MODEL, help="where the teacher body runs: transformers or "
                              "vllm (tensor/pipeline parallel; same API and results; the LM head stays a torch "
                              "tensor for Score)")
    device_map: str = option("auto", group=MODEL, help="transformers backend: 'auto' spreads the teacher over all "
                             "visible GPUs (accelerate, one GPU busy at a time); or 'cpu', 'cuda:0'")
    image_options: dict | None = option(None, group=MODEL, metavar="OPTIONS", help="the teacher's image "
                                        "resolution in its family's own processor knobs, 'KNOB=VALUE,...' or a JSON "
                                        "object, e.g. 'max_pixels=802816,min_pixels=3136' (Qwen2-VL), "
                                        "'max_patches=6' (InternVL); an unknown knob is refused with the family's "
                                        "list; Info reports the values (docs/teacher_server.md, 'Image resolution') "
                                        "(default: the checkpoint's own settings)")
    # ---- batching and memory ----------------------------------------------------------------------------------
    max_batch_tokens: int = option(_ENGINE_DEFAULTS["max_batch_tokens"], group=BATCHING, help="padded batch x "
                                   "length token budget of one teacher forward")
    max_batch_samples: int = option(_ENGINE_DEFAULTS["max_batch_samples"], group=BATCHING, help="most samples in "
                                    "one teacher forward, across merged requests")
    batch_wait_ms: float = option(_ENGINE_DEFAULTS["batch_wait_ms"], group=BATCHING, metavar="MS", help="how long "
                                  "to wait for other students' requests to batch with")
    handle_store_gib: float = option(_ENGINE_DEFAULTS["handle_store_bytes"] / GIB, group=BATCHING, metavar="GIB",
                                     help="memory for kept teacher states between Encode and Score; oldest evicted")
    handle_store_client_share: float = option(_ENGINE_DEFAULTS["handle_store_client_share"], group=BATCHING,
                                              help="most of the handle store one client may hold, as a fraction "
                                              "(when the store is full the client holding the most loses its "
                                              "oldest handles)")
    encode_cache_gib: float = option(_ENGINE_DEFAULTS["encode_cache_bytes"] / GIB, group=BATCHING, metavar="GIB",
                                     help="memory for Encode results kept by sample content, so that students "
                                     "training on the same data share the teacher's forwards; oldest evicted; "
                                     "0 = off")
    chunk_size: int = option(_ENGINE_DEFAULTS["chunk_size"], group=BATCHING, help="tokens per head-scoring chunk; "
                             "memory ~ 12 B x chunk x vocab")
    # ---- network and security --------------------------------------------------------------------------------
    host: str = option("127.0.0.1", group=NETWORK, help="address to bind (127.0.0.1: localhost only; 0.0.0.0 to "
                       "accept remote students)")
    port: int = option(50051, group=NETWORK, help="port to bind (0 = any free port)")
    auth_token_file: str | None = option(None, group=NETWORK, metavar="FILE", help="file of 'CLIENT_NAME TOKEN' "
                                         "lines; every call then needs 'authorization: Bearer TOKEN' metadata "
                                         "(re-read on SIGHUP). Without it only localhost may be bound")
    allow_unauthenticated: bool = option(False, group=NETWORK, help="serve a non-localhost --host without "
                                         "--auth-token-file (behind a firewall only)")
    tls_cert: str | None = option(None, group=NETWORK, metavar="PEM", help="certificate chain of the server "
                                  "(TLS); needs --tls-key")
    tls_key: str | None = option(None, group=NETWORK, metavar="PEM", help="private key of the server")
    tls_client_ca: str | None = option(None, group=NETWORK, metavar="PEM", help="CA bundle: clients must present "
                                       "a certificate signed by it (mTLS)")
    grace_s: float = option(30.0, group=NETWORK, metavar="SECONDS", help="on SIGTERM, how long in-flight calls may "
                            "finish")
    # ---- limits per request ------------------------------------------------------------------------------------
    max_request_mib: int = option(_ENGINE_DEFAULTS["max_request_bytes"] // MIB, group=REQUEST_LIMITS,
                                  metavar="MIB", help="largest request payload accepted")
    max_length: int = option(_ENGINE_DEFAULTS["max_length"], group=REQUEST_LIMITS, metavar="TOKENS", help="refuse "
                             "samples longer than this many teacher tokens; 0 = no limit")
    max_image_pixels: int = option(_ENGINE_DEFAULTS["max_image_pixels"], group=REQUEST_LIMITS, help="refuse "
                                   "images with more pixels (width x height, read from the header before decoding)")
    max_concurrent_decodes: int = option(_ENGINE_DEFAULTS["max_concurrent_decodes"], group=REQUEST_LIMITS,
                                         help="images decoded at once across calls")
    max_encode_samples: int = option(256, group=REQUEST_LIMITS, help="samples in one Encode request; more: "
                                     "RESOURCE_EXHAUSTED")
    max_text_bytes: int = option(64 * 1024, group=REQUEST_LIMITS, help="UTF-8 bytes of one sample's turn text, "
                                 "all turns; more: INVALID_ARGUMENT, checked before tokenizing")
    max_turns: int = option(64, group=REQUEST_LIMITS, help="turns of one sample; more: INVALID_ARGUMENT")
    max_score_items: int = option(4096, group=REQUEST_LIMITS, help="items in one Score request; more: "
                                  "RESOURCE_EXHAUSTED")
    max_score_paths: int = option(8, group=REQUEST_LIMITS, help="distinct paths in one Score request; more: "
                                  "RESOURCE_EXHAUSTED")
    # ---- limits per call and per client --------------------------------------------------------------------------
    call_timeout_s: float = option(600.0, group=CALL_LIMITS, metavar="SECONDS", help="server-side deadline of one "
                                   "call")
    stream_idle_s: float = option(30.0, group=CALL_LIMITS, metavar="SECONDS", help="cancel a stream that moves no "
                                  "frame for this long")
    max_calls: int = option(256, group=CALL_LIMITS, help="TeacherService calls in flight at once; more are "
                            "refused with RESOURCE_EXHAUSTED")
    max_calls_per_client: int = option(64, group=CALL_LIMITS, help="calls in flight per client (a training of R "
                                       "ranks holds up to 2R)")
    max_open_calls: int = option(16, group=CALL_LIMITS, help="health and reflection calls (which need no token) "
                                 "at once; more are refused with RESOURCE_EXHAUSTED")
    max_inflight_mib: int = option(2048, group=CALL_LIMITS, metavar="MIB", help="payload bytes all calls in "
                                   "flight may hold")
    max_connection_idle_s: float = option(600.0, group=CALL_LIMITS, metavar="SECONDS", help="close connections "
                                          "without calls for this long (0 = never)")
    max_connection_age_s: float = option(0.0, group=CALL_LIMITS, metavar="SECONDS", help="close connections "
                                         "older than this, letting calls finish (0 = never)")
    # ---- vLLM backend ---------------------------------------------------------------------------------------------
    tensor_parallel_size: int | None = option(None, group=VLLM, metavar="N", default_text=str(
        VllmOptions.tensor_parallel_size), help="GPUs that split every layer")
    pipeline_parallel_size: int | None = option(None, group=VLLM, metavar="N", default_text=str(
        VllmOptions.pipeline_parallel_size), help="stages that split the layer stack; GPUs used = tensor x pipeline")
    gpu_memory_utilization: float | None = option(None, group=VLLM, metavar="X", default_text=str(
        VllmOptions.gpu_memory_utilization), help="share of each GPU vLLM may take; leave room on GPU 0 for the LM "
        "head and Score's chunks")
    max_model_len: int | None = option(None, group=VLLM, metavar="TOKENS", help="longest sample vLLM accepts, in "
                                       "teacher tokens (default: the checkpoint's limit)")
    distributed_executor_backend: ExecutorBackend | None = option(None, group=VLLM, help="vLLM's executor: mp "
                                                                  "(one node, default on GPUs), ray (several nodes: "
                                                                  "start the Ray cluster first, run the server on "
                                                                  "its head node)")
    max_images_per_sample: int | None = option(None, group=VLLM, metavar="N", default_text=str(
        VllmOptions.max_images_per_sample), help="images one sample may hold; vLLM reserves memory for them")
    # ---- monitoring and logging --------------------------------------------------------------------------------
    metrics_port: int | None = option(None, group=MONITORING, metavar="PORT", help="serve Prometheus metrics at "
                                      "http://METRICS_HOST:PORT/metrics (0 = a free port; default: no metrics)")
    metrics_host: str = option("127.0.0.1", group=MONITORING, help="address of the metrics endpoint")
    log_level: str | None = option(None, group=MONITORING, metavar="LEVEL", help="logging level: DEBUG, INFO, "
                                   "WARNING, ERROR (default: $LOG_LEVEL, else INFO)")

    def __post_init__(self) -> None:
        given = [name for name in VLLM_FIELDS if getattr(self, name) is not None]
        if self.backend != "vllm" and given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags} only apply to --backend vllm")
        if bool(self.tls_cert) != bool(self.tls_key) or (self.tls_client_ca and not self.tls_cert):
            raise ValueError("TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value <= 65535):
                raise ValueError(f"{name} must be a port number 0-65535 (0 = any free port), got {value!r}")
        for name in ("handle_store_gib", "encode_cache_gib", "grace_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.log_level is not None and not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    def engine_config(self) -> EngineConfig:
        """The engine's configuration (validated: a ValueError says what to fix)."""
        vllm = None
        if self.backend == "vllm":
            vllm = VllmOptions(**{name: getattr(self, name) for name in VLLM_FIELDS if getattr(self, name) is not None})
        return EngineConfig(
            model_path=self.model, model_name=self.model_name, revision=self.revision, dtype=self.dtype,
            device_map=None if self.device_map.lower() == "none" else self.device_map,
            max_batch_tokens=self.max_batch_tokens, max_batch_samples=self.max_batch_samples,
            batch_wait_ms=self.batch_wait_ms, handle_store_bytes=int(self.handle_store_gib * GIB),
            handle_store_client_share=self.handle_store_client_share,
            encode_cache_bytes=int(self.encode_cache_gib * GIB), max_request_bytes=self.max_request_mib * MIB,
            chunk_size=self.chunk_size, max_length=self.max_length, max_image_pixels=self.max_image_pixels,
            max_concurrent_decodes=self.max_concurrent_decodes, backend=self.backend, vllm=vllm,
            request_limits=self.request_limits(), image_options=self.image_options,
        )

    def request_limits(self) -> RequestLimits:
        from teacher_server.request_limits import RequestLimits

        return RequestLimits(max_encode_samples=self.max_encode_samples, max_text_bytes=self.max_text_bytes,
                             max_turns=self.max_turns, max_score_items=self.max_score_items,
                             max_score_paths=self.max_score_paths)

    def call_limits(self) -> CallLimits:
        from teacher_server.limits import CallLimits

        return CallLimits(
            call_timeout_s=self.call_timeout_s, stream_idle_s=self.stream_idle_s, max_calls=self.max_calls,
            max_calls_per_client=self.max_calls_per_client, max_open_calls=self.max_open_calls,
            max_inflight_bytes=self.max_inflight_mib * MIB, max_connection_idle_s=self.max_connection_idle_s,
            max_connection_age_s=self.max_connection_age_s,
        )
