"""The one server bootstrap: every service starts here, on grpc.aio or on grpcio's thread-pool server.

What every service gets, whichever model: settings from the environment validated at start-up (one line and
exit status 2 on a bad one), JSON logs, CPU scheduling and the frozen start-up heap, standard `grpc.health.v1`
health ("" and one name per service, NOT_SERVING while Redis is unreachable: `health.HealthProbe`; "liveness",
SERVING while the process answers, for Kubernetes' liveness probe), server
reflection (NUMPROTECT_REFLECTION), the one per-method layer (`calls`: errors to status codes, spans, identity),
and a SIGTERM/SIGINT drain: health turns NOT_SERVING, in-flight calls get the grace period, then the service's
own shutdown hooks, channels, Redis and the trace exporter close.

The two models differ only where they must: `AioServiceApp` (every service but translation) and
`SyncServiceApp` (translation's hot path: faster per call here, docs/architecture.md) own their grpc server,
their health servicer and the way a health change reaches it. A builder gets a `Runtime` (redis.asyncio client,
traced channels to peers) or a `SyncRuntime` (blocking redis-py client) and returns `ServiceParts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from numprotect.core.calls import AioCallLayer, CallConcern, SyncCallLayer
from numprotect.core.gc_tuning import freeze_startup_heap
from numprotect.core.health import HealthProbe
from numprotect.core.identity.api_keys import AuthSettings
from numprotect.core.identity.runtime import Identity
from numprotect.core.identity.service_token import ServiceToken
from numprotect.core.limits import AdmissionExecutor, AioAdmission, PoolAdmission
from numprotect.core.logs import configure_logging
from numprotect.core.metrics import Metrics
from numprotect.core.metrics.exposition import MetricsEndpoint, register_process_metrics
from numprotect.core.metrics.grpc_server import GrpcServerMetrics
from numprotect.core.redis_client import (
    RedisClient,
    SyncRedisClient,
    create_redis,
    create_sync_redis,
    observe_round_trips,
    redis_is_up,
    sync_redis_is_up,
)
from numprotect.core.scheduling import apply_cpu_scheduling
from numprotect.core.settings import (
    Env,
    RedisSettings,
    ServerSettings,
    SettingsError,
    server_port_variable,
    service_address,
)
from numprotect.core.telemetry import Telemetry
from numprotect.core.tls import TlsSettings, channel_credentials, peer_spiffe_id, server_credentials

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
# The health name of liveness: SERVING from start until the drain whatever Redis does, answered by the server's own
# loop (grpc.aio) or thread pool, so it fails only when the process cannot answer. Readiness ("" and each service)
# follows Redis: a Redis outage takes pods out of the Services without Kubernetes restarting every one of them.
LIVENESS_NAME = "liveness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to serve: its full name (for health and reflection) and how to add it to a server."""

    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, Any], None]


ShutdownHook = Callable[[], Awaitable[None] | None]


@dataclass
class ServiceParts:
    """What a builder returns: its gRPC services and what to close on shutdown (awaited when it returns an
    awaitable). `max_workers` sizes the thread-pool server (concurrent calls in Python; unused on grpc.aio).
    `ready`: what readiness needs besides Redis (the SIP adapter: a translation stream up, not draining); health
    is NOT_SERVING while it returns False. The probe thread calls it: cheap, and safe to call off the loop.
    `ready_means`: what `ready` checks, for the health log ("not ready: NOT_SERVING, <service> needs <ready_means>").
    `on_drain`: called when the stop signal comes, before the gRPC server's grace period (the SIP adapter then
    refuses new INVITEs at once instead of for the whole grace)."""

    registrations: list[ServiceRegistration]
    on_shutdown: list[ShutdownHook] = field(default_factory=list)
    max_workers: int = 16
    ready: Callable[[], bool] | None = None
    ready_means: str = ""
    on_drain: list[Callable[[], None]] = field(default_factory=list)


PENDING_CALLS_LIMIT = 100_000


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    return [
        # grpcio enables SO_REUSEPORT by default: a stale server on the port would silently take traffic.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        # A larger message is refused with RESOURCE_EXHAUSTED before it is parsed.
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Calls that reached grpc's core and wait for Python to take them (both models take one at a time). Past
        # grpc's default (1,000) core cancels arriving calls: the client gets CANCELLED with no hint, which was
        # most of the CANCELLED answers of a 5,000-call burst. The call layer sheds load instead, with
        # RESOURCE_EXHAUSTED and a retry hint; what core holds is bounded by streams per connection anyway.
        ("grpc.server.max_pending_requests", PENDING_CALLS_LIMIT),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_LIMIT),
        # Then GOAWAY; open streams get a minute to end (WatchCdrs and TranslateStream clients resume on a new
        # connection, with their cursor).
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", 60_000),
    ]


