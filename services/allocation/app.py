"""Wires the allocation service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

from allocation.pools import NumberPools
from allocation.scripts import Scripts
from allocation.servicer import AllocationServiceServicer
from allocation.settings import AllocationSettings
from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect_core.server import Runtime, ServiceParts, ServiceRegistration

FULL_NAME = allocation_pb2.DESCRIPTOR.services_by_name["AllocationService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    settings = AllocationSettings.from_env(runtime.env)  # SettingsError before the server starts
    pools = NumberPools(runtime.redis, settings, Scripts.load())
    servicer = AllocationServiceServicer(pools, settings)
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, allocation_pb2_grpc.add_AllocationServiceServicer_to_server),
        ]
    )
