"""The policy table covers every method the services serve, names none that does not exist, and a method without an
entry is denied to every caller by a real server (fail closed)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.core.identity import audit
from numprotect.core.identity.layer import UNAUTHENTICATED_MESSAGE
from numprotect.core.identity.policy import POLICY
from numprotect.core.identity.principal import Role
from numprotect.core.server import Runtime, ServiceParts, ServiceRegistration
from numprotect.services.allocation.app import build as build_allocation
from support.inprocess import running_service

UNLISTED_SERVICE = "numprotect.probe.v1.Probe"
UNLISTED_METHOD = f"/{UNLISTED_SERVICE}/Echo"
# /v1 reflection is in the table for clients that ask for it; this grpcio serves v1alpha only.
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def served_methods() -> set[str]:
    """Every method of every service in gen/numprotect/*/v1, and reflection's."""
    modules = sorted(
        path for folder in importlib.import_module("numprotect").__path__ for path in Path(folder).glob("*/v1/*_pb2.py")
    )
    assert modules, "no generated protobuf modules found (make protos)"
    methods: set[str] = set()
    for path in modules:
        area = path.parent.parent.name
        module = importlib.import_module(f"numprotect.{area}.v1.{path.stem}")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.update(f"/{service.full_name}/{method.name}" for method in service.methods)
    reflection = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
    methods.update(f"/{reflection.full_name}/{method.name}" for method in reflection.methods)
    return methods


def test_every_served_method_has_a_policy_entry_and_every_entry_a_method() -> None:
    methods = served_methods()
    for service in ("allocation", "admin", "binding", "translation", "cdr", "events"):
        assert any(m.startswith(f"/numprotect.{service}.v1.") for m in methods), service
    assert sorted(methods - set(POLICY)) == []
    assert sorted(set(POLICY) - methods - {REFLECTION_V1}) == []
    assert not [m for m in POLICY if m.startswith("/grpc.health.")]  # health stays open: no entry needed


def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _with_unlisted_method(runtime: Runtime) -> ServiceParts:
    """Allocation's services plus one whose method has no policy entry."""
    parts = await build_allocation(runtime)
    handler = grpc.method_handlers_generic_handler(
        UNLISTED_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    probe = ServiceRegistration(
        UNLISTED_SERVICE, None, lambda _servicer, server: server.add_generic_rpc_handlers([handler])
    )
    return ServiceParts([*parts.registrations, probe], parts.on_shutdown)


async def test_a_method_without_an_entry_is_denied_to_every_caller_by_a_real_server(
    redis_env: dict[str, str],
) -> None:
    async with running_service("allocation", _with_unlisted_method, redis_env) as svc:
        audit_log = svc.runtime.identity.audit
        assert audit_log is not None
        for role, principal_id in [
            (Role.OPERATOR, ""),
            (Role.TENANT, "t1"),
            (Role.CARRIER, "cm"),
            (Role.REGULATOR, ""),
            (Role.SERVICE, "binding"),
        ]:
            echo = svc.channel_as(role, principal_id).unary_unary(UNLISTED_METHOD, None, None)
            try:
                await echo(b"hello")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, role
                assert "has no access policy" in (exc.details() or "")
            else:
                raise AssertionError(f"{role.value} called a method without a policy entry")
        try:
            await svc.channel.unary_unary(UNLISTED_METHOD, None, None)(b"hello")
        except grpc.aio.AioRpcError as exc:
            assert (exc.code(), exc.details()) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        # The same server answers a listed method and health (open, no token).
        operator = allocation_pb2_grpc.AllocationServiceStub(svc.channel_as(Role.OPERATOR))
        stats = await operator.GetPoolStats(allocation_pb2.GetPoolStatsRequest(tenant_id="t1"))
        assert stats.total == 0
        health = await health_pb2_grpc.HealthStub(svc.channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert audit_log.flush()
        rows: Any = svc.redis.xrange(audit.LOG_KEY)
        denied = [fields for _, fields in rows]
        assert sum(UNLISTED_METHOD.encode() in fields[b"e"] for fields in denied) == 6  # every denial audited
