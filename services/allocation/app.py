"""Wires the allocation service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

from allocation.pools import NumberPools
from allocation.scripts import Scripts
from allocation.servicer import AllocationServiceServicer
from allocation.settings import AllocationSettings
from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect_core.server import Runtime, ServiceParts, ServiceRegistration
from numprotect_core.settings import RedisSettings

FULL_NAME = allocation_pb2.DESCRIPTOR.services_by_name["AllocationService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    settings = AllocationSettings.from_env(runtime.env)  # SettingsError before the server starts
    # One connection stays free for the health probe.
    max_in_flight = max(1, RedisSettings.from_env(runtime.env).max_connections - 1)
    pools = NumberPools(runtime.redis, settings, Scripts.load(), max_in_flight=max_in_flight)
    servicer = AllocationServiceServicer(pools, settings)
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, allocation_pb2_grpc.add_AllocationServiceServicer_to_server),
        ]
    )
