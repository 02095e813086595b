"""The one server bootstrap every service uses.

grpc.aio server with: standard health (overall "" and one status per service, NOT_SERVING while Redis
is unreachable), server reflection, the error-mapping interceptor, OpenTelemetry interceptors, and a
SIGTERM/SIGINT drain: health turns NOT_SERVING, in-flight calls get the grace period, then the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from numprotect.core.gc_tuning import freeze_startup_heap
from numprotect.core.interceptors import ErrorMappingInterceptor
from numprotect.core.logs import configure_logging
from numprotect.core.redis_client import RedisClient, create_redis, redis_is_up
from numprotect.core.scheduling import apply_cpu_scheduling
from numprotect.core.settings import Env, RedisSettings, ServerSettings, SettingsError, service_address
from numprotect.core.telemetry import Telemetry

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = "grpc.health.v1.Health"


def register_and_listen(server: Any, settings: ServerSettings, registrations: Sequence[Any], health: Any) -> int:
    """Adds the services, health and reflection to a (sync or aio) server and binds its port; returns the port.

    A port that cannot be bound is a SettingsError naming the variable, like every other bad setting.
    """
    for registration in registrations:
        registration.add_to_server(registration.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*(r.full_name for r in registrations), HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{settings.host}:{settings.port}"
    try:
        port: int = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise SettingsError(
            f"NUMPROTECT_{settings.service.upper()}_PORT: cannot listen on {address} (port busy?)"
        ) from exc
    return port


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to serve: its full name (for health and reflection) and how to add it."""

    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


@dataclass
class ServiceParts:
    """What a service's builder returns: its gRPC services and what to close on shutdown."""

    registrations: list[ServiceRegistration]
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def apply_scheduling(settings: ServerSettings) -> None:
    """NUMPROTECT_CPU_SCHEDULING on every thread, before the server starts more; a refusal only costs speed."""
    try:
        threads = apply_cpu_scheduling(settings.cpu_scheduling)
    except OSError as exc:
        log.warning("cpu scheduling not applied", extra={"policy": settings.cpu_scheduling, "error": str(exc)})
        return
    log.debug("cpu scheduling applied", extra={"policy": settings.cpu_scheduling, "threads": threads})


def freeze_startup(settings: ServerSettings) -> dict[str, int]:
    """The start-up heap frozen and the young-collection threshold raised (gc_tuning); fields for the log line."""
    state = freeze_startup_heap(settings.gc_gen0_threshold)
    return {"gc_frozen_objects": state.frozen_objects, "gc_gen0_threshold": state.thresholds[0]}


