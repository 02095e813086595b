"""Wires the allocation service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

from allocation.servicer import AllocationServiceServicer
from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect_core.server import Runtime, ServiceParts, ServiceRegistration

FULL_NAME = allocation_pb2.DESCRIPTOR.services_by_name["AllocationService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    servicer = AllocationServiceServicer()  # type: ignore[abstract]
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, allocation_pb2_grpc.add_AllocationServiceServicer_to_server),
        ]
    )
