"""Start the real teacher server (`python -m teacher_server`) as a subprocess and wait until it is ready.

It listens on a free localhost port by default, or on a fixed one (``port=``) so that a restarted server answers
at the same address. Used by the demo, the benchmarks and the end-to-end tests.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"teacher server ready on ([\d.]+):(\d+)(?: metrics (\d+))?")


def free_port() -> int:
    """A localhost port nobody listens on right now (for a server that must come back at the same address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeacherProcess:
    """``python -m teacher_server --model MODEL *extra`` in a subprocess; ``python`` picks the interpreter (e.g. the
    vLLM venv's, whose packages cannot share the main venv: see .ci/vllm-venv); default: this one."""

    def __init__(self, model: str | Path, *extra: str, timeout_s: float = 600.0, port: int = 0,
                 python: str | Path | None = None):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [str(python or sys.executable), "-m", "teacher_server", "--model", str(model), "--port", str(port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: list[str] = []
        self.address: str | None = None
        self.metrics_port: int | None = None
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                match = READY.search(line)
                if match:
                    self.address = f"{match.group(1)}:{match.group(2)}"
                    self.metrics_port = int(match.group(3)) if match.group(3) else None
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.2):
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError("teacher server did not become ready:\n" + self.log)
        if self.address is None:
            raise RuntimeError(f"teacher server exited with {self.proc.wait()}:\n{self.log}")

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout_s: float = 60.0) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
