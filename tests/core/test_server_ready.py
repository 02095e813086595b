"""ServiceParts.ready: readiness needs it besides the probe (the SIP adapter: a translation stream up). While it
returns False, health ("" and each service) is NOT_SERVING and the Redis gauge still says what Redis does;
liveness stays SERVING."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.core.identity.api_keys import AuthSettings
from numprotect.core.identity.runtime import Identity
from numprotect.core.metrics import Metrics
from numprotect.core.server import LIVENESS_NAME, AioServiceApp
from numprotect.core.settings import Env, RedisSettings, ServerSettings
from numprotect.core.telemetry import Telemetry
from numprotect.core.tls import TlsSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(stub: health_pb2_grpc.HealthStub, name: str = "") -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
    return int(reply.status)


async def _eventually(stub: health_pb2_grpc.HealthStub, wanted: int) -> int:
    status = -1
    for _ in range(100):
        status = await _status(stub)
        if status == wanted:
            break
        await asyncio.sleep(0.05)
    return status


async def test_readiness_follows_ready_while_liveness_stays_serving() -> None:
    environ = {
        "NUMPROTECT_SIP_GRPC_PORT": "0",
        "NUMPROTECT_GRACE_PERIOD": "0",
        "NUMPROTECT_TLS": "off",
        "NUMPROTECT_HEALTH_INTERVAL": "50ms",
        "NUMPROTECT_METRICS_PORT": "0",
    }
    env = Env(environ)
    ready = False
    metrics = Metrics("sip")
    app = AioServiceApp(
        ServerSettings.from_env(env, "sip"),
        [],
        probe=lambda: True,
        telemetry=Telemetry.disabled(),
        tls=TlsSettings.from_env(env),
        identity=Identity(AuthSettings.from_env(Env({"NUMPROTECT_AUTH": "off"})), RedisSettings.from_env(Env({}))),
        metrics=metrics,
        ready=lambda: ready,
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert await _status(stub) == NOT_SERVING
            assert await _status(stub, LIVENESS_NAME) == SERVING
            assert metrics.registry.get_sample_value("numprotect_redis_up", {}) == 1
            ready = True
            assert await _eventually(stub, SERVING) == SERVING
            ready = False
            assert await _eventually(stub, NOT_SERVING) == NOT_SERVING
    finally:
        await app.stop()
