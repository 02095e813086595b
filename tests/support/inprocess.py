"""Runs a service in the test's own process: the real bootstrap and servicer on a loopback port chosen by the OS.

`running_service` serves a grpc.aio service on the test's event loop; `running_sync_service` a thread-pool service
(translation), whose building, starting and stopping block and so run off the loop. Both serve TLS with the test
PKI (support/tls.py) unless `environ` sets NUMPROTECT_TLS=off, and yield a grpc.aio channel that trusts it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from numprotect.core.redis_client import (
    SyncRedisClient,
    create_redis,
    create_sync_redis,
    redis_is_up,
    sync_redis_is_up,
)
from numprotect.core.server import AioServiceApp, Builder, Runtime, SyncBuilder, SyncRuntime, SyncServiceApp
from numprotect.core.settings import Env, RedisSettings, ServerSettings
from numprotect.core.telemetry import Telemetry
from numprotect.core.tls import TlsSettings
from support.tls import channel_for, with_tls

AppT = TypeVar("AppT", AioServiceApp, SyncServiceApp)
RuntimeT = TypeVar("RuntimeT", Runtime, SyncRuntime)


@dataclass
class RunningService(Generic[AppT, RuntimeT]):
    app: AppT
    runtime: RuntimeT
    port: int
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class _Setup:
    env: Env
    server: ServerSettings
    redis: RedisSettings
    telemetry: Telemetry
    probe_client: SyncRedisClient
    tls: TlsSettings
    environ: Mapping[str, str]

    @classmethod
    def of(cls, service: str, environ: Mapping[str, str], telemetry: Telemetry | None) -> _Setup:
        full = {**with_tls(environ), f"NUMPROTECT_{service.upper()}_PORT": "0", "NUMPROTECT_GRACE_PERIOD": "0"}
        env = Env(full)
        redis = RedisSettings.from_env(env)
        return cls(
            env,
            ServerSettings.from_env(env, service),
            redis,
            telemetry or Telemetry.disabled(),
            create_sync_redis(redis, max_connections=2),
            TlsSettings.from_env(env),
            full,
        )

    def channel(self, port: int) -> grpc.aio.Channel:
        return channel_for(f"127.0.0.1:{port}", self.environ)

    def probe(self) -> bool:
        return sync_redis_is_up(self.probe_client)


@asynccontextmanager
async def running_service(
    service: str, builder: Builder, environ: Mapping[str, str], *, telemetry: Telemetry | None = None
) -> AsyncIterator[RunningService[AioServiceApp, Runtime]]:
    """Builds `service` with `builder` from `environ` (port forced to 0) and yields it with a client channel."""
    setup = _Setup.of(service, environ, telemetry)
    runtime = Runtime(setup.env, setup.server, create_redis(setup.redis), setup.telemetry, setup.redis, tls=setup.tls)
    await redis_is_up(runtime.redis)  # as `serve` does: a cluster client's slot map before concurrent commands
    parts = await builder(runtime)
    app = AioServiceApp(setup.server, parts.registrations, probe=setup.probe, telemetry=setup.telemetry, tls=setup.tls)
    port = await app.start()
    channel = setup.channel(port)
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
        setup.probe_client.close()


@asynccontextmanager
async def running_sync_service(
    service: str, builder: SyncBuilder, environ: Mapping[str, str], *, telemetry: Telemetry | None = None
) -> AsyncIterator[RunningService[SyncServiceApp, SyncRuntime]]:
    """The same for a thread-pool service."""
    setup = _Setup.of(service, environ, telemetry)
    runtime = SyncRuntime(setup.env, setup.server, setup.redis, create_sync_redis(setup.redis), setup.telemetry)
    try:
        parts = await asyncio.to_thread(builder, runtime)
        try:
            app = SyncServiceApp(
                setup.server,
                parts.registrations,
                probe=setup.probe,
                telemetry=setup.telemetry,
                tls=setup.tls,
                max_workers=parts.max_workers,
            )
            port = await asyncio.to_thread(app.start)
            channel = setup.channel(port)
            try:
                yield RunningService(app, runtime, port, channel)
            finally:
                await channel.close(grace=None)
                await asyncio.to_thread(app.stop)
        finally:
            for hook in parts.on_shutdown:
                await asyncio.to_thread(hook)
    finally:
        runtime.close()
        setup.probe_client.close()
