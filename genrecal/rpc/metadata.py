"""The teacher service's names and call metadata keys, shared by the client and the server (one place).

Metadata keys are lower-case ASCII, as gRPC requires.
"""

from __future__ import annotations

from genrecal.rpc import pb2

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["TeacherService"].full_name  # "genrecal.teacher.v1.TeacherService"
# Request: the model revision the client was started with; a server with another revision refuses the call.
EXPECT_REVISION_METADATA = "x-genrecal-expect-revision"
# Trailer of an INVALID_ARGUMENT Encode: the id of the sample the teacher cannot use (too long, forbidden text,
# a bad image, ...), so that a trainer can skip that record and go on instead of stopping.
REFUSED_SAMPLE_METADATA = "x-genrecal-refused-sample-bin"  # UTF-8 bytes ("-bin": ids need not be ASCII)
