"""Prometheus exposition of a service process (docs/operations.md "Metrics"): /metrics of a grpc.aio service and
of the thread-pool service in-process and of a real process, over TLS with API keys on real Redis; the gRPC server
families counting calls by code and stream messages, Redis up and round trips, load shedding's series, the
settings, and metrics off."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.core.identity.principal import Role
from numprotect.core.metrics import Metrics
from numprotect.core.metrics.exposition import MetricsEndpoint
from numprotect.core.metrics.grpc_server import GrpcServerMetrics
from numprotect.core.settings import Env, ServerSettings, SettingsError
from numprotect.services.allocation.app import build
from numprotect.services.translation.app import build_sync
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.identity import mint_in, record_blocks
from support.inprocess import running_service, running_sync_service
from support.processes import ServiceProcess
from support.redis_server import RedisServer
from support.rpc import fails

ALLOCATION = "numprotect.allocation.v1.AllocationService"
TRANSLATION = "numprotect.translation.v1.TranslationService"
NEVER_IMPORTED = "700999999990001"
X = "700100000000001"
CARRIER = "cm"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.headers.get_content_type() == "text/plain"
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exposed"
    return samples[key]


def method(service: str, name: str, grpc_type: str = "unary") -> dict[str, str]:
    return {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": name}


def url_of(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


async def test_grpc_aio_service_counts_calls_by_code(redis_env: dict[str, str]) -> None:
    async with running_service("allocation", build, redis_env) as service:
        url = url_of(service.app.metrics_port)
        fresh = await asyncio.to_thread(scrape, url)
        get_number = method(ALLOCATION, "GetNumber")
        # Every registered method from the start, at zero with code OK; what every process exposes.
        assert value(fresh, "grpc_server_started_total", **get_number) == 0
        assert value(fresh, "grpc_server_handled_total", **get_number, grpc_code="OK") == 0
        assert value(fresh, "numprotect_build_info", service="allocation", version="0.1.0") == 1
        assert value(fresh, "numprotect_redis_up") == 1
        assert value(fresh, "numprotect_calls_shed_total", reason="queue_full") == 0
        assert value(fresh, "numprotect_calls_shed_total", reason="queue_wait") == 0
        assert value(fresh, "process_cpu_seconds_total") > 0
        assert value(fresh, "python_gc_collections_total", generation="0") >= 0
        round_trips = value(fresh, "numprotect_redis_round_trip_seconds_count", client="mux")

        operator = allocation_pb2_grpc.AllocationServiceStub(service.channel_as(Role.OPERATOR))
        await fails(
            grpc.StatusCode.NOT_FOUND,
            operator.GetNumber(allocation_pb2.GetNumberRequest(virtual_number=NEVER_IMPORTED)),
        )
        anonymous = allocation_pb2_grpc.AllocationServiceStub(service.channel)
        await fails(
            grpc.StatusCode.UNAUTHENTICATED, anonymous.GetNumber(allocation_pb2.GetNumberRequest(virtual_number=X))
        )

        after = await asyncio.to_thread(scrape, url)
        assert value(after, "grpc_server_started_total", **get_number) == 2
        assert value(after, "grpc_server_handled_total", **get_number, grpc_code="NotFound") == 1
        assert value(after, "grpc_server_handled_total", **get_number, grpc_code="Unauthenticated") == 1
        assert value(after, "grpc_server_handled_total", **get_number, grpc_code="OK") == 0
        assert value(after, "grpc_server_msg_received_total", **get_number) == 2
        assert value(after, "grpc_server_msg_sent_total", **get_number) == 0
        assert value(after, "grpc_server_handling_seconds_count", **get_number) == 2
        assert value(after, "grpc_server_handling_seconds_bucket", **get_number, le="+Inf") == 2
        assert 0 < value(after, "grpc_server_handling_seconds_sum", **get_number) < 5
        assert value(after, "numprotect_redis_round_trip_seconds_count", client="mux") > round_trips
    # Stopped with the service.
    with pytest.raises(urllib.error.URLError):
        scrape(url)


async def test_thread_pool_service_counts_unary_calls_and_stream_messages(redis_env: dict[str, str]) -> None:
    async with running_sync_service("translation", build_sync, redis_env) as service:
        url = url_of(service.app.metrics_port)
        service.route(CARRIER, X)
        carrier = translation_pb2_grpc.TranslationServiceStub(service.channel_as(Role.CARRIER, CARRIER))
        translate = method(TRANSLATION, "Translate")
        stream = method(TRANSLATION, "TranslateStream", "bidi_stream")
        fresh = await asyncio.to_thread(scrape, url)
        assert value(fresh, "grpc_server_started_total", **stream) == 0
        round_trips = value(fresh, "numprotect_redis_round_trip_seconds_count", client="fastredis")
        redis_py = value(fresh, "numprotect_redis_round_trip_seconds_count", client="redis-py")

        request = translation_pb2.TranslateRequest(calling_number="13800000001", called_number=X, call_id="c1")
        reply = await carrier.Translate(request)
        assert reply.decision == translation_pb2.DECISION_REJECT  # no binding: an answer, code OK

        async def three() -> Any:
            for _ in range(3):
                yield translation_pb2.TranslateStreamRequest(request=request)

        answers = [answer async for answer in carrier.TranslateStream(three())]
        assert len(answers) == 3
        # A blocklist read goes through the runtime's redis-py client.
        tenant = translation_pb2_grpc.TranslationServiceStub(service.channel_as(Role.TENANT, "t1"))
        await tenant.ListBlockedCallers(translation_pb2.ListBlockedCallersRequest(tenant_id="t1"))

        after = await asyncio.to_thread(scrape, url)
        assert value(after, "grpc_server_handled_total", **translate, grpc_code="OK") == 1
        assert value(after, "grpc_server_msg_sent_total", **translate) == 1
        assert value(after, "grpc_server_started_total", **stream) == 1
        assert value(after, "grpc_server_handled_total", **stream, grpc_code="OK") == 1
        assert value(after, "grpc_server_msg_received_total", **stream) == 3
        assert value(after, "grpc_server_msg_sent_total", **stream) == 3
        assert value(after, "numprotect_redis_round_trip_seconds_count", client="fastredis") >= round_trips + 1
        assert value(after, "numprotect_redis_round_trip_seconds_count", client="redis-py") > redis_py


async def _redis_up_becomes(url: str, expected: float) -> float:
    """numprotect_redis_up once it reads `expected`, or its last value after 10 s (the probe runs every 0.1 s)."""
    seen = -1.0
    for _ in range(100):
        seen = value(await asyncio.to_thread(scrape, url), "numprotect_redis_up")
        if seen == expected:
            break
        await asyncio.sleep(0.1)
    return seen


async def test_redis_up_follows_a_redis_killed_and_restarted() -> None:
    """What NumprotectRedisDown fires on: the health probe's PING, 0 while Redis is gone, 1 again once it is back."""
    own = RedisServer()  # killed here: not the Redis other tests share
    env = {"NUMPROTECT_REDIS_URL": own.url, "NUMPROTECT_REDIS_MODE": "standalone", "NUMPROTECT_HEALTH_INTERVAL": "0.1"}
    try:
        async with running_service("allocation", build, env) as service:
            url = url_of(service.app.metrics_port)
            assert await _redis_up_becomes(url, 1) == 1
            own.kill()
            assert await _redis_up_becomes(url, 0) == 0
            own.restart()
            assert await _redis_up_becomes(url, 1) == 1
    finally:
        own.stop()


