"""Fixtures of the binding tests: the real allocation and binding services in-process on a real Redis (TLS and
auth on, binding calling allocation with its own ROLE_SERVICE token), and the parts the binding service's domain
objects are built from (to test them with faults injected at one step)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2_grpc
from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.core.telemetry import Telemetry
from numprotect.services.allocation.app import build as build_allocation
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.app import build as build_binding
from numprotect.services.binding.settings import BindingSettings
from numprotect.services.binding.store import BindingStore
from support.identity import mint
from support.inprocess import RunningService, running_service
from support.tls import secure_channel

if TYPE_CHECKING:
    from numprotect.allocation.v1.allocation_pb2_grpc import AllocationServiceAsyncStub
    from numprotect.binding.v1.binding_pb2_grpc import BindingServiceAsyncStub

TENANT = "t1"
OTHER_TENANT = "t2"
BLOCK = "70010000000"
OTHER_BLOCK = "70010000001"
CARRIER = "c1"
CITY = "010"


@dataclass
class Services:
    """`binding` calls as TENANT's key, `allocation` as the operator's; `tenant`, `binding_as` and `binding_with`
    give other callers' stubs."""

    binding: BindingServiceAsyncStub
    allocation: AllocationServiceAsyncStub
    binding_address: str
    allocation_address: str
    binding_service: RunningService[Any, Any]
    allocation_service: RunningService[Any, Any]
    # Binding's ROLE_SERVICE token at allocation (what NUMPROTECT_SERVICE_TOKEN_FILE holds).
    service_token: str
    _tenants: dict[str, Any] = field(default_factory=dict)

    def binding_as(self, role: Role, principal_id: str = "") -> Any:
        """A binding stub whose calls carry a new key of `role` (`principal_id`: the tenant, carrier, ...)."""
        return binding_pb2_grpc.BindingServiceStub(self.binding_service.channel_as(role, principal_id))

    def tenant(self, tenant_id: str) -> Any:
        """The binding stub of `tenant_id`'s key (one per tenant and test)."""
        if tenant_id not in self._tenants:
            self._tenants[tenant_id] = self.binding_as(Role.TENANT, tenant_id)
        return self._tenants[tenant_id]

    def binding_with(self, token: str | None) -> Any:
        """A binding stub sending `token` (None: no credentials at all)."""
        return binding_pb2_grpc.BindingServiceStub(self.binding_service.channel_with(token))


ServicesFactory = Callable[..., AbstractAsyncContextManager[Services]]


def write_token(folder: Path, token: str, name: str = "binding.token") -> Path:
    """A token file as a deployment mounts it (mode 600)."""
    path = folder / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def token_file(tmp_path: Path) -> Callable[[str], Path]:
    """`token_file(token)`: a new file holding `token`, for NUMPROTECT_SERVICE_TOKEN_FILE."""
    written: list[Path] = []

    def write(token: str) -> Path:
        written.append(write_token(tmp_path, token, f"token-{len(written)}"))
        return written[-1]

    return write


@pytest.fixture
def service_token_file(redis_sync: Any, tmp_path: Path) -> Path:
    """A file holding a new ROLE_SERVICE "binding" token, minted before any service of the test starts."""
    return write_token(tmp_path, mint(redis_sync, Role.SERVICE, "binding"))


@pytest.fixture
def services(redis_env: dict[str, str], service_token_file: Path) -> ServicesFactory:
    """`async with services(NUMPROTECT_BINDING_MIN_TTL="1s") as s:` allocation + binding served, one block imported
    for TENANT (and one for OTHER_TENANT) in CITY; binding authenticates to allocation with its service token."""
    service_token = service_token_file.read_text().strip()

    @asynccontextmanager
    async def start(telemetry: Telemetry | None = None, **settings: str) -> AsyncIterator[Services]:
        """`telemetry`: both services trace into it (default: tracing off)."""
        async with running_service(
            "allocation", build_allocation, {**redis_env, **settings}, telemetry=telemetry
        ) as alloc:
            allocation: Any = allocation_pb2_grpc.AllocationServiceStub(alloc.channel_as(Role.OPERATOR))
            for block, tenant in ((BLOCK, TENANT), (OTHER_BLOCK, OTHER_TENANT)):
                await allocation.ImportBlock(
                    allocation_pb2.ImportBlockRequest(
                        block=block, tenant_id=tenant, city_code=CITY, actor="test", carrier_id=CARRIER
                    )
                )
            environ = {
                **redis_env,
                "NUMPROTECT_ALLOCATION_ADDR": alloc.address,
                "NUMPROTECT_SERVICE_TOKEN_FILE": str(service_token_file),
                **settings,
            }
            async with running_service("binding", build_binding, environ, telemetry=telemetry) as svc:
                binding: Any = binding_pb2_grpc.BindingServiceStub(svc.channel_as(Role.TENANT, TENANT))
                running = Services(binding, allocation, svc.address, alloc.address, svc, alloc, service_token)
                running._tenants[TENANT] = binding
                yield running

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
        channel = secure_channel(s.allocation_address, s.service_token)  # as the binding service calls it
        try:
            yield DomainParts(redis, BindingStore.over(redis, settings), settings, channel)
        finally:
            await channel.close(grace=None)
            await redis.aclose()

    return start
