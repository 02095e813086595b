"""The health probe's log names what changed (Redis, or the service's own readiness such as the SIP adapter's
translation streams), and a start that is not ready yet is no WARNING."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from numprotect.core.health import HealthProbe
from numprotect.core.identity.api_keys import AuthSettings
from numprotect.core.identity.runtime import Identity
from numprotect.core.server import AioServiceApp
from numprotect.core.settings import Env, RedisSettings, ServerSettings
from numprotect.core.telemetry import Telemetry
from support.tls import server_tls

HEALTH_LOGGER = "numprotect.core.health"


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == HEALTH_LOGGER]


def test_each_change_is_logged_with_what_is_not_ready(caplog: pytest.LogCaptureFixture) -> None:
    answers: list[bool | str] = ["redis unreachable", True, "sip needs streams", "redis unreachable", True, False]
    remaining = iter(answers)
    published: list[bool] = []
    done = threading.Event()

    def check() -> bool | str:
        answer = next(remaining, None)
        if answer is None:
            done.set()
            return False
        return answer

    with caplog.at_level(logging.INFO, logger=HEALTH_LOGGER):
        probe = HealthProbe(check, published.append, 0.01)
        assert probe.start() is False
        assert done.wait(5)
        probe.stop()
    assert published == [False, True, False, True, False]
    assert _lines(caplog) == [
        ("INFO", "not ready yet: NOT_SERVING, redis unreachable"),  # the start: no WARNING
        ("INFO", "ready: SERVING"),
        ("WARNING", "not ready: NOT_SERVING, sip needs streams"),
        ("WARNING", "not ready: NOT_SERVING, redis unreachable"),  # a new reason while down is logged too
        ("INFO", "ready again: SERVING"),
        ("WARNING", "not ready: NOT_SERVING, the health check failed"),  # a bare False
    ]


async def test_a_service_not_ready_with_redis_up_is_not_logged_as_redis(caplog: pytest.LogCaptureFixture) -> None:
    ready = threading.Event()
    settings = ServerSettings.from_env(
        Env({"NUMPROTECT_SIP_GRPC_PORT": "0", "NUMPROTECT_HEALTH_INTERVAL": "50ms"}), "sip"
    )
    app = AioServiceApp(
        settings,
        [],
        probe=lambda: True,
        telemetry=Telemetry.disabled(),
        tls=server_tls(),
        identity=Identity(AuthSettings.from_env(Env({"NUMPROTECT_AUTH": "off"})), RedisSettings.from_env(Env({}))),
        ready=ready.is_set,
        ready_means="a translation stream up",
    )
    with caplog.at_level(logging.INFO, logger=HEALTH_LOGGER):
        await app.start()
        try:
            ready.set()
            for _ in range(250):
                if ("INFO", "ready: SERVING") in _lines(caplog):
                    break
                await asyncio.sleep(0.02)
        finally:
            await app.stop()
    lines = _lines(caplog)
    assert lines[:2] == [
        ("INFO", "not ready yet: NOT_SERVING, sip needs a translation stream up"),
        ("INFO", "ready: SERVING"),
    ]
    assert not any("redis" in message for _, message in lines)
