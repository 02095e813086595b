"""Draining ends even when the Redis client swallows the health probe's cancellation."""

from __future__ import annotations

import asyncio
import time

from numprotect.core.server import ServiceApp
from numprotect.core.settings import Env, ServerSettings
from numprotect.core.telemetry import Telemetry


class _PingSwallowingCancellation:
    """Stands in for redis.asyncio's PING losing the task's cancellation: its asyncio.wait_for around the socket
    write swallows a cancellation that lands as the write completes on Python 3.11 (CPython gh-86296); a SIGTERM
    right after start-up left the aio services waiting for their probe for ever."""

    def __init__(self) -> None:
        self.pings = 0
        self.swallowed = 0
        self.probing = asyncio.Event()

    async def ping(self) -> bool:
        self.pings += 1
        if self.pings == 1:  # start()'s own check answers at once
            return True
        self.probing.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.swallowed += 1
        return True


async def test_stop_returns_although_the_probe_lost_its_cancellation() -> None:
    settings = ServerSettings.from_env(
        Env({"NUMPROTECT_BINDING_PORT": "0", "NUMPROTECT_HEALTH_INTERVAL": "100ms", "NUMPROTECT_GRACE_PERIOD": "0s"}),
        "binding",
    )
    redis = _PingSwallowingCancellation()
    app = ServiceApp(settings, [], redis=redis, telemetry=Telemetry.disabled())  # type: ignore[arg-type]
    await app.start()
    await asyncio.wait_for(redis.probing.wait(), timeout=5)  # the probe loop's first PING, which loses the cancel
    began = time.monotonic()
    stopping = asyncio.create_task(app.stop())
    done, _ = await asyncio.wait({stopping}, timeout=10)
    assert done, "stop() is still waiting for the health probe"
    assert redis.swallowed == 1
    assert time.monotonic() - began < 2.0  # the loop saw the stop flag after its 100 ms sleep
