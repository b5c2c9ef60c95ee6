"""Which teacher a command talks to, and how: the options ``train`` and ``align`` share (:class:`TeacherOptions`).

Either a teacher service (``--teacher-addr HOST:PORT``, several comma-separated for replicas; a bearer token and TLS
as the service asks) or a teacher checkpoint run in this process (``--teacher-model PATH``: single-machine runs,
tests, benchmarks). Importable without torch (``--help`` answers at once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from genrecal.cli import option

MODEL = "model and teacher"
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


@dataclass(kw_only=True)
class TeacherOptions:
    """The teacher fields of a command's config; :meth:`check_teacher` validates them."""

    teacher_addr: str | None = option(None, group=MODEL, metavar="HOST:PORT", help="the teacher service "
                                      "(teacher_server); several comma-separated: replicas")
    teacher_model: str | None = option(None, group=MODEL, metavar="PATH", help="instead of --teacher-addr: a "
                                       "teacher checkpoint folder loaded in every process (single-machine runs, "
                                       "tests, benchmarks)")
    teacher_token_file: str | None = option(None, group=MODEL, metavar="FILE", help="file holding the bearer "
                                            "token the teacher service gave you (its --auth-token-file); without it "
                                            "$GENRECAL_TEACHER_TOKEN is used, if set")
    teacher_tls_ca: str | None = option(None, group=MODEL, metavar="PEM", help="CA bundle that signed the "
                                        "teacher's TLS certificate: connect over TLS and verify it")
    teacher_timeout_s: float = option(300.0, group=MODEL, help="seconds one teacher call may take, and how long "
                                      "to wait for a restarted teacher to be SERVING again before failing")
    teacher_retries: int = option(5, group=MODEL, help="retries of a call the teacher answers UNAVAILABLE "
                                  "(backoff 0.5 s doubling to 15 s) before waiting for its health check")
    teacher_image_options: dict | None = option(None, group=MODEL, metavar="OPTIONS", help="an in-process "
                                                "teacher's (--teacher-model) image resolution, as --image-options; a "
                                                "teacher service takes its own --image-options (default: the "
                                                "checkpoint's own settings)")

    def check_teacher(self, *, required: str | None, otherwise: str = "") -> None:
        """ValueError for both teachers given, a malformed address, a teacher folder without config.json, a bad timeout
        or retry count, image options for a teacher service or unknown to the teacher's family; and, where
        ``required`` says why one is needed, for neither given (the message ends with ``otherwise``, another way
        out, if given)."""
        if self.teacher_addr is not None and self.teacher_model is not None:
            raise ValueError("give either teacher_addr (a teacher service, HOST:PORT) or teacher_model (a checkpoint "
                             "run in this process), not both")
        if required and self.teacher_addr is None and self.teacher_model is None:
            raise ValueError(f"{required}: pass --teacher-addr HOST:PORT (a running teacher_server) or "
                             f"--teacher-model PATH (an in-process teacher){otherwise}")
        if self.teacher_addr is not None and not all(
            _HOST_PORT.match(part.strip()) for part in self.teacher_addr.split(",")
        ):
            raise ValueError("teacher_addr must be HOST:PORT (e.g. teacher-node:50051 or [::1]:50051), or several "
                             f"separated by commas for teacher replicas, got {self.teacher_addr!r}")
        if self.teacher_model is not None and not (Path(self.teacher_model) / "config.json").is_file():
            raise ValueError(f"teacher_model {self.teacher_model!r} is not a checkpoint folder (no config.json); pass "
                             "the teacher's folder or use --teacher-addr for a teacher service")
        if not self.teacher_timeout_s > 0:
            raise ValueError(f"teacher_timeout_s must be > 0 seconds, got {self.teacher_timeout_s}")
        from genrecal.families.resolution import check_image_options, parse_image_options

        self.teacher_image_options = parse_image_options(self.teacher_image_options)
        if self.teacher_image_options is not None:
            if self.teacher_model is None:
                raise ValueError("teacher_image_options apply to an in-process teacher (--teacher-model); a teacher "
                                 "service sets its own resolution: start it with --image-options")
            # Knob names and types are checked for the teacher's family now; values against its processor at load.
            self.teacher_image_options = check_image_options(self.teacher_model, self.teacher_image_options)
        retries = self.teacher_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise ValueError(f"teacher_retries must be a positive integer, got {retries!r}")
