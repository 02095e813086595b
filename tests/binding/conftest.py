"""Fixtures of the binding tests: the real allocation and binding services in-process on a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2_grpc
from numprotect.services.allocation.app import build as build_allocation
from numprotect.services.binding.app import build as build_binding
from support.inprocess import running_service

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
