"""Load shedding in the call layer (limits.AioAdmission, limits.PoolAdmission) on both server models.

A burst far past a server's capacity on one channel gets only OK, RESOURCE_EXHAUSTED (naming the limit, with
google.rpc.RetryInfo) or UNAVAILABLE, never CANCELLED or DEADLINE_EXCEEDED; what is admitted is served; the server
stays SERVING; a queued call whose deadline cannot be met is refused before it, not left to die.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from numprotect.core.calls import AioCallLayer, SyncCallLayer
from numprotect.core.limits import AdmissionExecutor, AioAdmission, PoolAdmission
from numprotect.core.server import quiet_client_gone_errors, server_options
from numprotect.core.settings import Env, ServerSettings

SERVICE = "test.Overload"
SHED = {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
BURST = 2000
DEADLINE_SECONDS = 10.0  # generous: the box is shared; what is measured is the codes, not the speed
WORKERS = 4


def _settings(**env: str) -> ServerSettings:
    return ServerSettings.from_env(Env({f"NUMPROTECT_{k.upper()}": v for k, v in env.items()}), "binding")


@dataclass
class Server:
    channel: grpc.aio.Channel
    model: str
    slow_started: list[None]  # one entry per Slow call a worker (or the loop) began


async def _until_slow_calls_run(server: Server, count: int) -> None:
    """Waits until `count` Slow calls hold their places (a fixed pause was sometimes too short on a loaded host)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while len(server.slow_started) < count:
        assert time.monotonic() < deadline, f"{len(server.slow_started)} of {count} Slow calls started"
        await asyncio.sleep(0.01)


def _handlers(slow: Any, fast: Any) -> grpc.GenericRpcHandler:
    identity = {"request_deserializer": None, "response_serializer": None}
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Slow": grpc.unary_unary_rpc_method_handler(slow, **identity),
            "Fast": grpc.unary_unary_rpc_method_handler(fast, **identity),
        },
    )


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    """Starts a server of a model with load shedding on a port; stops them all at the end."""
    stops: list[Any] = []

    async def start(model: str, settings: ServerSettings, work_seconds: float) -> Server:
        slow_started: list[None] = []
        if model == "aio":

            async def aio_slow(request: bytes, context: Any) -> bytes:
                slow_started.append(None)
                await asyncio.sleep(work_seconds)
                return b"served"

            async def aio_fast(request: bytes, context: Any) -> bytes:
                return b"served"

            # As AioServiceApp serves: the layer installed at registration, not an interceptor.
            aio = AioCallLayer([], AioAdmission(settings)).install(grpc.aio.server(options=server_options(settings)))
            aio.add_generic_rpc_handlers((_handlers(aio_slow, aio_fast),))
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), aio)  # type: ignore[attr-defined]
            port = aio.add_insecure_port("127.0.0.1:0")
            await aio.start()
            stops.append(lambda: aio.stop(0))
        else:

            def sync_slow(request: bytes, context: Any) -> bytes:
                slow_started.append(None)
                time.sleep(work_seconds)
                return b"served"

            def sync_fast(request: bytes, context: Any) -> bytes:
                return b"served"

            executor = AdmissionExecutor(WORKERS, thread_name_prefix="test-worker")
            admission = PoolAdmission(settings, executor, WORKERS)
            sync = grpc.server(executor, interceptors=[SyncCallLayer([], admission)], options=server_options(settings))
            sync.add_generic_rpc_handlers((_handlers(sync_slow, sync_fast),))
            health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), sync)
            port = sync.add_insecure_port("127.0.0.1:0")
            sync.start()

            async def stop_sync() -> None:
                await asyncio.to_thread(lambda: sync.stop(0).wait())
                admission.close()

            stops.append(stop_sync)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stops.append(lambda: channel.close(None))
        return Server(channel, model, slow_started)

    yield start
    for stop in reversed(stops):
        await stop()


async def _answer(channel: grpc.aio.Channel, name: str, deadline: float) -> tuple[str, grpc.aio.AioRpcError | None]:
    method: Any = channel.unary_unary(f"/{SERVICE}/{name}")  # type: ignore[call-arg]
    try:
        await method(b"", timeout=deadline)
    except grpc.aio.AioRpcError as error:
        return error.code().name, error
    return "OK", None


def _retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            delay: float = info.retry_delay.ToTimedelta().total_seconds()
            return delay
    return None


