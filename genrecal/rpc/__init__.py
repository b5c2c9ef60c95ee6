"""Generated protobuf / gRPC modules of the teacher service (``protos/genrecal/teacher/v1/teacher.proto``).

    from genrecal.rpc import pb2, pb2_grpc

Do not edit ``teacher_pb2*.py*`` by hand: change the proto and run ``python -m genrecal.rpc.generate``.
The two aliases are imported on first use (PEP 562), so the generator runs even when the committed modules are
missing or do not import (e.g. after a proto change, or with a grpcio older than the stubs require).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genrecal.rpc import teacher_pb2 as pb2
    from genrecal.rpc import teacher_pb2_grpc as pb2_grpc

__all__ = ["pb2", "pb2_grpc"]

_ALIASES = {"pb2": "genrecal.rpc.teacher_pb2", "pb2_grpc": "genrecal.rpc.teacher_pb2_grpc"}


def __getattr__(name: str):
    if name in _ALIASES:
        module = importlib.import_module(_ALIASES[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
