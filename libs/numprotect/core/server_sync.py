"""The sync member of the bootstrap family: grpcio's thread-pool server for hot paths where it is faster.

Same settings (ServerSettings), health names ("" and one per service, NOT_SERVING while Redis is down),
reflection, error mapping (as_domain_error / to_rpc_status, google.rpc details in grpc-status-details-bin),
tracing interceptors only when OTEL_EXPORTER_OTLP_ENDPOINT is set, and SIGTERM/SIGINT drain as `server.py`.
Work that stays async (the service's redis.asyncio client, background tasks, cold RPCs) runs on one event
loop in a background thread (`LoopThread`), built by the same `Runtime`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2

from numprotect.core.errors import DomainError, to_rpc_status
from numprotect.core.interceptors import Behavior, WrappedHandlers, as_domain_error, rewrap
from numprotect.core.logs import configure_logging
from numprotect.core.redis_client import create_redis, redis_is_up
from numprotect.core.server import Runtime, apply_scheduling, freeze_startup, register_and_listen, server_options
from numprotect.core.settings import Env, RedisSettings, ServerSettings, SettingsError
from numprotect.core.telemetry import Telemetry

log = logging.getLogger(__name__)

T = TypeVar("T")
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class LoopThread:
    """An asyncio event loop (uvloop when available) on a daemon thread; `run` waits for a coroutine from any thread."""

    def __init__(self) -> None:
        self.loop = _new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="asyncio-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


@dataclass(frozen=True)
class SyncServiceRegistration:
    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.Server], None]


@dataclass
class SyncServiceParts:
    registrations: list[SyncServiceRegistration]
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)
    # Thread-pool size of the server (concurrent RPCs in Python).
    max_workers: int = 16


class SyncRuntime:
    """What a sync builder receives: the regular `Runtime` (living on `loop`), the loop, and the Redis settings."""

    def __init__(self, runtime: Runtime, loop: LoopThread, redis_settings: RedisSettings) -> None:
        self.runtime = runtime
        self.loop = loop
        self.redis_settings = redis_settings
        self.env = runtime.env
        self.telemetry = runtime.telemetry


SyncBuilder = Callable[[SyncRuntime], SyncServiceParts]


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    error = as_domain_error(exc, method)
    if error is None:
        log.exception("unexpected error", extra={"method": method})
        context.abort(grpc.StatusCode.INTERNAL, "internal error (logged)")
        return
    abort_with_error(context, error)


def abort_with_error(context: grpc.ServicerContext, error: DomainError) -> None:
    """Ends the call with the error's code, message and google.rpc details (raises)."""
    status = to_rpc_status(error)
    context.set_trailing_metadata(((_STATUS_DETAILS_KEY, status.SerializeToString()),))
    context.abort(error.code, error.message)


