"""Fixtures of the allocation tests: the real service in-process on a real Redis (standalone or cluster)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest

from numprotect.allocation.v1 import allocation_pb2_grpc
from numprotect.services.allocation.app import build
from support.inprocess import running_service

if TYPE_CHECKING:
    from numprotect.allocation.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

ServiceFactory = Callable[..., AbstractAsyncContextManager[Any]]


@pytest.fixture
def allocation_service(redis_env: dict[str, str]) -> ServiceFactory:
    """`async with allocation_service(NUMPROTECT_ALLOCATION_COOLDOWN="1s") as stub:` a served allocation service."""

    @asynccontextmanager
    async def start(**settings: str) -> AsyncIterator[AllocationServiceAsyncStub]:
        environ: Mapping[str, str] = {**redis_env, **settings}
        async with running_service("allocation", build, environ) as svc:
            yield allocation_pb2_grpc.AllocationServiceStub(svc.channel)

    return start
