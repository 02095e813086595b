"""Fixtures of the allocation tests: the real service in-process (TLS, API keys) on a real Redis (standalone or
cluster).

Each RPC is called as the principal the policy table (numprotect.core.identity.policy) gives it: the reservation
RPCs as the binding service, everything else as the operator. Tests of the access rules themselves use
`allocation_svc` and the harness's `channel_as`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest

from numprotect.allocation.v1 import allocation_pb2_grpc
from numprotect.core.identity import audit
from numprotect.core.identity.audit import AuditEvent
from numprotect.core.identity.principal import Role
from numprotect.core.server import AioServiceApp, Runtime
from numprotect.services.allocation.app import build
from support.inprocess import RunningService, running_service
from support.redis_cluster import RedisClusterServers

if TYPE_CHECKING:
    from numprotect.allocation.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

ServiceFactory = Callable[..., AbstractAsyncContextManager[Any]]
Svc = RunningService[AioServiceApp, Runtime]

# Only binding may call these (policy: Role.SERVICE "binding"); the operator calls the rest.
RESERVATION_RPCS = frozenset(
    {
        "AllocateNumber",
        "ConfirmReservation",
        "CancelReservation",
        "ReplaceParty",
        "AllocateNumbers",
        "ConfirmReservations",
        "CancelReservations",
    }
)


class AsPolicy:
    """An AllocationService stub that sends each RPC with the credentials of the principal allowed to call it."""

    def __init__(self, operator: AllocationServiceAsyncStub, binding: AllocationServiceAsyncStub) -> None:
        self._operator = operator
        self._binding = binding

    def __getattr__(self, rpc: str) -> Any:
        return getattr(self._binding if rpc in RESERVATION_RPCS else self._operator, rpc)


def as_policy(svc: Svc) -> AsPolicy:
    return AsPolicy(
        allocation_pb2_grpc.AllocationServiceStub(svc.channel_as(Role.OPERATOR)),
        allocation_pb2_grpc.AllocationServiceStub(svc.channel_as(Role.SERVICE, "binding")),
    )


@pytest.fixture
def cluster_env(redis_cluster_servers: RedisClusterServers | None) -> Iterator[Callable[[], dict[str, str]]]:
    """`cluster_env()`: the Redis environment of a 3-primary Redis Cluster, emptied: the session's in the cluster pass
    of make test, else one started for this test (a few seconds) and stopped after it."""
    started: list[RedisClusterServers] = []

    def environment() -> dict[str, str]:
        cluster = redis_cluster_servers
        if cluster is None:
            cluster = RedisClusterServers()
            started.append(cluster)
        cluster.flushall()
        return {"NUMPROTECT_REDIS_URL": cluster.url, "NUMPROTECT_REDIS_MODE": "cluster"}

    yield environment
    for cluster in started:
        cluster.stop()


@pytest.fixture
def allocation_service(redis_env: dict[str, str]) -> ServiceFactory:
    """`async with allocation_service(NUMPROTECT_ALLOCATION_COOLDOWN="1s") as stub:` a served allocation service,
    each RPC called as its allowed principal."""

    @asynccontextmanager
    async def start(**settings: str) -> AsyncIterator[AsPolicy]:
        environ: Mapping[str, str] = {**redis_env, **settings}
        async with running_service("allocation", build, environ) as svc:
            yield as_policy(svc)

    return start


@pytest.fixture
def allocation_svc(redis_env: dict[str, str]) -> Callable[..., AbstractAsyncContextManager[Svc]]:
    """`async with allocation_svc() as svc:` the running service itself (channels per principal, runtime)."""

    @asynccontextmanager
    async def start(**settings: str) -> AsyncIterator[Svc]:
        async with running_service("allocation", build, {**redis_env, **settings}) as svc:
            yield svc

    return start


AuditEvents = Callable[[Svc], Awaitable[list[tuple[str, AuditEvent]]]]


async def _audit_events(svc: Svc) -> list[tuple[str, AuditEvent]]:
    """Every audit event in Redis, oldest first, after the service's writer has written what it queued."""
    audit_log = svc.runtime.identity.audit
    assert audit_log is not None
    assert await asyncio.to_thread(audit_log.flush)
    rows: Any = svc.redis.xrange(audit.LOG_KEY)
    return [(_text(entry_id), AuditEvent.from_canonical(fields[b"e"])) for entry_id, fields in rows]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture
def audit_events() -> AuditEvents:
    """`await audit_events(svc)`: the audit trail as written to Redis."""
    return _audit_events
