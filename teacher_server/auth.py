"""Who is calling: bearer tokens from ``--auth-token-file``, else the TLS client certificate, else the peer.

The token file has one client per line, ``CLIENT_NAME TOKEN`` (blank lines and ``#`` comments ignored). Every
TeacherService call must then carry ``authorization: Bearer TOKEN`` metadata; a missing or unknown token is
UNAUTHENTICATED (the health service needs none, so orchestrators can probe it). Tokens are compared with
``hmac.compare_digest`` against every entry (no early exit), so the time taken does not reveal how much of a
guess was right. ``reload()`` re-reads the file (the server calls it on SIGHUP); a file that does not parse
keeps the previous tokens and logs why.

The client's name owns its handles and counts against the per-client limits. Tokens are checked when a call's
headers arrive (``teacher_server.admission``), before its request is read. Without a token file the client is
the client certificate's common name under mTLS, else the peer's IP address (``ipv4:10.0.0.5``, without the
port: all connections from one machine are one client).
"""

from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path

from teacher_server.errors import Unauthenticated

logger = logging.getLogger(__name__)

AUTHORIZATION_METADATA = "authorization"
MAX_NAME_BYTES = 256


def parse_token_file(text: str, *, source: str = "token file") -> list[tuple[str, bytes]]:
    """``CLIENT_NAME TOKEN`` lines -> [(name, token bytes)]; ValueError naming the line for a malformed one."""
    entries, names, tokens = [], set(), set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source} line {number}: expected 'CLIENT_NAME TOKEN', got {len(parts)} fields")
        name, token = parts
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"{source} line {number}: client name longer than {MAX_NAME_BYTES} bytes")
        if len(token) < 16:
            raise ValueError(f"{source} line {number}: token of client {name!r} is shorter than 16 characters; "
                             "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if name in names:
            raise ValueError(f"{source} line {number}: client {name!r} appears twice")
        if token in tokens:
            raise ValueError(f"{source} line {number}: client {name!r} reuses another client's token")
        names.add(name)
        tokens.add(token)
        entries.append((name, token.encode()))
    if not entries:
        raise ValueError(f"{source} lists no clients; add lines 'CLIENT_NAME TOKEN'")
    return entries


class TokenAuth:
    """The clients of ``--auth-token-file``; thread-safe, re-readable."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries = self._read()

    def _read(self) -> list[tuple[str, bytes]]:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the auth token file {str(self.path)!r}: {exc}") from exc
        return parse_token_file(text, source=f"auth token file {str(self.path)!r}")

    def reload(self) -> bool:
        """Re-read the file; on a problem keep the current tokens. True if the new tokens are in use."""
        try:
            entries = self._read()
        except ValueError as exc:
            logger.error("keeping the previous tokens: %s", exc)
            return False
        with self._lock:
            self._entries = entries
        logger.info("re-read %s: %d clients", self.path, len(entries))
        return True

    @property
    def clients(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self._entries]

    def client_for(self, metadata: dict[str, str]) -> str:
        """The client name whose token the call carries; Unauthenticated otherwise."""
        value = metadata.get(AUTHORIZATION_METADATA)
        if value is None:
            raise Unauthenticated("this teacher requires 'authorization: Bearer TOKEN' metadata; pass the client "
                                  "its token (--teacher-token-file or GENRECAL_TEACHER_TOKEN)")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization metadata must be 'Bearer TOKEN'")
        given = token.strip().encode()
        with self._lock:
            entries = self._entries
        found = None
        for name, expected in entries:  # every entry, no early exit
            if hmac.compare_digest(given, expected) and found is None:
                found = name
        if found is None:
            raise Unauthenticated("unknown token; ask the teacher's operator for yours")
        return found

