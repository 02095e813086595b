"""Wires the binding service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.core.server import Runtime, ServiceParts, ServiceRegistration
from numprotect.core.settings import RedisSettings
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.servicer import BindingServiceServicer
from numprotect.services.binding.settings import BindingSettings

FULL_NAME = binding_pb2.DESCRIPTOR.services_by_name["BindingService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    settings = BindingSettings.from_env(runtime.env)
    allocation = AllocationClient(runtime.channel("allocation"), settings.allocation_timeout_seconds)
    # A call uses at most 3 Redis connections at once (a create's concurrent writes); the pool does not queue
    # (an exhausted pool fails the command), so calls beyond what it can serve wait here. One stays for health.
    max_calls = max(1, (RedisSettings.from_env(runtime.env).max_connections - 1) // 3)
    servicer = BindingServiceServicer(runtime.redis, allocation, settings, max_calls=max_calls)
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, binding_pb2_grpc.add_BindingServiceServicer_to_server),
        ]
    )
