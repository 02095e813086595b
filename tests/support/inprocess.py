"""Runs a service in the test's own event loop: the real bootstrap and servicer on a loopback port chosen by the OS."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from numprotect.core.redis_client import create_redis, create_sync_redis, sync_redis_is_up
from numprotect.core.server import AioServiceApp, Builder, Runtime
from numprotect.core.settings import Env, RedisSettings, ServerSettings
from numprotect.core.telemetry import Telemetry


@dataclass
class RunningService:
    app: AioServiceApp
    runtime: Runtime
    port: int
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def running_service(
    service: str, builder: Builder, environ: Mapping[str, str], *, telemetry: Telemetry | None = None
) -> AsyncIterator[RunningService]:
    """Builds `service` with `builder` from `environ` (port forced to 0) and yields it with a client channel."""
    env = Env({**environ, f"NUMPROTECT_{service.upper()}_PORT": "0", "NUMPROTECT_GRACE_PERIOD": "0"})
    server_settings = ServerSettings.from_env(env, service)
    redis_settings = RedisSettings.from_env(env)
    redis = create_redis(redis_settings)
    probe_client = create_sync_redis(redis_settings, max_connections=2)
    tel = telemetry or Telemetry.disabled()
    runtime = Runtime(env, server_settings, redis, tel, redis_settings)
    parts = await builder(runtime)
    app = AioServiceApp(
        server_settings, parts.registrations, probe=lambda: sync_redis_is_up(probe_client), telemetry=tel
    )
    port = await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningService(app, runtime, port, channel)
    finally:
        await channel.close(grace=None)
        await app.stop()
        for close in parts.on_shutdown:
            outcome = close()
            if inspect.isawaitable(outcome):
                await outcome
        await runtime.close()
        probe_client.close()
