"""Fixtures of the admin CLI tests: the real allocation (with AdminService), binding, cdr and events services
in-process (TLS and auth on) on a real Redis, a context file naming them, and `cli(...)`, which runs `numprotect`
through typer's CliRunner in a worker thread (the services run on the test's event loop)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.cli.main import build_app
from numprotect.common.v1 import common_pb2
from numprotect.core.identity.principal import Role
from numprotect.services.allocation.app import build as build_allocation
from numprotect.services.binding.app import build as build_binding
from numprotect.services.cdr.app import build as build_cdr
from numprotect.services.events.app import build as build_events
from support.identity import mint
from support.inprocess import RunningService, running_service
from support.tls import test_pki

TENANT = "demo"
CARRIER = "cm"
BLOCK = "70010000001"
CITY = "010"
# events: webhooks to loopback receivers over http, short polls, a short retry schedule (3 attempts in ~0.6 s).
EVENTS_SETTINGS = {
    "NUMPROTECT_EVENTS_ALLOW_HTTP": "on",
    "NUMPROTECT_EVENTS_ALLOWED_NETWORKS": "127.0.0.0/8",
    "NUMPROTECT_EVENTS_RETRY_SCHEDULE": "200ms,400ms",
    "NUMPROTECT_EVENTS_RETRY_JITTER": "0",
    "NUMPROTECT_EVENTS_POLL_INTERVAL": "50ms",
    "NUMPROTECT_EVENTS_SWEEP_INTERVAL": "10m",  # the rings bring new events; no test here needs a sweep
    "NUMPROTECT_EVENTS_WATCH_BLOCK": "200ms",
    "NUMPROTECT_EVENTS_REQUEST_TIMEOUT": "2s",
    "NUMPROTECT_EVENTS_RETENTION": "2h",
}


@dataclass(frozen=True)
class Result:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Stack:
    """The four services, stubs as the operator, the tenant and the carrier, and the CLI bound to a context file
    whose contexts are "operator" (current) and "tenant" (TENANT's key)."""

    allocation: RunningService[Any, Any]
    binding: RunningService[Any, Any]
    cdr: RunningService[Any, Any]
    events: RunningService[Any, Any]
    config: Path
    operator_token: str
    tenant_token: str
    allocation_stub: Any
    binding_stub: Any  # as the tenant
    cdr_stub: Any  # as the carrier

    async def cli(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return await run_cli(self.config, *args, env=env)

    async def create_binding(self, order: str) -> binding_pb2.Binding:
        request = binding_pb2.CreateBindingRequest(
            out_order_id=order,
            mode=common_pb2.BINDING_MODE_AXB,
            party_a="13800000001",
            party_b=f"139{len(order):04d}{abs(hash(order)) % 10000:04d}",
            city_code=CITY,
            user_consent=True,
        )
        response = await self.binding_stub.CreateBinding(request)
        return response.binding  # type: ignore[no-any-return]


def invoke(config: Path, args: tuple[str, ...], env: dict[str, str] | None) -> Result:
    runner = CliRunner(env={"NUMPROTECT_CONFIG": str(config), "NUMPROTECT_CONTEXT": None, **(env or {})})
    result = runner.invoke(build_app(), list(args))
    return Result(result.exit_code, result.stdout, result.stderr)


async def run_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return await asyncio.to_thread(invoke, config, args, env)


def write_secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


StackFactory = Callable[[], AbstractAsyncContextManager[Stack]]


@pytest.fixture
def stack(redis_env: dict[str, str], redis_sync: Any, tmp_path: Path) -> StackFactory:
    """`async with stack() as s:` the services up, BLOCK imported for TENANT in CITY (routed by CARRIER)."""
    service_token = write_secret(tmp_path / "binding.token", mint(redis_sync, Role.SERVICE, "binding"))

    @asynccontextmanager
    async def start() -> AsyncIterator[Stack]:
        async with running_service("allocation", build_allocation, redis_env) as alloc:
            operator_token = alloc.token(Role.OPERATOR)
            allocation: Any = allocation_pb2_grpc.AllocationServiceStub(alloc.channel_with(operator_token))
            await allocation.ImportBlock(
                allocation_pb2.ImportBlockRequest(block=BLOCK, tenant_id=TENANT, city_code=CITY, carrier_id=CARRIER)
            )
            binding_env = {
                **redis_env,
                "NUMPROTECT_ALLOCATION_ADDR": alloc.address,
                "NUMPROTECT_SERVICE_TOKEN_FILE": str(service_token),
            }
            async with (
                running_service("binding", build_binding, binding_env) as binding,
                running_service("cdr", build_cdr, {**redis_env, "NUMPROTECT_CDR_WATCH_BLOCK": "200ms"}) as cdr,
                running_service("events", build_events, {**redis_env, **EVENTS_SETTINGS}) as events,
            ):
                tenant_token = binding.token(Role.TENANT, TENANT)
                cdr.route(CARRIER, f"{BLOCK}0000")
                cdr_carrier: Any = cdr_pb2_grpc.CdrServiceStub(cdr.channel_as(Role.CARRIER, CARRIER))
                config = tmp_path / "config" / "numprotect.yaml"
                stack = Stack(
                    alloc,
                    binding,
                    cdr,
                    events,
                    config,
                    operator_token,
                    tenant_token,
                    allocation,
                    binding_pb2_grpc.BindingServiceStub(binding.channel_with(tenant_token)),
                    cdr_carrier,
                )
                addresses = [
                    f"--{name}={service.address}"
                    for name, service in (
                        ("allocation", alloc),
                        ("binding", binding),
                        ("cdr", cdr),
                        ("events", events),
                    )
                ]
                ca = f"--ca-file={test_pki().ca_file}"
                for name, token in (("tenant", tenant_token), ("operator", operator_token)):
                    token_file = write_secret(tmp_path / f"{name}.token", token)
                    created = await stack.cli(
                        "config", "set-context", name, *addresses, ca, f"--token-file={token_file}", "--use"
                    )
                    assert created.exit_code == 0, created.stderr
                yield stack

    return start


def cdr_record(call_id: str, called: str, binding_id: str = "") -> cdr_pb2.CallDetailRecord:
    """An answered call from party A to `called` two minutes ago."""
    record = cdr_pb2.CallDetailRecord(
        call_id=call_id,
        calling_number="13800000001",
        called_number=called,
        call_type=cdr_pb2.CALL_TYPE_A_TO_PEER,
        release_cause=16,
        binding_id=binding_id,
    )
    record.call_time.GetCurrentTime()
    start = record.call_time.ToMilliseconds() - 120_000
    record.call_time.FromMilliseconds(start)
    record.answer_time.FromMilliseconds(start + 5_000)
    record.release_time.FromMilliseconds(start + 65_000)
    return record