class SyncErrorMappingInterceptor(grpc.ServerInterceptor):
    """The sync twin of interceptors.ErrorMappingInterceptor: DomainError -> status with details."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers(_wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        wrapped: grpc.RpcMethodHandler | None = self._wrapped.get(
            continuation(handler_call_details), handler_call_details.method
        )
        return wrapped


def _wrap(handler: Any, method: str) -> grpc.RpcMethodHandler:
    def wrap_unary(behavior: Behavior) -> Behavior:
        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            except Exception as exc:
                _abort(context, exc, method)

        return unary

    def wrap_stream(behavior: Behavior) -> Behavior:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except Exception as exc:
                _abort(context, exc, method)

        return stream

    return rewrap(handler, wrap_unary, wrap_stream)


def _tracing_interceptors(telemetry: Telemetry) -> list[grpc.ServerInterceptor]:
    # The same interceptor and filter (no health, no reflection) as the aio bootstrap; [] when tracing is off.
    return telemetry.sync_server_interceptors()


class SyncServiceApp:
    """A running grpcio thread-pool server with health, reflection and interceptors around the given services."""

    def __init__(
        self,
        settings: ServerSettings,
        registrations: Sequence[SyncServiceRegistration],
        *,
        probe: Callable[[], bool] | None,
        telemetry: Telemetry,
        max_workers: int = 16,
    ) -> None:
        self.settings = settings
        self.registrations = list(registrations)
        self.probe = probe
        self.health = health.HealthServicer()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-worker"),
            interceptors=[*_tracing_interceptors(telemetry), SyncErrorMappingInterceptor()],
            options=server_options(settings.reuse_port),
        )
        self.port = 0
        self._stop_probe = threading.Event()
        self._probe_thread: threading.Thread | None = None

    @property
    def health_names(self) -> list[str]:
        return ["", *(r.full_name for r in self.registrations)]

    def start(self) -> int:
        self.port = register_and_listen(self.server, self.settings, self.registrations, self.health)
        self.server.start()
        self._set_all(self._up())
        self._probe_thread = threading.Thread(target=self._probe_loop, name="health-probe", daemon=True)
        self._probe_thread.start()
        return self.port

    def _up(self) -> bool:
        if self.probe is None:
            return True
        try:
            return self.probe()
        except Exception:
            return False

    def _set_all(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.health_names:
            self.health.set(name, status)

    def _probe_loop(self) -> None:
        serving: bool | None = None
        while not self._stop_probe.wait(0 if serving is None else self.settings.health_interval_seconds):
            up = self._up()
            if up != serving:
                if serving is not None:
                    log.warning("redis %s", "reachable again" if up else "unreachable: NOT_SERVING")
                self._set_all(up)
                serving = up

    def stop(self) -> None:
        """Drain: NOT_SERVING first, then grace for in-flight calls."""
        self._stop_probe.set()
        if self._probe_thread is not None:
            self._probe_thread.join(timeout=5)
        self.health.enter_graceful_shutdown()
        self.server.stop(self.settings.grace_seconds).wait()


def serve_sync(service: str, builder: SyncBuilder, environ: Mapping[str, str]) -> None:
    """Builds the service, serves it until SIGTERM or SIGINT, then drains and closes everything."""
    env = Env(environ)
    server_settings = ServerSettings.from_env(env, service)
    redis_settings = RedisSettings.from_env(env)
    apply_scheduling(server_settings)
    telemetry = Telemetry.from_env(environ, f"numprotect-{service}")
    loop = LoopThread()

    async def make_runtime() -> Runtime:  # the async client binds to the loop that creates it
        return Runtime(env, server_settings, create_redis(redis_settings), telemetry)

    runtime = loop.run(make_runtime())
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    parts: SyncServiceParts | None = None
    try:
        parts = builder(SyncRuntime(runtime, loop, redis_settings))
        app = SyncServiceApp(
            server_settings,
            parts.registrations,
            probe=lambda: loop.run(redis_is_up(runtime.redis), timeout=5),
            telemetry=telemetry,
            max_workers=parts.max_workers,
        )
        port = app.start()
        collector = freeze_startup(server_settings)
        log.info(
            "serving",
            extra={"port": port, "host": server_settings.host, "pid": os.getpid(), "model": "sync", **collector},
        )
        while not stop.wait(1.0):
            pass
        log.info("draining", extra={"grace_seconds": server_settings.grace_seconds})
        app.stop()
    finally:
        for close in parts.on_shutdown if parts is not None else []:
            close()
        loop.run(runtime.close(), timeout=10)
        loop.stop()
        telemetry.shutdown()
    log.info("stopped")


def run_service_sync(service: str, builder: SyncBuilder) -> None:
    """Process entry point of a sync-model service: settings errors end start-up with one line and exit 2."""
    environ = dict(os.environ)
    try:
        level = Env(environ).choice("NUMPROTECT_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
        configure_logging(service, level)
        serve_sync(service, builder, environ)
    except SettingsError as exc:
        print(f"numprotect-{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
