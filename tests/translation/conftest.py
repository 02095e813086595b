"""Fixtures of the translation tests: the real service in-process on real Redis (TLS, API keys), the shared route
writer, and the principals who call it: the carrier CARRIER routes every number a test writes a route for (its
block recorded as ImportBlock does), tenants keep their blocklists, the operator the global one."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.routes import MODE_AXB, RESTRICTION_NONE, Route, RouteTable
from numprotect.core.server import SyncRuntime, SyncServiceApp
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.translation.app import build_sync
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.identity import record_blocks
from support.inprocess import RunningService, running_sync_service

X = "700100000000001"
A = "13800000001"
B = "13900000002"
STRANGER = "13700000003"
CARRIER = "cm"  # the carrier whose token `Translation.stub` carries

# Small limits and a fast blocklist refresh so tests see every effect quickly.
TEST_SETTINGS = {
    "NUMPROTECT_TRANSLATION_RATE_WINDOW": "60s",
    "NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "1000",
    "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "1000",
    "NUMPROTECT_TRANSLATION_BLOCKLIST_REFRESH": "100ms",
    # A call waits up to 5 s for a worker (0.5 s by default): a loaded host's stall made a call with no deadline
    # shed RESOURCE_EXHAUSTED; shedding has its own tests (tests/core/test_overload.py).
    "NUMPROTECT_MAX_QUEUE_WAIT": "5s",
}


def make_route(
    binding_id: str = "b1",
    mode: int = MODE_AXB,
    *,
    party_a: str = A,
    party_b: str = B,
    tenant_id: str = "t1",
    restriction: int = RESTRICTION_NONE,
    recording: bool = True,
    allow_any_caller: bool = False,
    ttl_ms: int = 60_000,
) -> Route:
    return Route(
        binding_id=binding_id,
        tenant_id=tenant_id,
        mode=mode,
        party_a=party_a,
        party_b=party_b,
        call_restriction=restriction,
        recording_enabled=recording,
        allow_any_caller=allow_any_caller,
        expire_ms=int(time.time() * 1000) + ttl_ms,
    )


@dataclass
class Translation:
    """The service and its callers: `stub` is the carrier CARRIER's (Translate, TranslateStream), `operator` the
    operator's (every tenant's blocklist and the global one), `tenant(id)` a tenant's."""

    service: RunningService[SyncServiceApp, SyncRuntime]
    stub: translation_pb2_grpc.TranslationServiceStub
    operator: translation_pb2_grpc.TranslationServiceStub
    routes: RouteTable
    redis: RedisClient

    @staticmethod
    def route(binding_id: str = "b1", mode: int = MODE_AXB, **kwargs: Any) -> Route:
        """A route of a binding expiring in ttl_ms (default 60 s): see make_route."""
        return make_route(binding_id, mode, **kwargs)

    async def put(self, route: Route, virtual_number: str = X, extension: str = "") -> Route:
        """Writes the route through the binding service's shared writer; CARRIER routes the number's block."""
        self.route_blocks(virtual_number)
        await self.routes.put(virtual_number, route, extension)
        return route

    def route_blocks(self, *numbers: str, carrier_id: str = CARRIER) -> None:
        """Records `carrier_id` as the carrier of the numbers' blocks (as ImportBlock does) and has the service
        load it now (a block another carrier routes stays that carrier's)."""
        record_blocks(self.service.redis, carrier_id, *numbers)
        directory = self.service.runtime.identity.directory
        assert directory is not None
        directory.reload()

    def as_(self, role: Role, principal_id: str = "") -> translation_pb2_grpc.TranslationServiceStub:
        """A stub whose calls carry a new key of `role` (`principal_id`: the tenant or carrier)."""
        return translation_pb2_grpc.TranslationServiceStub(self.service.channel_as(role, principal_id))

    def tenant(self, tenant_id: str) -> translation_pb2_grpc.TranslationServiceStub:
        return self.as_(Role.TENANT, tenant_id)

    async def translate(
        self, caller: str, called: str = X, extension: str = "", call_id: str = "call-1", deadline: float = 5.0
    ) -> translation_pb2.TranslateResponse:
        request = translation_pb2.TranslateRequest(
            calling_number=caller, called_number=called, extension=extension, call_id=call_id
        )
        call: Any = self.stub.Translate(request, timeout=deadline)
        response: translation_pb2.TranslateResponse = await call
        return response


TranslationFactory = Callable[..., Awaitable[Translation]]


@pytest.fixture
async def translation_factory(redis_env: dict[str, str]) -> AsyncIterator[TranslationFactory]:
    """Starts the service in-process with TEST_SETTINGS overridden by `settings` (env names)."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(settings: Mapping[str, str] | None = None) -> Translation:
            environ = {**redis_env, **TEST_SETTINGS, **(settings or {})}
            service = await stack.enter_async_context(running_sync_service("translation", build_sync, environ))
            redis = create_redis(RedisSettings.from_env(Env(environ)))
            stack.push_async_callback(redis.aclose)
            carrier = translation_pb2_grpc.TranslationServiceStub(service.channel_as(Role.CARRIER, CARRIER))
            operator = translation_pb2_grpc.TranslationServiceStub(service.channel_as(Role.OPERATOR))
            return Translation(service, carrier, operator, RouteTable(redis), redis)

        yield start


@pytest.fixture
async def tr(translation_factory: Callable[..., Awaitable[Translation]]) -> Translation:
    """The translation service with the test settings."""
    return await translation_factory()


@pytest.fixture
def route_factory() -> Callable[..., Route]:
    """make_route, for tests that seed without the in-process service."""
    return make_route
