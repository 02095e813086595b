"""Wires the allocation service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.core.server import Runtime, ServiceParts, ServiceRegistration
from numprotect.core.settings import RedisSettings
from numprotect.services.allocation.pools import NumberPools
from numprotect.services.allocation.scripts import Scripts
from numprotect.services.allocation.servicer import AllocationServiceServicer
from numprotect.services.allocation.settings import AllocationSettings

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
