"""The teacher service's exception types, and the one place that maps exceptions to gRPC status codes.

The engine raises these (and lets ``SampleError`` / ``ValueError`` from the core library through); the
servicer calls :func:`status_for` and aborts the RPC with the code it names. Status codes are returned as
their ``grpc.StatusCode`` member names (``"INVALID_ARGUMENT"``, ...) so this module needs no gRPC import:
``getattr(grpc.StatusCode, name)`` gives the enum.

Only bugs become ``INTERNAL``; the caller logs their traceback (:func:`status_for` returns a generic message
so that internals do not leak to clients).
"""

from __future__ import annotations

import torch


class InvalidRequest(ValueError):
    """The request is malformed (wrong shape, dtype, NaN, unknown path, ...). Maps to INVALID_ARGUMENT."""


class HandleNotFound(KeyError):
    """A Score or Release named a handle the server does not hold. Maps to NOT_FOUND."""

    def __init__(self, handle: str, detail: str = ""):
        self.handle = handle
        shown = handle if len(handle) <= 64 else f"{handle[:64]}...<{len(handle)} characters>"
        self.message = (
            f"handle {shown!r} is unknown: it was never issued by this server, was released, or was evicted "
            "from the handle store (oldest first, when the store is full); re-Encode the sample to get a new "
            "handle" + (f" ({detail})" if detail else "")
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class ResourceExhausted(RuntimeError):
    """The request is too large for a server limit (token budget, request bytes). Maps to RESOURCE_EXHAUSTED."""


class SampleTooLarge(ResourceExhausted):
    """One sample alone exceeds a server budget (it cannot be split): RESOURCE_EXHAUSTED naming the sample, whose id
    the refusal's trailer carries like an INVALID_ARGUMENT sample's (a trainer skips that record)."""

    def __init__(self, sample_id: str, reason: str):
        self.sample_id, self.reason = sample_id, reason
        super().__init__(f"sample {sample_id!r}: {reason}")


class IdentityMismatch(RuntimeError):
    """The client expects another teacher (model, revision, tokenizer). Maps to FAILED_PRECONDITION."""


class ShuttingDown(RuntimeError):
    """The engine is closing or closed; retry on another replica. Maps to UNAVAILABLE."""


class Unauthenticated(RuntimeError):
    """No token, or an unknown one. Maps to UNAUTHENTICATED."""


class Cancelled(RuntimeError):
    """The caller is gone (it cancelled, disconnected, or the server cut its call): its work was dropped.
    Maps to CANCELLED (nobody is left to read it)."""


class DeadlineExceeded(RuntimeError):
    """The call ran past the server's own deadline (--call-timeout-s). Maps to DEADLINE_EXCEEDED."""


INTERNAL_MESSAGE = "internal error in the teacher server; its log has the traceback"
MAX_MESSAGE_CHARS = 2000  # gRPC carries the message in a trailer (16 KiB of metadata in all): stay well below


def status_for(exc: BaseException) -> tuple[str, str]:
    """(gRPC status code name, message for the client) for an exception raised while serving a request.

    ``("INTERNAL", generic message)`` for anything unexpected: that is a bug, and the caller logs it with its
    traceback. The message is cut to ``MAX_MESSAGE_CHARS``.
    """
    code, message = _status_for(exc)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "...(cut)"
    return code, message


def _status_for(exc: BaseException) -> tuple[str, str]:
    # Order matters: PayloadTooLarge is a ValueError and OutOfMemoryError a RuntimeError.
    if isinstance(exc, _resource_exhausted_types()):
        if isinstance(exc, torch.OutOfMemoryError):
            return "RESOURCE_EXHAUSTED", (
                "the teacher ran out of device memory on this request; send fewer or shorter samples "
                f"(or fewer score items) per request ({_first_line(exc)})"
            )
        return "RESOURCE_EXHAUSTED", str(exc)
    if isinstance(exc, HandleNotFound):
        return "NOT_FOUND", str(exc)
    if isinstance(exc, IdentityMismatch):
        return "FAILED_PRECONDITION", str(exc)
    if isinstance(exc, ShuttingDown):
        return "UNAVAILABLE", str(exc)
    if isinstance(exc, Unauthenticated):
        return "UNAUTHENTICATED", str(exc)
    if isinstance(exc, DeadlineExceeded):
        return "DEADLINE_EXCEEDED", str(exc)
    if isinstance(exc, Cancelled):
        return "CANCELLED", str(exc)
    if isinstance(exc, ValueError):  # InvalidRequest, SampleError, and ValueErrors from the core library
        return "INVALID_ARGUMENT", str(exc)
    return "INTERNAL", INTERNAL_MESSAGE


def _resource_exhausted_types() -> tuple[type[BaseException], ...]:
    types: tuple[type[BaseException], ...] = (ResourceExhausted, torch.OutOfMemoryError)
    try:  # the wire format lives in the core package; tolerate its absence (e.g. during a partial checkout)
        from genrecal.wire import PayloadTooLarge
    except ImportError:
        return types
    return (*types, PayloadTooLarge)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
