"""Health names on real service processes of both server models (allocation on grpc.aio, translation on grpcio's
thread-pool server): liveness does not depend on Redis, readiness does, and an unknown name is NOT_FOUND without an
ERROR in the log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.core.server import LIVENESS_NAME
from support.processes import ServiceProcess
from support.redis_server import RedisServer, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(params=["allocation", "translation"])
def running(request: pytest.FixtureRequest) -> Iterator[tuple[ServiceProcess, RedisServer, int]]:
    """The service with its own Redis (the test stops it) and a plaintext health port."""
    redis = RedisServer()
    health_port = free_port()
    env = {
        "NUMPROTECT_REDIS_URL": redis.url,
        "NUMPROTECT_HEALTH_INTERVAL": "100ms",
        "NUMPROTECT_REDIS_TIMEOUT": "300ms",
        "NUMPROTECT_HEALTH_PORT": str(health_port),
    }
    service = ServiceProcess(request.param, env)
    try:
        yield service, redis, health_port
    finally:
        service.stop()
        redis.stop()


def _status(channel: grpc.Channel, name: str) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
    return int(reply.status)


def _readiness_names(service: str) -> list[str]:
    return ["", f"numprotect.{service}.v1.{service.capitalize()}Service"]


def test_liveness_stays_serving_while_redis_is_down_and_readiness_does_not(
    running: tuple[ServiceProcess, RedisServer, int],
) -> None:
    service, redis, health_port = running
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as plain, service.channel() as secure:
        for channel in (plain, secure):
            assert _status(channel, LIVENESS_NAME) == SERVING
            assert [_status(channel, name) for name in _readiness_names(service.service)] == [SERVING, SERVING]
        redis.kill()
        deadline = time.monotonic() + 10
        while _status(plain, "") != NOT_SERVING:
            assert time.monotonic() < deadline, "readiness still SERVING with Redis down"
            time.sleep(0.05)
        for channel in (plain, secure):
            assert [_status(channel, name) for name in _readiness_names(service.service)] == [NOT_SERVING] * 2
            assert _status(channel, LIVENESS_NAME) == SERVING


def test_an_unknown_health_name_is_not_found_and_logs_no_error(
    running: tuple[ServiceProcess, RedisServer, int],
) -> None:
    service, _, health_port = running
    before = len(service.lines)
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as plain, service.channel() as secure:
        for channel in (plain, secure):
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as raised:
                    _status(channel, "no.such.Service")
                assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        # A known name answers after them: the process logged whatever the unknown ones made it log.
        assert _status(plain, LIVENESS_NAME) == SERVING
    time.sleep(0.3)
    logged = service.lines[before:]
    errors = [line for line in logged if _level(line) in ("ERROR", "CRITICAL") or line.startswith("E")]
    assert errors == [], errors


def _level(line: str) -> str:
    try:
        return str(json.loads(line).get("level", ""))
    except ValueError:
        return ""