# Channels to peers (binding -> allocation) try to reconnect at most this often while the peer is down. grpc's
# defaults (1 s first, x1.6 up to 120 s) left binding failing for seconds after a restarted allocation was SERVING
# again; on a cluster network a connection attempt every 250 ms to one peer costs nothing. grpc also takes
# min_reconnect_backoff as each attempt's connect timeout (TCP + TLS + the peer's SETTINGS): at 100 ms a peer slow
# to answer (CPU-starved) failed every call at once, so it stays seconds; a refused connect still retries at 100 ms.
PEER_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 5000),
    ("grpc.max_reconnect_backoff_ms", 250),
]


def call_concerns(
    telemetry: Telemetry, identity: Identity, grpc_metrics: GrpcServerMetrics | None = None
) -> list[CallConcern]:
    """The cross-cutting concerns of every call, in the order they enter, for both server models: the one place a
    new per-method concern is added. The gRPC server metrics first (when metrics are on), so the handling time
    covers the other concerns and a call they refuse is counted with its code; then spans, so that a call another
    concern refuses is traced too; then identity (who calls, may they, the audit trail)."""
    first: list[CallConcern] = [grpc_metrics] if grpc_metrics is not None else []
    return [*first, *telemetry.call_concerns(), *identity.concerns()]


