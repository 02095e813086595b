"""The in-process harness serves a real service with health and reflection on an OS-chosen port."""

from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.services.cdr.app import build
from support.inprocess import running_service


async def test_in_process_service_is_serving(redis_url: str) -> None:
    async with running_service("cdr", build, {"NUMPROTECT_REDIS_URL": redis_url}) as svc:
        assert svc.port > 0
        health = health_pb2_grpc.HealthStub(svc.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="numprotect.cdr.v1.CdrService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
