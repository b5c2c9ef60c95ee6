"""Errors that carry enough context for a user to fix their input.

The teacher service maps these to gRPC status codes in one place (``teacher_server``); everything else treats
them as ordinary ``ValueError``s.
"""

from __future__ import annotations


class SampleError(ValueError):
    """A training sample cannot be used as given (empty or truncated answer, bad image, malformed turns)."""

    def __init__(self, sample_id: str, reason: str):
        self.sample_id = sample_id
        self.reason = reason
        super().__init__(f"sample {sample_id!r}: {reason}")


class UnsupportedArchitectureError(ValueError):
    """A checkpoint's ``config.architectures`` names no registered model family."""