def server_options(reuse_port: bool) -> list[tuple[str, Any]]:
    return [
        # grpcio enables SO_REUSEPORT by default: a stale server on the port would silently take traffic.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


# How long a draining server waits for its health probe to end (one PING, bounded by NUMPROTECT_REDIS_TIMEOUT).
_PROBE_STOP_SECONDS = 5.0


class ServiceApp:
    """A running grpc.aio server with health, reflection and interceptors around the given services."""

    def __init__(
        self,
        settings: ServerSettings,
        registrations: Sequence[ServiceRegistration],
        *,
        redis: RedisClient | None,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.registrations = list(registrations)
        self.redis = redis
        self.telemetry = telemetry
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.server = grpc.aio.server(
            interceptors=[*telemetry.server_interceptors(), ErrorMappingInterceptor()],
            options=server_options(settings.reuse_port),
        )
        self.port = 0
        self._probe_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def health_names(self) -> list[str]:
        return ["", *(r.full_name for r in self.registrations)]

    async def start(self) -> int:
        self.port = register_and_listen(self.server, self.settings, self.registrations, self.health)
        await self.server.start()
        await self._set_all(await self._dependencies_up())
        self._probe_task = asyncio.create_task(self._probe_dependencies(), name="health-probe")
        return self.port

    async def _dependencies_up(self) -> bool:
        return True if self.redis is None else await redis_is_up(self.redis)

    async def _set_all(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.health_names:
            await self.health.set(name, status)

    async def _probe_dependencies(self) -> None:
        serving: bool | None = None
        while not self._stopping:
            up = await self._dependencies_up()
            if up != serving:
                if serving is not None:
                    log.warning("redis %s", "reachable again" if up else "unreachable: NOT_SERVING")
                await self._set_all(up)
                serving = up
            await asyncio.sleep(self.settings.health_interval_seconds)

    async def stop(self) -> None:
        """Drain: NOT_SERVING first (load balancers stop sending), then grace for in-flight calls."""
        self._stopping = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            # Bounded, and the flag above ends the loop at its next turn: the cancellation can get lost inside the
            # probe's PING. redis.asyncio bounds its socket writes with asyncio.wait_for, which on Python 3.11
            # swallows a cancellation that lands as the write completes (CPython gh-86296, fixed in 3.12). Seen as
            # a SIGTERM right after start-up leaving the service waiting here for ever.
            _, pending = await asyncio.wait({self._probe_task}, timeout=_PROBE_STOP_SECONDS)
            if pending:
                log.warning("health probe still running at shutdown; not waiting for it")
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_seconds)


class Runtime:
    """The dependencies a service builder receives: settings, Redis, telemetry and channels to peers."""

    def __init__(self, env: Env, server: ServerSettings, redis: RedisClient | None, telemetry: Telemetry) -> None:
        self.env = env
        self.server = server
        self.telemetry = telemetry
        self._redis = redis
        self._channels: list[grpc.aio.Channel] = []
        if redis is not None:
            # Redis CLIENT spans inside traced calls (a no-op when tracing is off).
            telemetry.instrument_redis(redis)

    @property
    def redis(self) -> RedisClient:
        if self._redis is None:
            raise RuntimeError("this service was started without Redis")
        return self._redis

    def channel(self, service: str) -> grpc.aio.Channel:
        """A channel to another numprotect service (NUMPROTECT_<SERVICE>_ADDR), traced when tracing is on."""
        return self.channel_to(service_address(self.env, service))

    def channel_to(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address, interceptors=self.telemetry.client_interceptors())
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(grace=None)
        if self._redis is not None:
            await self._redis.aclose()


Builder = Callable[[Runtime], Awaitable[ServiceParts]]


async def serve(service: str, builder: Builder, environ: Mapping[str, str], *, use_redis: bool = True) -> None:
    """Builds the service, serves it until SIGTERM or SIGINT, then drains and closes everything."""
    env = Env(environ)
    server_settings = ServerSettings.from_env(env, service)
    apply_scheduling(server_settings)
    redis = create_redis(RedisSettings.from_env(env)) if use_redis else None
    telemetry = Telemetry.from_env(environ, f"numprotect-{service}")
    runtime = Runtime(env, server_settings, redis, telemetry)
    parts = await builder(runtime)
    app = ServiceApp(server_settings, parts.registrations, redis=redis, telemetry=telemetry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        port = await app.start()
        collector = freeze_startup(server_settings)
        log.info("serving", extra={"port": port, "host": server_settings.host, "pid": os.getpid(), **collector})
        await stop.wait()
        log.info("draining", extra={"grace_seconds": server_settings.grace_seconds})
        await app.stop()
    finally:
        for close in parts.on_shutdown:
            await close()
        await runtime.close()
        telemetry.shutdown()
    log.info("stopped")


def run_service(service: str, builder: Builder, *, use_redis: bool = True) -> None:
    """Process entry point: settings errors end start-up with one line and exit status 2."""
    environ = dict(os.environ)
    try:
        level = Env(environ).choice("NUMPROTECT_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
        configure_logging(service, level)
        _install_event_loop_policy()
        asyncio.run(serve(service, builder, environ, use_redis=use_redis))
    except SettingsError as exc:
        print(f"numprotect-{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional on platforms without wheels
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