def _listen(
    server: Any, settings: ServerSettings, tls: TlsSettings, registrations: Sequence[ServiceRegistration], health: Any
) -> int:
    """Adds the services, health and reflection to a server of either model and binds its port, with TLS unless
    NUMPROTECT_TLS=off; returns the port.

    A port that cannot be bound is a SettingsError naming the variable, like every other bad setting.
    """
    for registration in registrations:
        registration.add_to_server(registration.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.reflection:  # any authenticated principal may list the contracts (policy table)
        reflection.enable_server_reflection(
            [*(r.full_name for r in registrations), HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
        )
    address = f"{settings.host}:{settings.port}"
    try:
        port: int = (
            server.add_secure_port(address, server_credentials(tls))
            if tls.enabled
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise SettingsError(
            f"{server_port_variable(settings.service)}: cannot listen on {address} (port busy?)"
        ) from exc
    if not tls.enabled:  # an explicit opt-out: anyone on the network reads and sends calls on this port
        log.warning("TLS is off (NUMPROTECT_TLS=off): the port serves plaintext", extra={"port": port})
    return port


def _listen_health(server: Any, settings: ServerSettings, health: Any) -> int:
    """The plaintext port of Kubernetes' gRPC probe (NUMPROTECT_HEALTH_PORT): grpc.health.v1 only, nothing else."""
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{settings.host}:{settings.health_port}"
    try:
        port: int = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise SettingsError(f"NUMPROTECT_HEALTH_PORT: cannot listen on {address} (port busy?)") from exc
    return port


class ClientGoneFilter(logging.Filter):
    """grpc.aio logs ERROR "ExecuteBatchError raised in core by servicer method [...]" with a traceback when a call's
    answer cannot be written because core already ended the call (the client cancelled or its deadline passed)
    before the cancellation reached the event loop: seen by the hundred in a 5,000-call burst. The client went
    away; nothing failed in the servicer. Such a line is kept at INFO, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith("ExecuteBatchError raised in core"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_client_gone_errors() -> None:
    """Installs `ClientGoneFilter` on grpc.aio's logger (once)."""
    grpc_logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, ClientGoneFilter) for f in grpc_logger.filters):
        grpc_logger.addFilter(ClientGoneFilter())


class _ServiceApp:
    """What both server models hold: settings, services, the bound port, the health probe; and how they are built."""

    def __init__(
        self,
        settings: ServerSettings,
        registrations: Sequence[ServiceRegistration],
        *,
        probe: Callable[[], bool] | None,
        telemetry: Telemetry,
        identity: Identity,
        tls: TlsSettings,
        max_workers: int = 16,
        metrics: Metrics | None = None,
        ready: Callable[[], bool] | None = None,
        ready_means: str = "",
    ) -> None:
        """`max_workers` sizes the thread-pool server's pool (concurrent calls in Python); grpc.aio has none.
        `metrics`: the process's (runtime.metrics); without it, or with metrics off, no /metrics port and no
        metrics concern. `ready`, `ready_means`: ServiceParts' (readiness needs it too, besides the probe)."""
        self.settings = settings
        self.tls = tls
        self.registrations = list(registrations)
        self.port = 0
        # The plaintext health-only port, when NUMPROTECT_HEALTH_PORT asks for one (its server: `health_server`).
        self.health_port = 0
        self.metrics = metrics if metrics is not None else Metrics(settings.service, enabled=False)
        grpc_metrics: GrpcServerMetrics | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        if self.metrics.enabled:
            register_process_metrics(self.metrics)
            grpc_metrics = GrpcServerMetrics(self.metrics)
            grpc_metrics.preinitialise(r.full_name for r in self.registrations)
            self.metrics_endpoint = MetricsEndpoint(self.metrics, settings.metrics_host, settings.metrics_port)
        self.calls_shed = self.metrics.counter(
            "numprotect_calls_shed", "Calls refused by load shedding (RESOURCE_EXHAUSTED), by reason.", ("reason",)
        )
        redis_up = self.metrics.gauge("numprotect_redis_up", "1 while Redis answers the health probe's PING, else 0.")
        check = probe or (lambda: True)

        def probed() -> bool | str:
            """True, or what is not ready: the health probe logs it."""
            up = False
            try:
                up = check()
            finally:
                redis_up.set(1 if up else 0)
            if not up:
                return "redis unreachable"
            if ready is not None and not ready():
                service = settings.service
                return f"{service} needs {ready_means}" if ready_means else f"{service}'s own readiness check failed"
            return True

        self._probe = HealthProbe(probed, self._publish, settings.health_interval_seconds)
        self.call_concerns = call_concerns(telemetry, identity, grpc_metrics)
        self._build(self.call_concerns, server_options(settings), max_workers)

    @property
    def metrics_port(self) -> int:
        """The bound /metrics port once started (0: metrics off)."""
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else 0

    def _start_metrics(self) -> None:
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.start()

    def _stop_metrics(self) -> None:
        """Last, after the drain: a scrape during it still sees the final counts."""
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()

    @property
    def health_names(self) -> list[str]:
        """ "" (the whole server) and each service: the names health answers for."""
        return ["", *(r.full_name for r in self.registrations)]

    def _build(self, concerns: list[CallConcern], options: list[tuple[str, Any]], max_workers: int) -> None:
        """Makes the model's health servicer and server with the call layer."""
        raise NotImplementedError

    def _publish(self, serving: bool) -> None:
        raise NotImplementedError


class AioServiceApp(_ServiceApp):
    """A grpc.aio server with health, reflection and the call layer around the given services."""

    def _build(self, concerns: list[CallConcern], options: list[tuple[str, Any]], max_workers: int) -> None:
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.admission = AioAdmission(self.settings, shed=self.calls_shed)
        # The layer wraps the handlers as they are registered, not per call as an interceptor (calls.LayeredServer).
        self.server = AioCallLayer(concerns, self.admission).install(grpc.aio.server(options=options))
        self.health_server = grpc.aio.server(options=options) if self.settings.health_port else None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _publish(self, serving: bool) -> None:
        """From the probe thread: the new status set on the loop that owns the health servicer."""
        assert self._loop is not None
        done = asyncio.run_coroutine_threadsafe(self._set_all(serving), self._loop)
        done.result(timeout=10)

    async def _set_all(self, serving: bool) -> None:
        for name in self.health_names:
            await self.health.set(name, _SERVING if serving else _NOT_SERVING)

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        await self.health.set(LIVENESS_NAME, _SERVING)
        self.port = _listen(self.server, self.settings, self.tls, self.registrations, self.health)
        if self.health_server is not None:
            self.health_port = _listen_health(self.health_server, self.settings, self.health)
        self._start_metrics()
        # The first check blocks (off the loop, which publishes it) and its status is set before the port takes calls.
        await asyncio.to_thread(self._probe.start)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        return self.port

    async def stop(self) -> None:
        """Drain: NOT_SERVING first (load balancers stop sending), then grace for in-flight calls."""
        await asyncio.to_thread(self._probe.stop)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_seconds)
        if self.health_server is not None:  # last: the probe reads NOT_SERVING during the drain
            await self.health_server.stop(None)
        await asyncio.to_thread(self._stop_metrics)


