"""``genrecal-teacher`` (or ``python -m teacher_server``) ``--model PATH [--config FILE] [...]``: serve a teacher VLM
over gRPC.

The flags are generated from :class:`teacher_server.config.ServeConfig` (:mod:`genrecal.cli`): defaults <
``--config FILE`` (YAML or JSON) < flags. Nothing here imports torch before the arguments are parsed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DESCRIPTION = ("Serve a frozen teacher VLM for GenRecal: Encode samples, Score Recalibrator outputs with its head. "
               "Precedence: option defaults < --config FILE < flags.")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from genrecal.cli import USAGE, add_arguments, program_name
    from teacher_server.config import ServeConfig

    parser = argparse.ArgumentParser(prog=prog or program_name("python -m teacher_server"), usage=USAGE, description=DESCRIPTION)
    add_arguments(parser, ServeConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, serve until SIGTERM / SIGINT; returns the exit status (2: a refused configuration)."""
    from genrecal.cli import config_from_args
    from teacher_server.config import ServeConfig

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = config_from_args(ServeConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    level = (options.log_level or os.environ.get("LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from teacher_server.auth import TokenAuth
    from teacher_server.server import TlsFiles, serve

    try:
        config = options.engine_config()
        limits = options.call_limits()
        auth = TokenAuth(options.auth_token_file) if options.auth_token_file else None
    except ValueError as exc:
        parser.error(str(exc))
    tls = TlsFiles(options.tls_cert, options.tls_key, options.tls_client_ca) if options.tls_cert else None
    logging.getLogger("teacher_server").info("config: %s", config.to_dict())
    try:
        serve(config, host=options.host, port=options.port, grace_s=options.grace_s, limits=limits, auth=auth,
              tls=tls, allow_unauthenticated=options.allow_unauthenticated, metrics_port=options.metrics_port,
              metrics_host=options.metrics_host)
    except ValueError as exc:  # refused configuration (e.g. a public address without authentication)
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
