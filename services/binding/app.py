"""Wires the binding service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

from binding.servicer import BindingServiceServicer
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect_core.server import Runtime, ServiceParts, ServiceRegistration

FULL_NAME = binding_pb2.DESCRIPTOR.services_by_name["BindingService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    servicer = BindingServiceServicer()  # type: ignore[abstract]
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, binding_pb2_grpc.add_BindingServiceServicer_to_server),
        ]
    )
