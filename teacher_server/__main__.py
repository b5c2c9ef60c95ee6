"""``python -m teacher_server --model PATH [--host 127.0.0.1] [--port 50051] ...``: serve a teacher VLM over gRPC."""

from __future__ import annotations

import argparse
import logging
import os

from teacher_server.config import GIB, MIB, EngineConfig


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
                        help="'auto' spreads the teacher over all visible GPUs (accelerate); or 'cpu', 'cuda:0'")
    parser.add_argument("--max-batch-tokens", type=int, default=defaults["max_batch_tokens"].default,
                        help="padded batch x length token budget of one teacher forward (default %(default)s)")
    parser.add_argument("--max-batch-samples", type=int, default=defaults["max_batch_samples"].default,
                        help="most samples in one teacher forward, across merged requests (default %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=defaults["batch_wait_ms"].default,
                        help="how long to wait for other students' requests to batch with (default %(default)s ms)")
    parser.add_argument("--handle-store-gib", type=float, default=defaults["handle_store_bytes"].default / GIB,
                        help="memory for kept teacher states between Encode and Score; oldest evicted (default %(default)s GiB)")
    parser.add_argument("--max-request-mib", type=int, default=defaults["max_request_bytes"].default // MIB,
                        help="largest Score payload accepted (default %(default)s MiB)")
    parser.add_argument("--chunk-size", type=int, default=defaults["chunk_size"].default,
                        help="tokens per head-scoring chunk; memory ~ 12 B x chunk x vocab (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=0,
                        help="refuse samples longer than this many teacher tokens (default 0: no limit)")
    parser.add_argument("--max-workers", type=int, default=16, help="gRPC worker threads (default %(default)s)")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="on SIGTERM, how long in-flight calls may finish (default %(default)s s)")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="logging level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from teacher_server.server import serve

    device_map = None if args.device_map in ("none", "None") else args.device_map
    config = EngineConfig(
        model_path=args.model, model_name=args.model_name, revision=args.revision, dtype=args.dtype,
        device_map=device_map, max_batch_tokens=args.max_batch_tokens, max_batch_samples=args.max_batch_samples,
        batch_wait_ms=args.batch_wait_ms, handle_store_bytes=int(args.handle_store_gib * GIB),
        max_request_bytes=args.max_request_mib * MIB, chunk_size=args.chunk_size, max_length=args.max_length,
    )
    logging.getLogger("teacher_server").info("config: %s", config.to_dict())
    serve(config, host=args.host, port=args.port, grace_s=args.grace_s, max_workers=args.max_workers)


if __name__ == "__main__":
    main()