class SyncServiceApp(_ServiceApp):
    """A grpcio thread-pool server with health, reflection and the call layer around the given services."""

    def _build(self, concerns: list[CallConcern], options: list[tuple[str, Any]], max_workers: int) -> None:
        self.health = health.HealthServicer()  # Watch is non-blocking: open watches hold no worker thread
        executor = AdmissionExecutor(max_workers, thread_name_prefix="grpc-worker")
        self.admission = PoolAdmission(self.settings, executor, max_workers, shed=self.calls_shed)
        self.server = grpc.server(executor, interceptors=[SyncCallLayer(concerns, self.admission)], options=options)
        self.health_server = (
            grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-health"), options=options)
            if self.settings.health_port
            else None
        )

    def _publish(self, serving: bool) -> None:
        for name in self.health_names:
            self.health.set(name, _SERVING if serving else _NOT_SERVING)

    def start(self) -> int:
        self.health.set(LIVENESS_NAME, _SERVING)
        self.port = _listen(self.server, self.settings, self.tls, self.registrations, self.health)
        if self.health_server is not None:
            self.health_port = _listen_health(self.health_server, self.settings, self.health)
        self._start_metrics()
        self._probe.start()  # the first status is set before the port takes calls
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        return self.port

    def stop(self) -> None:
        """Drain: NOT_SERVING first, then grace for in-flight calls."""
        self._probe.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.settings.grace_seconds).wait()
        self.admission.close()
        if self.health_server is not None:  # last: the probe reads NOT_SERVING during the drain
            self.health_server.stop(None).wait()
        self._stop_metrics()


