"""The AllocationService servicer: business RPCs answer UNIMPLEMENTED until the allocation issue lands."""

from __future__ import annotations

from numprotect.allocation.v1 import allocation_pb2_grpc


class AllocationServiceServicer(allocation_pb2_grpc.AllocationServiceServicer):
    """Inherits UNIMPLEMENTED answers for every RPC from the generated base."""
