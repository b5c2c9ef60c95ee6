"""Container health check for the teacher server: asks the standard gRPC health service (grpc.health.v1).

Exit status 0 only when every asked service reports SERVING; 1 otherwise (not serving, unknown service, no
server, timeout, grpc_health missing). Docker reads 0 as healthy and 1 as unhealthy (2 is reserved), and keeps
the printed line in `docker inspect` as the reason.

    python healthcheck.py [ADDRESS] [--service NAME ...] [--timeout SECONDS]
                          [--tls-ca PEM [--tls-server-name NAME] [--tls-cert PEM --tls-key PEM]]

ADDRESS defaults to $TEACHER_HEALTH_ADDRESS, else 127.0.0.1:50051. Without --service it asks about the
overall server (service name ""), which the teacher server reports SERVING once its model is loaded; pass
`--service genrecal.teacher.v1.TeacherService` to ask about the teacher service by name. The health service
needs no token. A server started with --tls-cert needs --tls-ca (and --tls-server-name when its certificate
does not name 127.0.0.1, e.g. `--tls-server-name teacher.example.org`); with --tls-client-ca (mTLS) also a
client certificate, --tls-cert/--tls-key.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_ADDRESS = "127.0.0.1:50051"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="gRPC health check (grpc.health.v1) for the teacher server.")
    parser.add_argument(
        "address",
        nargs="?",
        default=os.environ.get("TEACHER_HEALTH_ADDRESS") or DEFAULT_ADDRESS,
        help="host:port of the server (default: $TEACHER_HEALTH_ADDRESS or %(default)s)",
    )
    parser.add_argument(
        "--service",
        action="append",
        default=None,
        help='service name to check; repeatable (default: "" = the whole server)',
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per health call (default: %(default)s)"
    )
    parser.add_argument("--tls-ca", help="PEM CA of the server's certificate: connect over TLS")
    parser.add_argument("--tls-server-name", help="name to verify the server's certificate against")
    parser.add_argument("--tls-cert", help="PEM client certificate (servers requiring mTLS)")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    return parser.parse_args(argv)


def check(address: str, services: list[str], timeout: float, tls: dict | None = None) -> tuple[bool, str]:
    """(healthy, one line for the log): healthy only when every service answers SERVING.

    ``tls``: ``{"ca", "server_name", "cert", "key"}`` file paths / name (None values allowed) for a TLS server.
    """
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as exc:  # the image installs grpcio-health-checking; say so plainly if it does not
        return False, f"cannot import grpc health stubs ({exc}); install grpcio-health-checking"

    serving = health_pb2.HealthCheckResponse.SERVING
    if tls and tls.get("ca"):
        try:
            def read(key):
                return open(tls[key], "rb").read() if tls.get(key) else None

            credentials = grpc.ssl_channel_credentials(read("ca"), read("key"), read("cert"))
        except OSError as exc:
            return False, f"cannot read a TLS file: {exc}"
        options = [("grpc.ssl_target_name_override", tls["server_name"])] if tls.get("server_name") else None
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            label = repr(service) if service else "'' (server)"
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                name = code.name if code is not None else type(exc).__name__
                return (
                    False,
                    f"{address} {label}: {name}: {exc.details() if hasattr(exc, 'details') else exc}",
                )
            if response.status != serving:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                return False, f"{address} {label}: {status}"
    return True, f"{address}: SERVING ({', '.join(repr(s) for s in services)})"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage; Docker reserves 2, so report unhealthy (1)
        return 0 if exc.code in (0, None) else 1
    if not args.timeout > 0:
        print(f"--timeout must be > 0, got {args.timeout}", file=sys.stderr)
        return 1
    tls = {"ca": args.tls_ca, "server_name": args.tls_server_name, "cert": args.tls_cert, "key": args.tls_key}
    healthy, message = check(args.address, args.service if args.service is not None else [""], args.timeout, tls)
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
