"""Fixtures of the events tests: the real events service in-process on a real Redis (standalone or cluster) over TLS
with API keys, and stubs of its callers.

`async with events_service(NUMPROTECT_EVENTS_RETRY_SCHEDULE="200ms,400ms") as events:` yields an `EventsClients`:
`tenant(id)` (TENANT, OTHER_TENANT, ...), `operator` and `anonymous` stubs, the served `svc`, its `servicer` and
its `endpoints` store. Defaults suit loopback receivers and fast tests (FAST_SETTINGS); keyword settings override
them.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from numprotect.core.identity.principal import Role
from numprotect.core.server import AioServiceApp, Runtime
from numprotect.core.telemetry import Telemetry
from numprotect.events.v1 import events_pb2_grpc
from numprotect.services.events.app import build
from numprotect.services.events.endpoints import EndpointStore
from numprotect.services.events.servicer import EventServiceServicer
from support.inprocess import RunningService, running_service

TENANT = "t1"
OTHER_TENANT = "t2"
Stub = Any  # events_pb2_grpc.EventServiceStub (its methods are untyped)

# Loopback receivers allowed over http, short polls and a short retry schedule: tests take seconds, not minutes. The
# sweeps of every slot's outbox and expiries (16,384 reads each) run at start and then rarely: a test that needs a
# sweep (a lost hint) sets NUMPROTECT_EVENTS_SWEEP_INTERVAL itself.
FAST_SETTINGS = {
    "NUMPROTECT_EVENTS_ALLOW_HTTP": "on",
    "NUMPROTECT_EVENTS_ALLOWED_NETWORKS": "127.0.0.0/8",
    "NUMPROTECT_EVENTS_RETRY_SCHEDULE": "200ms,400ms",
    "NUMPROTECT_EVENTS_RETRY_JITTER": "0",
    "NUMPROTECT_EVENTS_POLL_INTERVAL": "50ms",
    "NUMPROTECT_EVENTS_EXPIRY_POLL": "100ms",
    "NUMPROTECT_EVENTS_SWEEP_INTERVAL": "10m",
    "NUMPROTECT_EVENTS_WATCH_BLOCK": "200ms",
    "NUMPROTECT_EVENTS_REQUEST_TIMEOUT": "2s",
    "NUMPROTECT_EVENTS_RETENTION": "2h",
}


@dataclass
class EventsClients:
    """One served events service and stubs of its callers (each principal's token minted once, on first use)."""

    svc: RunningService[AioServiceApp, Runtime]
    _stubs: dict[tuple[Role, str], Stub] = field(default_factory=dict)

    def stub_as(self, role: Role, principal_id: str = "") -> Stub:
        key = (role, principal_id)
        if key not in self._stubs:
            self._stubs[key] = events_pb2_grpc.EventServiceStub(self.svc.channel_as(role, principal_id))
        return self._stubs[key]

    def tenant(self, tenant_id: str = TENANT) -> Stub:
        return self.stub_as(Role.TENANT, tenant_id)

    @property
    def operator(self) -> Stub:
        return self.stub_as(Role.OPERATOR)

    @property
    def anonymous(self) -> Stub:
        return events_pb2_grpc.EventServiceStub(self.svc.channel)

    @property
    def servicer(self) -> EventServiceServicer:
        servicer = self.svc.app.registrations[0].servicer
        assert isinstance(servicer, EventServiceServicer)
        return servicer

    @property
    def endpoints(self) -> EndpointStore:
        return self.servicer.endpoints


ServiceFactory = Callable[..., AbstractAsyncContextManager[EventsClients]]


@pytest.fixture
def events_env(redis_env: dict[str, str]) -> dict[str, str]:
    """The environment the events service runs with in these tests (Redis, FAST_SETTINGS)."""
    return {**redis_env, **FAST_SETTINGS}


@pytest.fixture
def events_service(events_env: dict[str, str]) -> ServiceFactory:
    """`async with events_service(**settings) as events:` a served events service (`telemetry=`: its telemetry;
    `background=False`: the API alone, without router, expirer and dispatcher, for tests that need none of them)."""

    @asynccontextmanager
    async def start(
        telemetry: Telemetry | None = None, background: bool = True, **settings: str
    ) -> AsyncIterator[EventsClients]:
        environ: Mapping[str, str] = {**events_env, **settings}
        builder = build if background else functools.partial(build, background=False)
        async with running_service("events", builder, environ, telemetry=telemetry) as svc:
            yield EventsClients(svc)

    return start
