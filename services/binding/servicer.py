"""The BindingService servicer: business RPCs answer UNIMPLEMENTED until the binding issue lands."""

from __future__ import annotations

from numprotect.binding.v1 import binding_pb2_grpc


class BindingServiceServicer(binding_pb2_grpc.BindingServiceServicer):
    """Inherits UNIMPLEMENTED answers for every RPC from the generated base."""