class Runtime:
    """What an aio builder receives: settings, a redis.asyncio client, telemetry and traced channels to peers."""

    def __init__(
        self,
        env: Env,
        server: ServerSettings,
        redis: RedisClient,
        telemetry: Telemetry,
        redis_settings: RedisSettings,
        *,
        tls: TlsSettings,
        identity: Identity,
        metrics: Metrics,
    ) -> None:
        self.env = env
        self.identity = identity
        self.metrics = metrics
        self.server = server
        self.tls = tls
        self.telemetry = telemetry
        self.redis_settings = redis_settings
        self.redis = redis
        # This service's own credential on its calls to peers (NUMPROTECT_SERVICE_TOKEN_FILE, read once here).
        self.service_token = ServiceToken.from_env(env)
        self._channels: list[grpc.aio.Channel] = []
        # Redis CLIENT spans inside traced calls (a no-op when tracing is off), then its round trips (metrics on).
        telemetry.instrument_redis(redis)
        if metrics.enabled:
            observe_round_trips(redis, metrics.redis_round_trip("redis-py"))

    def channel(self, service: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A channel to another numprotect service (NUMPROTECT_<SERVICE>_ADDR), traced when tracing is on; `options`
        are grpc channel arguments added to PEER_CHANNEL_OPTIONS."""
        return self.channel_to(service_address(self.env, service), options)

    def channel_to(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """TLS unless NUMPROTECT_TLS=off (in mTLS mode presenting the workload certificate); the certificate files are
        read here, so a channel made after a renewal uses the new ones. Every call carries the service token when
        one is set (call credentials over TLS; an interceptor on plaintext, where grpc refuses call credentials),
        and the trace context when tracing is on (`Telemetry.traced_channel`, no interceptor)."""
        token = self.service_token
        if self.tls.enabled:
            credentials = channel_credentials(self.tls)
            if token is not None:
                credentials = grpc.composite_channel_credentials(credentials, token.call_credentials())
            channel = grpc.aio.secure_channel(address, credentials, options=[*PEER_CHANNEL_OPTIONS, *options])
        else:
            interceptors: list[Any] | None = [token.interceptor()] if token is not None else None
            channel = grpc.aio.insecure_channel(
                address, options=[*PEER_CHANNEL_OPTIONS, *options], interceptors=interceptors
            )
        traced = self.telemetry.traced_channel(channel)
        self._channels.append(traced)
        return traced

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(grace=None)
        await self.redis.aclose()


@dataclass
class SyncRuntime:
    """What a thread-pool builder receives: settings, a blocking redis-py client and telemetry."""

    env: Env
    server: ServerSettings
    redis_settings: RedisSettings
    redis: SyncRedisClient
    telemetry: Telemetry
    identity: Identity
    metrics: Metrics

    def __post_init__(self) -> None:
        # Redis CLIENT spans inside traced calls (a no-op when tracing is off), then its round trips (metrics on).
        self.telemetry.instrument_redis(self.redis)
        if self.metrics.enabled:
            observe_round_trips(self.redis, self.metrics.redis_round_trip("redis-py"))

    def close(self) -> None:
        self.redis.close()


Builder = Callable[[Runtime], Awaitable[ServiceParts]]
SyncBuilder = Callable[[SyncRuntime], ServiceParts]


@dataclass(frozen=True)
class _Startup:
    """What both models read and set up before building the service."""

    env: Env
    server: ServerSettings
    redis: RedisSettings
    telemetry: Telemetry
    tls: TlsSettings
    auth: AuthSettings
    metrics: Metrics

    @classmethod
    def from_env(cls, service: str, environ: Mapping[str, str]) -> _Startup:
        env = Env(environ)
        server = ServerSettings.from_env(env, service)
        redis = RedisSettings.from_env(env)
        tls = TlsSettings.from_env(env)
        auth = AuthSettings.from_env(env)
        try:
            policy_threads = apply_cpu_scheduling(server.cpu_scheduling)
            log.debug("cpu scheduling applied", extra={"policy": server.cpu_scheduling, "threads": policy_threads})
        except OSError as exc:  # a refusal only costs speed
            log.warning("cpu scheduling not applied", extra={"policy": server.cpu_scheduling, "error": str(exc)})
        telemetry = Telemetry.from_env(environ, f"numprotect-{service}")
        return cls(env, server, redis, telemetry, tls, auth, Metrics(service, enabled=server.metrics))

    def identity(self) -> Identity:
        """The identity parts; in mTLS mode a call without a bearer token is the client certificate's principal."""
        peer = peer_spiffe_id if self.tls.enabled and self.tls.client_auth == "require" else None
        return Identity(self.auth, self.redis, peer_identity=peer, metrics=self.metrics)

    def serving(self, app: _ServiceApp, model: str) -> None:
        """Freezes the start-up heap (gc_tuning) and logs the line tests and operators wait for."""
        port = app.port
        collector = freeze_startup_heap(self.server.gc_gen0_threshold)
        log.info(
            "serving",
            extra={
                "port": port,
                "host": self.server.host,
                "pid": os.getpid(),
                "model": model,
                # "on" or "off"; with TLS on, client certificates: "none" (TLS) or "require" (mTLS).
                "tls": "on" if self.tls.enabled else "off",
                "client_certificates": self.tls.client_auth if self.tls.enabled else "none",
                "health_port": self.server.health_port,
                # Where Prometheus scrapes this process (None: NUMPROTECT_METRICS=off).
                "metrics_url": app.metrics_endpoint.url if app.metrics_endpoint is not None else None,
                "max_inflight_calls": self.server.max_inflight_calls,
                "max_queued_calls": self.server.max_queued_calls,
                "max_queue_wait_seconds": self.server.max_queue_wait_seconds,
                "gc_frozen_objects": collector.frozen_objects,
                "gc_gen0_threshold": collector.thresholds[0],
            },
        )


def _probe_client(startup: _Startup) -> SyncRedisClient:
    """The health probe's own blocking client: a PING never waits behind the service's calls for a connection."""
    return create_sync_redis(startup.redis, max_connections=2)


async def serve(service: str, builder: Builder, environ: Mapping[str, str]) -> None:
    """grpc.aio: builds the service, serves it until SIGTERM or SIGINT, then drains and closes everything."""
    startup = _Startup.from_env(service, environ)
    quiet_client_gone_errors()
    probe_client = _probe_client(startup)
    identity = startup.identity()
    runtime = Runtime(
        startup.env,
        startup.server,
        create_redis(startup.redis),
        startup.telemetry,
        startup.redis,
        tls=startup.tls,
        identity=identity,
        metrics=startup.metrics,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parts: ServiceParts | None = None
    try:
        # The first command loads a cluster client's slot map, before the builder's and the calls' commands run
        # concurrently (a fresh redis.asyncio cluster client can fail some of those, redis-py 8.1.0). Whether
        # Redis is up is the probe's to say, so the answer is not used here.
        await redis_is_up(runtime.redis)
        await asyncio.to_thread(identity.start)
        parts = await builder(runtime)
        app = AioServiceApp(
            startup.server,
            parts.registrations,
            probe=lambda: sync_redis_is_up(probe_client),
            telemetry=startup.telemetry,
            identity=identity,
            tls=startup.tls,
            metrics=startup.metrics,
            ready=parts.ready,
            ready_means=parts.ready_means,
        )
        await app.start()
        startup.serving(app, "aio")
        await stop.wait()
        log.info("draining", extra={"grace_seconds": startup.server.grace_seconds})
        for drain in parts.on_drain:
            drain()
        await app.stop()
    finally:
        for hook in parts.on_shutdown if parts is not None else []:
            outcome = hook()
            if inspect.isawaitable(outcome):
                await outcome
        await runtime.close()
        await asyncio.to_thread(identity.stop)
        probe_client.close()
        startup.telemetry.shutdown()
    log.info("stopped")


class StopRequest:
    """SIGTERM and SIGINT for the thread-pool model: the handler writes a byte to a pipe that wait() reads.

    Python runs a handler in the main thread between two bytecodes, also while that thread holds a lock, and again
    inside a handler still running. A handler taking a lock (threading.Event.set) there waited for itself: the
    process hung, or under repeated SIGTERMs nested handler in handler until RecursionError. os.write takes none.
    The pipe stays open for the process's life: a late signal must never write to a reused descriptor."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe holds a request already
            os.write(self._write_fd, b"\0")

    def wait(self) -> None:
        """Returns once a stop was requested (a read interrupted by the signal resumes after its handler)."""
        os.read(self._read_fd, 1)


def serve_sync(service: str, builder: SyncBuilder, environ: Mapping[str, str]) -> None:
    """grpcio's thread-pool server: builds the service, serves it until SIGTERM or SIGINT, then drains and closes."""
    startup = _Startup.from_env(service, environ)
    identity = startup.identity()
    runtime = SyncRuntime(
        startup.env,
        startup.server,
        startup.redis,
        create_sync_redis(startup.redis),
        startup.telemetry,
        identity,
        startup.metrics,
    )
    probe_client = _probe_client(startup)
    stop = StopRequest()
    parts: ServiceParts | None = None
    try:
        identity.start()
        parts = builder(runtime)
        app = SyncServiceApp(
            startup.server,
            parts.registrations,
            probe=lambda: sync_redis_is_up(probe_client),
            telemetry=startup.telemetry,
            identity=identity,
            tls=startup.tls,
            max_workers=parts.max_workers,
            metrics=startup.metrics,
            ready=parts.ready,
            ready_means=parts.ready_means,
        )
        app.start()
        startup.serving(app, "sync")
        stop.wait()
        log.info("draining", extra={"grace_seconds": startup.server.grace_seconds})
        for drain in parts.on_drain:
            drain()
        app.stop()
    finally:
        for hook in parts.on_shutdown if parts is not None else []:
            hook()
        runtime.close()
        identity.stop()
        probe_client.close()
        startup.telemetry.shutdown()
    log.info("stopped")


def run_service(service: str, builder: Builder) -> None:
    """Process entry point of a grpc.aio service (uvloop when installed)."""
    _run(service, lambda environ: _run_aio(service, builder, environ))


def run_sync_service(service: str, builder: SyncBuilder) -> None:
    """Process entry point of a thread-pool service."""
    _run(service, lambda environ: serve_sync(service, builder, environ))


def _run(service: str, serve_with: Callable[[Mapping[str, str]], None]) -> None:
    """Logging first, then the model's serve; a settings error ends start-up with one line and exit status 2."""
    environ = dict(os.environ)
    try:
        level = Env(environ).choice("NUMPROTECT_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
        configure_logging(service, level)
        serve_with(environ)
        # Stopped: what is left is the interpreter's exit, which restores the default handlers. A repeated SIGTERM
        # (an orchestrator's, or a test's stop after its own) must not turn that clean exit into death by signal.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    except SettingsError as exc:
        print(f"numprotect-{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_aio(service: str, builder: Builder, environ: Mapping[str, str]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional on platforms without wheels
        asyncio.run(serve(service, builder, environ))
        return
    uvloop.run(serve(service, builder, environ))
