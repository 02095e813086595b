"""The health state machine both server models share, and draining that never waits for ever on a hung probe."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.core.health import HealthProbe
from numprotect.core.identity.api_keys import AuthSettings
from numprotect.core.identity.runtime import Identity
from numprotect.core.server import AioServiceApp, SyncServiceApp
from numprotect.core.settings import Env, RedisSettings, ServerSettings
from numprotect.core.telemetry import Telemetry
from support.tls import server_tls, sync_secure_channel


def _no_identity() -> Identity:
    """No identity concern (NUMPROTECT_AUTH=off): these servers serve only health, which needs no key."""
    return Identity(AuthSettings.from_env(Env({"NUMPROTECT_AUTH": "off"})), RedisSettings.from_env(Env({})))


def _settings() -> ServerSettings:
    return ServerSettings.from_env(
        Env({"NUMPROTECT_BINDING_PORT": "0", "NUMPROTECT_HEALTH_INTERVAL": "50ms", "NUMPROTECT_GRACE_PERIOD": "0s"}),
        "binding",
    )


def test_the_probe_publishes_the_first_status_and_then_only_changes() -> None:
    answers = iter([True, True, False, False, True])
    published: list[bool] = []
    done = threading.Event()

    def check() -> bool:
        answer = next(answers, None)
        if answer is None:
            done.set()
            return True
        return answer

    probe = HealthProbe(check, published.append, 0.01)
    assert probe.start() is True
    assert done.wait(5)
    probe.stop()
    assert published == [True, False, True]


def test_a_probe_that_raises_counts_as_down() -> None:
    def check() -> bool:
        raise OSError("connection refused")

    published: list[bool] = []
    probe = HealthProbe(check, published.append, 1.0)
    assert probe.start() is False
    probe.stop()
    assert published == [False]


class _HangingCheck:
    """Answers the first check, then hangs like a PING to a Redis that accepted the connection and went silent."""

    def __init__(self) -> None:
        self.checks = 0
        self.hanging = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> bool:
        self.checks += 1
        if self.checks > 1:
            self.hanging.set()
            self.release.wait(30)
        return True


def _watch_statuses(port: int, into: list[int], ready: threading.Event) -> Callable[[], None]:
    channel = sync_secure_channel(f"127.0.0.1:{port}")
    stream: Any = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

    def read() -> None:
        try:
            for reply in stream:
                into.append(reply.status)
                ready.set()
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()

    def close() -> None:
        stream.cancel()
        channel.close()

    return close


def test_thread_pool_model_drains_although_the_probe_hangs() -> None:
    check = _HangingCheck()
    app = SyncServiceApp(
        _settings(), [], probe=check, telemetry=Telemetry.disabled(), tls=server_tls(), identity=_no_identity()
    )
    app._probe._stop_wait = 0.2  # the default (5 s) bounds a PING; this test's check hangs for 30 s
    port = app.start()
    statuses: list[int] = []
    ready = threading.Event()
    close = _watch_statuses(port, statuses, ready)
    try:
        assert ready.wait(5)
        assert check.hanging.wait(5)
        began = time.monotonic()
        app.stop()
        assert time.monotonic() - began < 3.0
        deadline = time.monotonic() + 5
        while health_pb2.HealthCheckResponse.NOT_SERVING not in statuses and time.monotonic() < deadline:
            time.sleep(0.02)
        assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses  # the drain told the watchers first
    finally:
        check.release.set()
        close()


@pytest.mark.asyncio
async def test_aio_model_drains_although_the_probe_hangs() -> None:
    check = _HangingCheck()
    app = AioServiceApp(
        _settings(), [], probe=check, telemetry=Telemetry.disabled(), tls=server_tls(), identity=_no_identity()
    )
    app._probe._stop_wait = 0.2
    await app.start()
    try:
        assert await asyncio.to_thread(check.hanging.wait, 5)
        began = time.monotonic()
        await app.stop()
        assert time.monotonic() - began < 3.0
    finally:
        check.release.set()


def test_no_call_is_answered_before_the_first_check_has_set_the_status() -> None:
    checking, answer = threading.Event(), threading.Event()

    def probe() -> bool:
        checking.set()
        answer.wait(5)
        return False

    app = SyncServiceApp(
        _settings(), [], probe=probe, telemetry=Telemetry.disabled(), tls=server_tls(), identity=_no_identity()
    )
    starting = threading.Thread(target=app.start)
    starting.start()
    try:
        assert checking.wait(5)
        with sync_secure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            # During the first check nothing answers (grpcio's default for "" would be SERVING, Redis unknown).
            with pytest.raises(grpc.RpcError):
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
            answer.set()
            starting.join(5)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        answer.set()
        starting.join(5)
        app.stop()
