"""Wires the binding service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

from binding.allocation_client import AllocationClient
from binding.servicer import BindingServiceServicer
from binding.settings import BindingSettings
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect_core.server import Runtime, ServiceParts, ServiceRegistration

FULL_NAME = binding_pb2.DESCRIPTOR.services_by_name["BindingService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    settings = BindingSettings.from_env(runtime.env)
    allocation = AllocationClient(runtime.channel("allocation"), settings.allocation_timeout_seconds)
    servicer = BindingServiceServicer(runtime.redis, allocation, settings)
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, binding_pb2_grpc.add_BindingServiceServicer_to_server),
        ]
    )
