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

from numprotect.core.identity.api_keys import AuthSettings
from numprotect.core.identity.principal import Role
from numprotect.core.identity.runtime import Identity
from numprotect.core.metrics import Metrics
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
from support.identity import mint, record_blocks, with_auth
from support.processes import SIP_DEFAULTS, listen_env
from support.tls import channel_for, with_tls

AppT = TypeVar("AppT", AioServiceApp, SyncServiceApp)
RuntimeT = TypeVar("RuntimeT", Runtime, SyncRuntime)


@dataclass
class RunningService(Generic[AppT, RuntimeT]):
    """`channel` carries no credentials (TLS only); `channel_as` and `token` give a principal's."""

    app: AppT
    runtime: RuntimeT
    port: int
    channel: grpc.aio.Channel
    environ: Mapping[str, str]
    redis: SyncRedisClient
    _channels: list[grpc.aio.Channel]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token(self, role: Role, principal_id: str = "") -> str:
        """A new API key's token for `role`, already loaded by the service."""
        token = mint(self.redis, role, principal_id)
        directory = self.runtime.identity.directory
        if directory is not None:
            directory.reload()
        return token

    def channel_as(self, role: Role, principal_id: str = "") -> grpc.aio.Channel:
        """A channel whose calls carry a new token of `role` (closed with the service)."""
        channel = channel_for(self.address, self.environ, self.token(role, principal_id))
        self._channels.append(channel)
        return channel

    def route(self, carrier_id: str, *numbers: str) -> None:
        """Records `carrier_id` as the carrier routing the numbers' blocks, loaded by the service at once."""
        record_blocks(self.redis, carrier_id, *numbers)
        directory = self.runtime.identity.directory
        if directory is not None:
            directory.reload()

    def channel_with(self, token: str | None) -> grpc.aio.Channel:
        channel = channel_for(self.address, self.environ, token)
        self._channels.append(channel)
        return channel

    async def close_channels(self) -> None:
        for channel in [self.channel, *self._channels]:
            await channel.close(grace=None)


@dataclass(frozen=True)
class _Setup:
    env: Env
    server: ServerSettings
    redis: RedisSettings
    telemetry: Telemetry
    probe_client: SyncRedisClient
    tls: TlsSettings
    environ: Mapping[str, str]
    identity: Identity
    metrics: Metrics

    @classmethod
    def of(cls, service: str, environ: Mapping[str, str], telemetry: Telemetry | None) -> _Setup:
        full = {
            **(SIP_DEFAULTS if service == "sip" else {}),
            **with_auth(with_tls(environ)),
            **listen_env(service),
            "NUMPROTECT_METRICS_PORT": "0",  # /metrics on a port the OS chooses (app.metrics_port)
            "NUMPROTECT_GRACE_PERIOD": "0",
        }
        env = Env(full)
        redis = RedisSettings.from_env(env)
        server = ServerSettings.from_env(env, service)
        metrics = Metrics(service, enabled=server.metrics)  # the service's and its identity layer's (as `serve`)
        return cls(
            env,
            server,
            redis,
            telemetry or Telemetry.disabled(),
            create_sync_redis(redis, max_connections=2),
            TlsSettings.from_env(env),
            full,
            Identity(AuthSettings.from_env(env), redis, metrics=metrics),
            metrics,
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
    runtime = Runtime(
        setup.env,
        setup.server,
        create_redis(setup.redis),
        setup.telemetry,
        setup.redis,
        tls=setup.tls,
        identity=setup.identity,
        metrics=setup.metrics,
    )
    try:
        await redis_is_up(runtime.redis)  # as `serve` does: a cluster client's slot map before concurrent commands
        await asyncio.to_thread(setup.identity.start)
        parts = await builder(runtime)
        app = AioServiceApp(
            setup.server,
            parts.registrations,
            probe=setup.probe,
            telemetry=setup.telemetry,
            identity=setup.identity,
            tls=setup.tls,
            metrics=runtime.metrics,
            ready=parts.ready,  # as `serve` does: readiness beyond Redis (the SIP adapter's streams)
        )
        port = await app.start()
        running = RunningService(app, runtime, port, setup.channel(port), setup.environ, setup.probe_client, [])
        try:
            yield running
        finally:
            await running.close_channels()
            await app.stop()
            for close in parts.on_shutdown:
                outcome = close()
                if inspect.isawaitable(outcome):
                    await outcome
    finally:
        await runtime.close()
        await asyncio.to_thread(setup.identity.stop)
        setup.probe_client.close()


@asynccontextmanager
async def running_sync_service(
    service: str, builder: SyncBuilder, environ: Mapping[str, str], *, telemetry: Telemetry | None = None
) -> AsyncIterator[RunningService[SyncServiceApp, SyncRuntime]]:
    """The same for a thread-pool service."""
    setup = _Setup.of(service, environ, telemetry)
    runtime = SyncRuntime(
        setup.env,
        setup.server,
        setup.redis,
        create_sync_redis(setup.redis),
        setup.telemetry,
        setup.identity,
        setup.metrics,
    )
    try:
        await asyncio.to_thread(setup.identity.start)
        parts = await asyncio.to_thread(builder, runtime)
        try:
            app = SyncServiceApp(
                setup.server,
                parts.registrations,
                probe=setup.probe,
                telemetry=setup.telemetry,
                identity=setup.identity,
                tls=setup.tls,
                max_workers=parts.max_workers,
                metrics=runtime.metrics,
            )
            port = await asyncio.to_thread(app.start)
            running = RunningService(app, runtime, port, setup.channel(port), setup.environ, setup.probe_client, [])
            try:
                yield running
            finally:
                await running.close_channels()
                await asyncio.to_thread(app.stop)
        finally:
            for hook in parts.on_shutdown:
                await asyncio.to_thread(hook)
    finally:
        runtime.close()
        await asyncio.to_thread(setup.identity.stop)
        setup.probe_client.close()
