"""The CdrService servicer: business RPCs answer UNIMPLEMENTED until the cdr issue lands."""

from __future__ import annotations

from numprotect.cdr.v1 import cdr_pb2_grpc


class CdrServiceServicer(cdr_pb2_grpc.CdrServiceServicer):
    """Inherits UNIMPLEMENTED answers for every RPC from the generated base."""
