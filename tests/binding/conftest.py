"""Fixtures of the binding tests: the real allocation and binding services in-process on a real Redis, and the
parts the binding service's domain objects are built from (to test them with faults injected at one step)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2_grpc
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.allocation.app import build as build_allocation
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.app import build as build_binding
from numprotect.services.binding.settings import BindingSettings
from numprotect.services.binding.store import BindingStore
from support.inprocess import running_service
from support.tls import secure_channel

if TYPE_CHECKING:
    from numprotect.allocation.v1.allocation_pb2_grpc import AllocationServiceAsyncStub
    from numprotect.binding.v1.binding_pb2_grpc import BindingServiceAsyncStub

TENANT = "t1"
OTHER_TENANT = "t2"
BLOCK = "70010000000"
OTHER_BLOCK = "70010000001"
CITY = "010"


@dataclass
class Services:
    binding: BindingServiceAsyncStub
    allocation: AllocationServiceAsyncStub
    binding_address: str
    allocation_address: str


ServicesFactory = Callable[..., AbstractAsyncContextManager[Services]]


@pytest.fixture
def services(redis_env: dict[str, str]) -> ServicesFactory:
    """`async with services(NUMPROTECT_BINDING_MIN_TTL="1s") as s:` allocation + binding served, one block imported
    for TENANT (and one for OTHER_TENANT) in CITY."""

    @asynccontextmanager
    async def start(**settings: str) -> AsyncIterator[Services]:
        async with running_service("allocation", build_allocation, {**redis_env, **settings}) as alloc:
            allocation: Any = allocation_pb2_grpc.AllocationServiceStub(alloc.channel)
            for block, tenant in ((BLOCK, TENANT), (OTHER_BLOCK, OTHER_TENANT)):
                await allocation.ImportBlock(
                    allocation_pb2.ImportBlockRequest(block=block, tenant_id=tenant, city_code=CITY, actor="test")
                )
            environ = {**redis_env, "NUMPROTECT_ALLOCATION_ADDR": alloc.address, **settings}
            async with running_service("binding", build_binding, environ) as svc:
                binding: Any = binding_pb2_grpc.BindingServiceStub(svc.channel)
                yield Services(binding, allocation, svc.address, alloc.address)

    return start


@dataclass
class DomainParts:
    """A Redis client, the binding store over it, settings, and a channel to the allocation service under test."""

    redis: RedisClient
    store: BindingStore
    settings: BindingSettings
    allocation_channel: grpc.aio.Channel

    def allocation(self) -> AllocationClient:
        return AllocationClient(self.allocation_channel, self.settings.allocation_timeout_seconds)


DomainPartsFactory = Callable[[Services], AbstractAsyncContextManager[DomainParts]]


@pytest.fixture
def domain_parts(redis_env: dict[str, str]) -> DomainPartsFactory:
    """`async with domain_parts(s) as d:` the parts to build BindingCreator, BindingReads, BindingUpdater from,
    against the Redis and the allocation service of `s`."""

    @asynccontextmanager
    async def start(s: Services) -> AsyncIterator[DomainParts]:
        settings = BindingSettings.from_env(Env(redis_env))
        redis = create_redis(RedisSettings.from_env(Env(redis_env)))
        channel = secure_channel(s.allocation_address)
        try:
            yield DomainParts(redis, BindingStore.over(redis, settings), settings, channel)
        finally:
            await channel.close(grace=None)
            await redis.aclose()

    return start
