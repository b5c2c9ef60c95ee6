"""``python -m teacher_server --model PATH [--host 127.0.0.1] [--port 50051] ...``: serve a teacher VLM over gRPC."""

from __future__ import annotations

import argparse
import logging
import os

from teacher_server.config import BACKENDS, EXECUTOR_BACKENDS, GIB, MIB, EngineConfig, VllmOptions
from teacher_server.limits import CallLimits
from teacher_server.request_limits import RequestLimits


def build_parser() -> argparse.ArgumentParser:
    defaults = EngineConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(
        prog="python -m teacher_server",
        description="Serve a frozen teacher VLM for GenRecal: Encode samples, Score Recalibrator outputs with its head.",
    )
    parser.add_argument("--model", required=True, help="teacher checkpoint folder (config.json, *.safetensors, processor)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: localhost only; use 0.0.0.0 to accept remote students)")
    parser.add_argument("--port", type=int, default=50051, help="port to bind (default 50051; 0 = any free port)")
    parser.add_argument("--model-name", help="name reported by Info (default: the checkpoint folder's name)")
    parser.add_argument("--revision", help="revision reported by Info (default: a fingerprint of config, tokenizer and weights)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="compute dtype (default auto: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--device-map", default="auto",
                        help="transformers backend: 'auto' spreads the teacher over all visible GPUs (accelerate, "
                             "one GPU busy at a time); or 'cpu', 'cuda:0'")
    parser.add_argument("--backend", default="transformers", choices=BACKENDS,
                        help="where the teacher body runs: transformers (default) or vllm (tensor/pipeline "
                             "parallel; same API and results; the LM head stays a torch tensor for Score)")
    vllm = parser.add_argument_group("vLLM backend (--backend vllm; see docs/teacher_server.md)")
    options = VllmOptions.__dataclass_fields__
    vllm.add_argument("--tensor-parallel-size", type=int, default=None,
                      help=f"GPUs that split every layer (default {options['tensor_parallel_size'].default})")
    vllm.add_argument("--pipeline-parallel-size", type=int, default=None,
                      help="stages that split the layer stack; GPUs used = tensor x pipeline "
                           f"(default {options['pipeline_parallel_size'].default})")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=None,
                      help="share of each GPU vLLM may take; leave room on GPU 0 for the LM head and Score's "
                           f"chunks (default {options['gpu_memory_utilization'].default})")
    vllm.add_argument("--max-model-len", type=int, default=None,
                      help="longest sample vLLM accepts, in teacher tokens (default: the checkpoint's limit)")
    vllm.add_argument("--distributed-executor-backend", choices=EXECUTOR_BACKENDS, default=None,
                      help="vLLM's executor: mp (one node, default on GPUs), ray (several nodes: start the Ray "
                           "cluster first, run the server on its head node)")
    vllm.add_argument("--max-images-per-sample", type=int, default=None,
                      help="images one sample may hold; vLLM reserves memory for them "
                           f"(default {options['max_images_per_sample'].default})")
    parser.add_argument("--max-batch-tokens", type=int, default=defaults["max_batch_tokens"].default,
                        help="padded batch x length token budget of one teacher forward (default %(default)s)")
    parser.add_argument("--max-batch-samples", type=int, default=defaults["max_batch_samples"].default,
                        help="most samples in one teacher forward, across merged requests (default %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=defaults["batch_wait_ms"].default,
                        help="how long to wait for other students' requests to batch with (default %(default)s ms)")
    parser.add_argument("--handle-store-gib", type=float, default=defaults["handle_store_bytes"].default / GIB,
                        help="memory for kept teacher states between Encode and Score; oldest evicted (default %(default)s GiB)")
    parser.add_argument("--encode-cache-gib", type=float, default=defaults["encode_cache_bytes"].default / GIB,
                        help="memory for Encode results kept by sample content, so that students training on the "
                             "same data share the teacher's forwards; oldest evicted; 0 = off (default %(default)s GiB)")
    parser.add_argument("--max-request-mib", type=int, default=defaults["max_request_bytes"].default // MIB,
                        help="largest Score payload accepted (default %(default)s MiB)")
    parser.add_argument("--chunk-size", type=int, default=defaults["chunk_size"].default,
                        help="tokens per head-scoring chunk; memory ~ 12 B x chunk x vocab (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=0,
                        help="refuse samples longer than this many teacher tokens (default 0: no limit)")
    parser.add_argument("--handle-store-client-share", type=float,
                        default=defaults["handle_store_client_share"].default,
                        help="most of the handle store one client may hold, as a fraction (default %(default)s; "
                             "when the store is full the client holding the most loses its oldest handles)")
    parser.add_argument("--max-image-pixels", type=int, default=defaults["max_image_pixels"].default,
                        help="refuse images with more pixels (width x height, read from the header before "
                             "decoding) (default %(default)s)")
    parser.add_argument("--max-concurrent-decodes", type=int, default=defaults["max_concurrent_decodes"].default,
                        help="images decoded at once across calls (default %(default)s)")
    parser.add_argument("--image-options",
                        help="the teacher's image resolution in its family's own processor knobs, 'KNOB=VALUE,...' "
                             "or a JSON object, e.g. 'max_pixels=802816,min_pixels=3136' (Qwen2-VL), "
                             "'max_patches=6' (InternVL); an unknown knob is refused with the family's list; Info "
                             "reports the values (docs/teacher_server.md, 'Image resolution') (default: the "
                             "checkpoint's own settings)")

    security = parser.add_argument_group("authentication and TLS")
    security.add_argument("--auth-token-file",
                          help="file of 'CLIENT_NAME TOKEN' lines; every call then needs 'authorization: Bearer "
                               "TOKEN' metadata (re-read on SIGHUP). Without it only localhost may be bound")
    security.add_argument("--allow-unauthenticated", action="store_true",
                          help="serve a non-localhost --host without --auth-token-file (behind a firewall only)")
    security.add_argument("--tls-cert", help="PEM certificate chain of the server (TLS); needs --tls-key")
    security.add_argument("--tls-key", help="PEM private key of the server")
    security.add_argument("--tls-client-ca",
                          help="PEM CA bundle: clients must present a certificate signed by it (mTLS)")

    request_limits = parser.add_argument_group("limits per request (reported by Info; docs/teacher_server.md)")
    request_defaults = RequestLimits()
    request_limits.add_argument("--max-encode-samples", type=int, default=request_defaults.max_encode_samples,
                                help="samples in one Encode request; more: RESOURCE_EXHAUSTED (default %(default)s)")
    request_limits.add_argument("--max-text-bytes", type=int, default=request_defaults.max_text_bytes,
                                help="UTF-8 bytes of one sample's turn text, all turns; more: INVALID_ARGUMENT, "
                                     "checked before tokenizing (default %(default)s)")
    request_limits.add_argument("--max-turns", type=int, default=request_defaults.max_turns,
                                help="turns of one sample; more: INVALID_ARGUMENT (default %(default)s)")
    request_limits.add_argument("--max-score-items", type=int, default=request_defaults.max_score_items,
                                help="items in one Score request; more: RESOURCE_EXHAUSTED (default %(default)s)")
    request_limits.add_argument("--max-score-paths", type=int, default=request_defaults.max_score_paths,
                                help="distinct paths in one Score request; more: RESOURCE_EXHAUSTED "
                                     "(default %(default)s)")
    call_limits = parser.add_argument_group("limits per call and per client")
    limit_defaults = CallLimits()
    call_limits.add_argument("--call-timeout-s", type=float, default=limit_defaults.call_timeout_s,
                             help="server-side deadline of one call (default %(default)s s)")
    call_limits.add_argument("--stream-idle-s", type=float, default=limit_defaults.stream_idle_s,
                             help="cancel a stream that moves no frame for this long (default %(default)s s)")
    call_limits.add_argument("--max-calls", type=int, default=limit_defaults.max_calls,
                             help="TeacherService calls in flight at once; more are refused with RESOURCE_EXHAUSTED "
                                  "(default %(default)s)")
    call_limits.add_argument("--max-calls-per-client", type=int, default=limit_defaults.max_calls_per_client,
                             help="calls in flight per client (default %(default)s)")
    call_limits.add_argument("--max-open-calls", type=int, default=limit_defaults.max_open_calls,
                             help="health and reflection calls (which need no token) at once; more are refused "
                                  "with RESOURCE_EXHAUSTED (default %(default)s)")
    call_limits.add_argument("--max-inflight-mib", type=int, default=limit_defaults.max_inflight_bytes // MIB,
                             help="payload bytes all calls in flight may hold (default %(default)s MiB)")
    call_limits.add_argument("--max-connection-idle-s", type=float, default=limit_defaults.max_connection_idle_s,
                             help="close connections without calls for this long (0 = never; default %(default)s s)")
    call_limits.add_argument("--max-connection-age-s", type=float, default=limit_defaults.max_connection_age_s,
                             help="close connections older than this, letting calls finish (0 = never; default "
                                  "%(default)s)")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (0 = a free port)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default %(default)s)")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="on SIGTERM, how long in-flight calls may finish (default %(default)s s)")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="logging level (default INFO)")
    return parser


