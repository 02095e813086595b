"""Runs a thread-pool service (translation) in the test's process: the real bootstrap app and servicer on a loopback
port chosen by the OS, and a grpc.aio channel to it for tests written with async clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from numprotect.core.redis_client import create_sync_redis, sync_redis_is_up
from numprotect.core.server import SyncBuilder, SyncRuntime, SyncServiceApp
from numprotect.core.settings import Env, RedisSettings, ServerSettings
from numprotect.core.telemetry import Telemetry


@dataclass
class RunningSyncService:
    app: SyncServiceApp
    runtime: SyncRuntime
    port: int
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def running_sync_service(
    service: str, builder: SyncBuilder, environ: Mapping[str, str], *, telemetry: Telemetry | None = None
) -> AsyncIterator[RunningSyncService]:
    """Builds `service` with `builder` from `environ` (port forced to 0) and yields it with a client channel.

    Building, starting and stopping block (Redis, the first health check, the drain): they run off the loop.
    """
    env = Env({**environ, f"NUMPROTECT_{service.upper()}_PORT": "0", "NUMPROTECT_GRACE_PERIOD": "0"})
    server_settings = ServerSettings.from_env(env, service)
    redis_settings = RedisSettings.from_env(env)
    tel = telemetry or Telemetry.disabled()
    runtime = SyncRuntime(env, server_settings, redis_settings, create_sync_redis(redis_settings), tel)
    probe_client = create_sync_redis(redis_settings, max_connections=2)
    try:
        parts = await asyncio.to_thread(builder, runtime)
        try:
            app = SyncServiceApp(
                server_settings,
                parts.registrations,
                probe=lambda: sync_redis_is_up(probe_client),
                telemetry=tel,
                max_workers=parts.max_workers,
            )
            port = await asyncio.to_thread(app.start)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            try:
                yield RunningSyncService(app, runtime, port, channel)
            finally:
                await channel.close(grace=None)
                await asyncio.to_thread(app.stop)
        finally:
            for hook in parts.on_shutdown:
                await asyncio.to_thread(hook)
    finally:
        runtime.close()
        probe_client.close()