@pytest.mark.parametrize("model", ["aio", "sync"])
async def test_a_burst_on_one_channel_is_shed_and_what_is_admitted_is_served(
    serve: Any, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Capacity far below the burst: 32 calls of 200 ms at once (aio), or 4 workers on calls of 20 ms (sync), both
    # ~160-200 calls/s, and 64 waiting; the calls arrive much faster than that.
    settings = _settings(max_inflight_calls="32", max_queued_calls="64", max_queue_wait="200ms")
    server = await serve(model, settings, 0.2 if model == "aio" else 0.02)
    caplog.set_level(logging.WARNING)
    answers = await asyncio.gather(*(_answer(server.channel, "Slow", DEADLINE_SECONDS) for _ in range(BURST)))
    codes = Counter(code for code, _ in answers)
    assert set(codes) <= SHED, codes
    assert codes["OK"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0, codes
    refused = next(error for code, error in answers if code == "RESOURCE_EXHAUSTED" and error is not None)
    assert "NUMPROTECT_MAX_QUEUE" in (refused.details() or "")
    assert _retry_delay(refused) == 1.0
    # Still serving, and nothing logged as a servicer failure (grpc's own ERROR lines included).
    assert await _answer(server.channel, "Fast", DEADLINE_SECONDS) == ("OK", None)
    reply = await health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any(r.getMessage().startswith("load shed") for r in caplog.records)


async def test_a_queued_call_whose_deadline_cannot_be_met_is_refused_before_it(serve: Any) -> None:
    # The one place is held by a slow call; the queue may wait 30 s, but a call waits at most half its deadline:
    # RESOURCE_EXHAUSTED after ~0.5 s of a 1 s deadline, never DEADLINE_EXCEEDED.
    settings = _settings(max_inflight_calls="1", max_queued_calls="100", max_queue_wait="30s")
    server = await serve("aio", settings, 2.0)
    holder = asyncio.ensure_future(_answer(server.channel, "Slow", DEADLINE_SECONDS))
    await _until_slow_calls_run(server, 1)
    start = time.monotonic()
    code, _ = await _answer(server.channel, "Fast", 1.0)
    took = time.monotonic() - start
    assert code == "RESOURCE_EXHAUSTED" and took < 0.9, (code, took)
    assert await holder == ("OK", None)


async def test_a_call_that_waited_too_long_for_a_worker_is_refused_when_picked_up(serve: Any) -> None:
    # Every worker of the thread-pool server busy for 1 s; a call queued behind them with a 3 s deadline has waited
    # past NUMPROTECT_MAX_QUEUE_WAIT (100 ms) when a worker takes it: refused at once there, not served late.
    settings = _settings(max_queued_calls="100", max_queue_wait="100ms")
    server = await serve("sync", settings, 1.0)
    holders = [asyncio.ensure_future(_answer(server.channel, "Slow", DEADLINE_SECONDS)) for _ in range(WORKERS)]
    await _until_slow_calls_run(server, WORKERS)
    code, error = await _answer(server.channel, "Fast", 3.0)
    assert code == "RESOURCE_EXHAUSTED" and error is not None
    assert "NUMPROTECT_MAX_QUEUE_WAIT" in (error.details() or "")
    assert [await holder for holder in holders] == [("OK", None)] * WORKERS


@pytest.mark.parametrize("model", ["aio", "sync"])
async def test_a_full_queue_refuses_at_once(serve: Any, model: str) -> None:
    # aio: one place, no queue; sync: every worker busy and one call waiting (the least the pool allows).
    settings = _settings(max_inflight_calls="1", max_queued_calls="0", max_queue_wait="30s")
    server = await serve(model, settings, 2.0)
    holding = 1 if model == "aio" else WORKERS + 1
    holders = [asyncio.ensure_future(_answer(server.channel, "Slow", DEADLINE_SECONDS)) for _ in range(holding)]
    await _until_slow_calls_run(server, min(holding, WORKERS))
    await asyncio.sleep(0.3)  # the sync model's last holder reaches the queue (nothing shows it there)
    start = time.monotonic()
    code, error = await _answer(server.channel, "Fast", DEADLINE_SECONDS)
    assert code == "RESOURCE_EXHAUSTED" and time.monotonic() - start < 1.5, code
    assert error is not None and "NUMPROTECT_MAX_QUEUED_CALLS" in (error.details() or "")
    assert [await holder for holder in holders] == [("OK", None)] * holding


def test_admission_settings_are_validated() -> None:
    settings = _settings(max_inflight_calls="100", max_queued_calls="0", max_queue_wait="250ms")
    assert (settings.max_inflight_calls, settings.max_queued_calls, settings.max_queue_wait_seconds) == (100, 0, 0.25)
    with pytest.raises(ValueError, match="NUMPROTECT_MAX_INFLIGHT_CALLS='0': must be between 1"):
        _settings(max_inflight_calls="0")
    with pytest.raises(ValueError, match="NUMPROTECT_MAX_QUEUE_WAIT='soon'"):
        _settings(max_queue_wait="soon")


def test_grpc_aio_writing_to_a_call_the_client_left_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    quiet_client_gone_errors()
    caplog.set_level(logging.INFO)
    grpc_logger = logging.getLogger("grpc._cython.cygrpc")
    try:
        raise RuntimeError("batch failed")
    except RuntimeError:
        grpc_logger.exception("ExecuteBatchError raised in core by servicer method [/test.Overload/Slow]")
        grpc_logger.exception("Unexpected [KeyError] raised by servicer method [/test.Overload/Slow]")
    levels = {r.getMessage().split(" ")[0]: (r.levelname, r.exc_info is not None) for r in caplog.records}
    assert levels == {"ExecuteBatchError": ("INFO", False), "Unexpected": ("ERROR", True)}