VLLM_FLAGS = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "max_model_len",
              "distributed_executor_backend", "max_images_per_sample")


def vllm_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> VllmOptions | None:
    """The vLLM flags that were given, as options (None for the transformers backend, which refuses them)."""
    given = {name: getattr(args, name) for name in VLLM_FLAGS if getattr(args, name) is not None}
    if args.backend != "vllm":
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            parser.error(f"{flags} only apply to --backend vllm")
        return None
    try:
        return VllmOptions(**given)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    vllm = vllm_options(args, parser)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from teacher_server.auth import TokenAuth
    from teacher_server.server import TlsFiles, serve

    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        parser.error("TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)")
    device_map = None if args.device_map in ("none", "None") else args.device_map
    try:
        config = EngineConfig(
            model_path=args.model, model_name=args.model_name, revision=args.revision, dtype=args.dtype,
            device_map=device_map, max_batch_tokens=args.max_batch_tokens, max_batch_samples=args.max_batch_samples,
            batch_wait_ms=args.batch_wait_ms, handle_store_bytes=int(args.handle_store_gib * GIB),
            handle_store_client_share=args.handle_store_client_share,
            max_request_bytes=args.max_request_mib * MIB, chunk_size=args.chunk_size, max_length=args.max_length,
            max_image_pixels=args.max_image_pixels, max_concurrent_decodes=args.max_concurrent_decodes,
            encode_cache_bytes=int(args.encode_cache_gib * GIB), backend=args.backend, vllm=vllm,
            image_options=args.image_options,
            request_limits=RequestLimits(
                max_encode_samples=args.max_encode_samples, max_text_bytes=args.max_text_bytes,
                max_turns=args.max_turns, max_score_items=args.max_score_items,
                max_score_paths=args.max_score_paths),
        )
        limits = CallLimits(
            call_timeout_s=args.call_timeout_s, stream_idle_s=args.stream_idle_s, max_calls=args.max_calls,
            max_calls_per_client=args.max_calls_per_client, max_open_calls=args.max_open_calls,
            max_inflight_bytes=args.max_inflight_mib * MIB,
            max_connection_idle_s=args.max_connection_idle_s, max_connection_age_s=args.max_connection_age_s,
        )
        auth = TokenAuth(args.auth_token_file) if args.auth_token_file else None
    except ValueError as exc:
        parser.error(str(exc))
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    logging.getLogger("teacher_server").info("config: %s", config.to_dict())
    try:
        serve(config, host=args.host, port=args.port, grace_s=args.grace_s, limits=limits, auth=auth, tls=tls,
              allow_unauthenticated=args.allow_unauthenticated, metrics_port=args.metrics_port,
              metrics_host=args.metrics_host)
    except ValueError as exc:  # refused configuration (e.g. a public address without authentication)
        parser.exit(2, f"teacher_server: error: {exc}\n")


if __name__ == "__main__":
    main()