async def test_metrics_off_exposes_nothing_and_adds_no_concern(redis_env: dict[str, str]) -> None:
    async with running_service("allocation", build, {**redis_env, "NUMPROTECT_METRICS": "off"}) as service:
        assert service.app.metrics_endpoint is None and service.app.metrics_port == 0
        assert not any(isinstance(concern, GrpcServerMetrics) for concern in service.app.call_concerns)
        operator = allocation_pb2_grpc.AllocationServiceStub(service.channel_as(Role.OPERATOR))
        await fails(
            grpc.StatusCode.NOT_FOUND,
            operator.GetNumber(allocation_pb2.GetNumberRequest(virtual_number=NEVER_IMPORTED)),
        )
        assert list(service.runtime.metrics.registry.collect()) == []


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"NUMPROTECT_METRICS": "maybe"}, "NUMPROTECT_METRICS='maybe': must be one of on, off"),
        ({"NUMPROTECT_METRICS_PORT": "70000"}, "NUMPROTECT_METRICS_PORT='70000': must be between 0 and 65535"),
        ({"NUMPROTECT_METRICS_PORT": "http"}, "NUMPROTECT_METRICS_PORT='http': must be an integer"),
        ({"NUMPROTECT_METRICS_HOST": "0.0.0.0:9090"}, "NUMPROTECT_METRICS_HOST='0.0.0.0:9090': must be a host"),
        ({"NUMPROTECT_METRICS_HOST": "http://x"}, "NUMPROTECT_METRICS_HOST='http://x': must be a host"),
    ],
)
def test_bad_settings_are_one_line_naming_the_variable(environ: Mapping[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        ServerSettings.from_env(Env(environ), "translation")
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_settings_defaults_follow_the_grpc_host() -> None:
    default = ServerSettings.from_env(Env({}), "cdr")
    assert (default.metrics, default.metrics_host, default.metrics_port) == (True, "127.0.0.1", 0)
    opened = ServerSettings.from_env(Env({"NUMPROTECT_HOST": "0.0.0.0", "NUMPROTECT_METRICS_PORT": "9154"}), "cdr")
    assert (opened.metrics_host, opened.metrics_port) == ("0.0.0.0", 9154)
    pinned = ServerSettings.from_env(Env({"NUMPROTECT_HOST": "0.0.0.0", "NUMPROTECT_METRICS_HOST": "::1"}), "cdr")
    assert pinned.metrics_host == "::1"


def test_a_busy_port_is_a_settings_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SettingsError, match=rf"^NUMPROTECT_METRICS_PORT: cannot listen on 127.0.0.1:{port} "):
            MetricsEndpoint(Metrics("cdr"), "127.0.0.1", port).start()


def test_a_real_process_logs_its_metrics_url_and_counts_calls(redis_env: dict[str, str], redis_sync: Any) -> None:
    record_blocks(redis_sync, CARRIER, X)
    token = mint_in(redis_env, Role.CARRIER, CARRIER)
    process = ServiceProcess("translation", redis_env)
    try:
        assert process.metrics_url is not None and process.metrics_url.startswith("http://127.0.0.1:")
        fresh = scrape(process.metrics_url)
        assert value(fresh, "numprotect_build_info", service="translation", version="0.1.0") == 1
        translate = method(TRANSLATION, "Translate")
        assert value(fresh, "grpc_server_started_total", **translate) == 0
        with process.channel(token) as channel:
            stub = translation_pb2_grpc.TranslationServiceStub(channel)
            stub.Translate(translation_pb2.TranslateRequest(calling_number="13800000001", called_number=X), timeout=5)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Translate(
                    translation_pb2.TranslateRequest(calling_number="13800000001", called_number="7"), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after = scrape(process.metrics_url)
        assert value(after, "grpc_server_handled_total", **translate, grpc_code="OK") == 1
        assert value(after, "grpc_server_handled_total", **translate, grpc_code="InvalidArgument") == 1
        assert value(after, "numprotect_redis_up") == 1
    finally:
        assert process.stop() == 0, "\n".join(process.lines[-20:])
