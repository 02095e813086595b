"""Telemetry from OTEL_* variables: sampler defaults, disabled without endpoint, masking, Redis spans, log ids."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import grpc
import pytest
import redis.asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core import telemetry as tel
from numprotect.core.call_ref import CallRef
from numprotect.core.calls import Method, SyncCallLayer
from numprotect.core.identity.principal import Role
from numprotect.core.logs import JsonFormatter
from numprotect.core.redis_client import create_redis
from numprotect.core.routes import MODE_AXB, RESTRICTION_NONE, Route, RouteTable
from numprotect.core.settings import Env, RedisSettings, SettingsError
from numprotect.core.telemetry import Telemetry
from numprotect.core.telemetry.client_spans import TracedChannel
from numprotect.core.telemetry.server_spans import _PresetTraceIds
from numprotect.services.cdr.app import build as build_cdr
from support.inprocess import running_service

PARTY_A = "13812345678"
PARTY_B = "13987654321"
VIRTUAL = "700100000012345"
NUMBERS = (PARTY_A, PARTY_B, VIRTUAL)


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK's own env detectors read os.environ: keep the developer's shell out of these tests.
    for name in ("OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.delenv(name, raising=False)


def traced(environ: Mapping[str, str] | None = None) -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry.from_env(
        {"OTEL_TRACES_SAMPLER": "always_on", **(environ or {})}, "numprotect-test", exporter=exporter
    )
    assert telemetry.enabled
    return telemetry, exporter


def finished(telemetry: Telemetry, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    assert telemetry.provider is not None
    telemetry.provider.force_flush()
    return list(exporter.get_finished_spans())


def current_span(telemetry: Telemetry, name: str, **options: Any) -> Any:
    """A current span named `name` from the telemetry's tracer (a no-op span when tracing is off)."""
    return telemetry.tracer.start_as_current_span(name, **options)


def all_attribute_text(spans: list[ReadableSpan]) -> str:
    """Every attribute, event attribute, link attribute and status text of the spans, as one string."""
    parts: list[str] = []
    for span in spans:
        parts.append(span.name)
        parts.extend(f"{k}={v!r}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            parts.extend(f"{k}={v!r}" for k, v in (event.attributes or {}).items())
        for link in span.links:
            parts.extend(f"{k}={v!r}" for k, v in (link.attributes or {}).items())
        parts.append(span.status.description or "")
    return "\n".join(parts)


# --- configuration -------------------------------------------------------------------------------------------


async def test_no_endpoint_means_disabled_and_untraced_channels() -> None:
    telemetry = Telemetry.from_env({"OTEL_TRACES_SAMPLER": "always_on"}, "numprotect-test")
    assert not telemetry.enabled
    assert telemetry.call_concerns() == []
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    assert telemetry.traced_channel(channel) is channel
    await channel.close(None)
    telemetry.shutdown()


def test_disabled_telemetry_leaves_redis_clients_untouched() -> None:
    client = redis.asyncio.Redis()
    Telemetry.disabled().instrument_redis(client)
    assert not getattr(client, "_is_instrumented_by_opentelemetry", False)


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
    ],
)
def test_exporter_none_or_sdk_disabled_turns_tracing_off(environ: dict[str, str]) -> None:
    assert not Telemetry.from_env(environ, "numprotect-test").enabled


@pytest.mark.parametrize("name", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
async def test_an_endpoint_turns_tracing_on_with_traced_channels(name: str) -> None:
    telemetry = Telemetry.from_env({name: "http://127.0.0.1:4317"}, "numprotect-test")
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        assert telemetry.enabled
        assert len(telemetry.call_concerns()) == 1
        assert isinstance(telemetry.traced_channel(channel), TracedChannel)
    finally:
        await channel.close(None)
        telemetry.shutdown()


def test_default_sampler_is_parent_based_one_percent() -> None:
    telemetry, _ = traced({"OTEL_TRACES_SAMPLER": ""})
    assert telemetry.provider is not None
    description = telemetry.provider.sampler.get_description()
    assert description.startswith("ParentBased{root:TraceIdRatioBased{0.01}")
    assert tel.DEFAULT_SAMPLER == "parentbased_traceidratio"
    assert tel.DEFAULT_SAMPLER_RATIO == 0.01


@pytest.mark.parametrize(
    ("environ", "description"),
    [
        ({"OTEL_TRACES_SAMPLER": "always_on"}, "AlwaysOnSampler"),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, "AlwaysOffSampler"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}, "TraceIdRatioBased{0.5}"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio"}, "TraceIdRatioBased{0.01}"),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"},
            "ParentBased{root:TraceIdRatioBased{1.0}",
        ),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, "ParentBased{root:AlwaysOnSampler"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, "ParentBased{root:AlwaysOffSampler"),
    ],
)
def test_sampler_env_overrides(environ: dict[str, str], description: str) -> None:
    telemetry, _ = traced(environ)
    assert telemetry.provider is not None
    assert telemetry.provider.sampler.get_description().startswith(description)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "novalue"}, "OTEL_RESOURCE_ATTRIBUTES"),
    ],
)
def test_bad_settings_name_the_variable(environ: dict[str, str], variable: str) -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_SAMPLER": "", **environ}
    with pytest.raises(SettingsError, match=variable):
        Telemetry.from_env(environ, "numprotect-test")


def test_ratio_sampler_keeps_about_its_share_of_root_traces() -> None:
    telemetry, exporter = traced({"OTEL_TRACES_SAMPLER": ""})
    for _ in range(10_000):
        with current_span(telemetry, "root"), current_span(telemetry, "child"):
            pass
    spans = finished(telemetry, exporter)
    roots = [s for s in spans if s.name == "root"]
    children = [s for s in spans if s.name == "child"]
    assert 50 <= len(roots) <= 170  # 1% of 10,000, with a wide margin
    assert len(children) == len(roots)  # children follow their parent's decision


def test_resource_defaults_and_overrides() -> None:
    telemetry, _ = traced()
    assert telemetry.provider is not None
    attributes = telemetry.provider.resource.attributes
    assert attributes["service.name"] == "numprotect-test"
    assert attributes["service.version"] == tel.SERVICE_VERSION
    assert str(attributes["service.instance.id"]).endswith(f"-{__import__('os').getpid()}")

    telemetry, _ = traced(
        {
            "OTEL_SERVICE_NAME": "np-binding-east",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.instance.id=pod%2D7, k8s.ns = np ",
        }
    )
    assert telemetry.provider is not None
    attributes = telemetry.provider.resource.attributes
    assert attributes["service.name"] == "np-binding-east"
    assert attributes["deployment.environment"] == "prod"
    assert attributes["service.instance.id"] == "pod-7"
    assert attributes["k8s.ns"] == "np"
    assert attributes["service.version"] == tel.SERVICE_VERSION


# --- attributes and masking ----------------------------------------------------------------------------------


def test_attributes_are_namespaced_and_numbers_masked() -> None:
    telemetry, exporter = traced()
    with current_span(telemetry, "translate"):
        tel.set_span_attributes(tenant="t-1", mode="AXB", decision="REJECT", reject_reason=None, binding_id="b-9")
        tel.masked_number_attribute("calling_number", PARTY_A)
        # The safety net: a number passed by mistake as a plain attribute is masked too.
        tel.set_span_attributes(called_number=VIRTUAL, peer="+86" + PARTY_B)
    (span,) = finished(telemetry, exporter)
    assert span.attributes == {
        "numprotect.tenant": "t-1",
        "numprotect.mode": "AXB",
        "numprotect.decision": "REJECT",
        "numprotect.binding_id": "b-9",
        "numprotect.calling_number": "138****5678",
        "numprotect.called_number": "700********2345",
        "numprotect.peer": "+86*******4321",
    }
    assert not any(number in all_attribute_text([span]) for number in NUMBERS)


def test_attribute_helpers_do_nothing_outside_a_recording_span() -> None:
    telemetry, exporter = traced({"OTEL_TRACES_SAMPLER": "always_off"})
    with current_span(telemetry, "unsampled") as span:
        assert not span.is_recording()
        tel.set_span_attributes(tenant="t-1")
        tel.masked_number_attribute("calling_number", PARTY_A)
    tel.set_span_attributes(tenant="t-1")  # no current span at all
    assert finished(telemetry, exporter) == []


# Phone numbers as callers pass them by mistake: alone in every written form, inside a text, inside a list.
LEAKS = {
    "mobile": PARTY_A,
    "plus86": "+86" + PARTY_B,
    "prefix0086": "0086" + PARTY_B,
    "prefix86": "86" + PARTY_A,
    "fixed_line": "01087654321",
    "virtual": VIRTUAL,
    "block": "70010000001",
    "in_text": f"call from {PARTY_A} to {VIRTUAL}",
    "in_list": ("ok", PARTY_B),
}
RAW_NUMBERS = (PARTY_A, PARTY_B, VIRTUAL, "01087654321", "70010000001")


def assert_only_masked(spans: list[ReadableSpan]) -> None:
    text = all_attribute_text(spans)
    for number in RAW_NUMBERS:
        assert number not in text
    assert "138****5678" in text and "700********2345" in text  # masked, not dropped
    assert "call from 138****5678 to 700********2345" in text  # the rest of a text survives


def test_every_attribute_entry_point_masks_phone_numbers() -> None:
    telemetry, exporter = traced()
    call_ref = CallRef("b-1", VIRTUAL, 1_764_000_000_000, trace_id=0x1234, span_id=0x5678)
    link = tel.link_from_call_ref(call_ref, {f"link.{name}": value for name, value in LEAKS.items()})
    with current_span(
        telemetry, "start", attributes=tel.safe_attributes({f"start.{k}": v for k, v in LEAKS.items()}), links=[link]
    ) as started:
        tel.set_span_attributes(**LEAKS)  # the current span
        tel.set_span_attributes(started, **{f"explicit_{name}": value for name, value in LEAKS.items()})
        tel.set_attributes(started, {f"plain.{name}": value for name, value in LEAKS.items()})
        tel.masked_number_attribute("masked", PARTY_A)
        with telemetry.child_span("EVALSHA", attributes={f"child.{k}": v for k, v in LEAKS.items()}):
            pass
    spans = finished(telemetry, exporter)
    assert {s.name for s in spans} == {"start", "EVALSHA"}
    assert_only_masked(spans)
    attributes = {name: value for s in spans for name, value in (s.attributes or {}).items()}
    for prefix in ("numprotect.", "numprotect.explicit_", "plain.", "start.", "child."):
        assert attributes[prefix + "mobile"] == "138****5678"
        assert attributes[prefix + "plus86"] == "+86*******4321"
        assert attributes[prefix + "fixed_line"] == "010****4321"
        assert tuple(attributes[prefix + "in_list"]) == ("ok", "139****4321")  # type: ignore[arg-type]
    assert attributes["numprotect.masked"] == "138****5678"
    (exported_link,) = next(s for s in spans if s.name == "start").links
    assert dict(exported_link.attributes or {})["link.block"] == "700****0001"


async def test_cdr_ingestion_span_carries_numbers_only_masked(redis_url: str) -> None:
    telemetry, exporter = traced()
    call_ref = CallRef("b-1", VIRTUAL, 1_764_000_000_000, trace_id=0x1234, span_id=0x5678).encode()
    record = cdr_pb2.CallDetailRecord(
        call_id=f"{PARTY_A}-1",  # carriers build call ids from numbers too
        calling_number=PARTY_A,
        called_number=VIRTUAL,
        target_number=PARTY_B,
        call_type=cdr_pb2.CALL_TYPE_PEER_TO_A,
        release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
        release_cause=16,
        call_ref=call_ref,
    )
    start = time.time_ns() // 1_000_000 - 120_000
    record.call_time.FromMilliseconds(start)
    record.ring_time.FromMilliseconds(start + 2_000)
    record.answer_time.FromMilliseconds(start + 5_000)
    record.release_time.FromMilliseconds(start + 35_000)
    async with running_service("cdr", build_cdr, {"NUMPROTECT_REDIS_URL": redis_url}, telemetry=telemetry) as svc:
        svc.route("cm", VIRTUAL)
        token = svc.token(Role.CARRIER, "cm")
        carrier = svc.channel_with(token)
        reply = await cdr_pb2_grpc.CdrServiceStub(carrier).IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[record]))
        assert reply.accepted == 1, reply
        # A refused token is not in the error's span either.
        refused = svc.channel_with(token[:-2] + ("BB" if token.endswith("AA") else "AA"))  # never the token itself
        with pytest.raises(grpc.aio.AioRpcError):
            await cdr_pb2_grpc.CdrServiceStub(refused).IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[record]))
    spans = finished(telemetry, exporter)
    (ingest,) = [s for s in spans if s.name == "cdr.ingest"]
    (link,) = ingest.links
    assert dict(link.attributes or {}) == {"numprotect.link": "call_setup", "cdr.call_id": "138****5678-1"}
    assert dict(ingest.attributes or {})["cdr.calling_number"] == "138****5678"
    text = all_attribute_text(spans)
    assert not any(number in text for number in (PARTY_A, PARTY_B, VIRTUAL))
    # Credentials never reach a span: not the token, not its secret part, not in a status message.
    secret = token.rsplit("_", 1)[1]
    statuses = " ".join(str(s.status.description) for s in spans)
    assert secret not in text and secret[:-2] not in text and secret[:-2] not in statuses
    assert any("UNAUTHENTICATED" in str(s.status.description) for s in spans)


# --- Redis spans -------------------------------------------------------------------------------------------------


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_redis_spans_are_children_and_carry_no_phone_number(redis_client: redis.asyncio.Redis) -> None:
    telemetry, exporter = traced()
    telemetry.instrument_redis(redis_client)
    route = Route("b-1", "t-1", MODE_AXB, PARTY_A, PARTY_B, RESTRICTION_NONE, False, False, 2_000_000_000_000)
    with current_span(telemetry, "rpc") as parent:
        await RouteTable(redis_client).put(VIRTUAL, route)  # EVALSHA (and SCRIPT LOAD) with numbers in keys/args
        await redis_client.set(f"np:test:{{{VIRTUAL}}}:{PARTY_A}", PARTY_B)
        async with redis_client.pipeline(transaction=True) as pipe:
            pipe.get(f"np:rt:{{{VIRTUAL}}}:c:{PARTY_A}")
            pipe.sadd(f"np:test:{PARTY_B}", PARTY_A)
            await pipe.execute()
    assert await redis_client.get(f"np:test:{{{VIRTUAL}}}:{PARTY_A}") == PARTY_B.encode()  # outside a span
    spans = finished(telemetry, exporter)
    redis_spans = [s for s in spans if s.name != "rpc"]
    names = [s.name for s in redis_spans]
    assert "EVALSHA" in names and "SET" in names and any("GET" in n and "SADD" in n for n in names)
    assert "GET" not in names  # the command outside any span made no (root) span
    for span in redis_spans:
        assert span.kind == SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    statements = [str(dict(s.attributes or {}).get("db.statement", "")) for s in redis_spans]
    assert "SET ? ?" in statements
    assert any(statement.startswith("EVALSHA ? ?") for statement in statements)
    text = all_attribute_text(spans)
    for number in NUMBERS:
        assert number not in text
        assert number[-8:] not in text  # not even a fragment of a key


def test_blocking_redis_clients_get_the_same_child_only_spans(redis_url: str) -> None:
    """The thread-pool server's redis-py client (SyncRuntime.redis) is instrumented like the asyncio one."""
    telemetry, exporter = traced()
    client = redis.Redis.from_url(redis_url)
    try:
        telemetry.instrument_redis(client)
        with current_span(telemetry, "rpc") as parent:
            client.set(f"np:test:{{{VIRTUAL}}}:{PARTY_A}", PARTY_B)
        assert client.get(f"np:test:{{{VIRTUAL}}}:{PARTY_A}") == PARTY_B.encode()  # outside a span: no span
    finally:
        client.close()
    spans = [s for s in finished(telemetry, exporter) if s.name != "rpc"]
    assert [s.name for s in spans] == ["SET"]
    assert spans[0].kind == SpanKind.CLIENT and spans[0].parent is not None
    assert spans[0].parent.span_id == parent.get_span_context().span_id
    assert dict(spans[0].attributes or {}).get("db.statement") == "SET ? ?"


async def test_redis_commands_outside_traced_calls_make_no_spans(redis_client: redis.asyncio.Redis) -> None:
    telemetry, exporter = traced()
    telemetry.instrument_redis(redis_client)
    assert await redis_client.ping()  # the health probe's PING
    with current_span(telemetry, "unsampled", attributes={"x": 1}):
        pass
    assert [s.name for s in finished(telemetry, exporter)] == ["unsampled"]


@pytest.mark.parametrize("client_kind", ["redis-py", "mux"])
async def test_pipelines_of_unsampled_calls_are_redis_pys_own(redis_url: str, client_kind: str) -> None:
    """Outside a recording span a pipeline is not wrapped at all (the wrappers cost ~86 us per pipeline even when
    they made no span) and makes no span; inside one it is traced as before, and so are commands."""
    settings = RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": redis_url, "NUMPROTECT_REDIS_CLIENT": client_kind}))
    client = create_redis(settings, write_path=client_kind == "mux")
    telemetry, exporter = traced({"OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    try:
        telemetry.instrument_redis(client)
        with current_span(telemetry, "unsampled") as unsampled:
            assert not unsampled.is_recording()
            async with client.pipeline(transaction=False) as pipe:
                assert not hasattr(pipe.execute, "__wrapped__")  # no wrapt wrapper on this pipeline
                pipe.set("np:test:pipe", "1")
                pipe.get("np:test:pipe")
                assert await pipe.execute() == [True, b"1"]
            assert await client.get("np:test:pipe") == b"1"
        assert finished(telemetry, exporter) == []
        sampled, sampled_exporter = traced()
        sampled.instrument_redis(client2 := create_redis(settings, write_path=client_kind == "mux"))
        try:
            with current_span(sampled, "rpc") as parent:
                async with client2.pipeline(transaction=False) as pipe:
                    pipe.get("np:test:pipe")
                    assert await pipe.execute() == [b"1"]
                assert await client2.get("np:test:pipe") == b"1"
        finally:
            await client2.aclose()
        spans = [s for s in finished(sampled, sampled_exporter) if s.name != "rpc"]
        assert [str(dict(s.attributes or {}).get("db.statement")) for s in spans] == ["GET ?", "GET ?"]
        assert all(s.parent is not None and s.parent.span_id == parent.get_span_context().span_id for s in spans)
    finally:
        await client.aclose()


def test_child_spans_only_under_a_recording_span() -> None:
    telemetry, exporter = traced({"OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    with telemetry.child_span("EVALSHA", kind=SpanKind.CLIENT) as span:
        assert not span.is_recording()  # no parent at all
    telemetry, exporter = traced()
    with telemetry.child_span("orphan"):
        pass
    with current_span(telemetry, "rpc") as parent, telemetry.child_span("EVALSHA", kind=SpanKind.CLIENT) as child:
        assert child.is_recording()
    names = {s.name: s for s in finished(telemetry, exporter)}
    assert set(names) == {"rpc", "EVALSHA"}
    assert names["EVALSHA"].parent is not None
    assert names["EVALSHA"].parent.span_id == parent.get_span_context().span_id
    assert not Telemetry.disabled().child_span("x").__enter__().is_recording()


# --- span links from call_ref ------------------------------------------------------------------------------------


def test_cdr_ingestion_span_links_to_the_translation_span() -> None:
    telemetry, exporter = traced()
    with current_span(telemetry, "Translate", kind=SpanKind.SERVER) as translate:
        context = translate.get_span_context()  # what translation puts in the call_ref
        call_ref = CallRef("b-1", VIRTUAL, 1_764_000_000_000, trace_id=context.trace_id, span_id=context.span_id)

    untraced = CallRef("b-2", VIRTUAL, 1_764_000_000_000).encode()
    assert tel.link_from_call_ref(untraced) is None
    assert tel.link_from_call_ref("not a call_ref") is None
    assert tel.link_from_call_ref("") is None
    links = [tel.link_from_call_ref(call_ref), tel.link_from_call_ref(call_ref.encode(), {"cdr.call_id": "c-1"})]

    with current_span(telemetry, "cdr.ingest", links=links):
        pass

    spans = {s.name: s for s in finished(telemetry, exporter)}
    first, second = spans["cdr.ingest"].links
    for link in (first, second):
        assert (link.context.trace_id, link.context.span_id) == (context.trace_id, context.span_id)
    assert dict(first.attributes or {}) == {"numprotect.link": "call_setup"}
    assert dict(second.attributes or {}) == {"numprotect.link": "call_setup", "cdr.call_id": "c-1"}
    assert spans["cdr.ingest"].context.trace_id != context.trace_id  # a link, not a parent


# --- logs ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    logger = logging.getLogger("numprotect.test.tracing")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_json_logs_carry_trace_and_span_ids_inside_a_span(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = json_log
    telemetry, _ = traced()
    logger.info("outside")
    with current_span(telemetry, "rpc") as span:
        logger.info("inside", extra={"calling_number": "138****5678"})
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "trace_id" not in outside and "span_id" not in outside
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert inside["msg"] == "inside"


# --- the bootstrap's wiring: server spans, client spans, health never traced ---------------------------------------


async def test_bootstrap_traces_calls_but_not_health_checks(redis_url: str) -> None:
    telemetry, exporter = traced()
    async with running_service("cdr", build_cdr, {"NUMPROTECT_REDIS_URL": redis_url}, telemetry=telemetry) as svc:
        # A channel made by the service's own Runtime: client spans plus trace context in the metadata.
        channel = svc.runtime.channel_to(svc.address)
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = cdr_pb2_grpc.CdrServiceStub(channel)
        # Whether the RPC answers or fails (UNIMPLEMENTED), its spans exist.
        with current_span(telemetry, "caller"), contextlib.suppress(grpc.aio.AioRpcError):
            await stub.GetCdrStats(cdr_pb2.GetCdrStatsRequest(tenant_id="t-1"))
    spans = finished(telemetry, exporter)
    assert not any("Health" in s.name for s in spans)
    by_kind: dict[Any, list[ReadableSpan]] = {}
    for span in spans:
        by_kind.setdefault(span.kind, []).append(span)
    (client,) = [s for s in by_kind[SpanKind.CLIENT] if "GetCdrStats" in s.name]
    (server,) = [s for s in by_kind[SpanKind.SERVER] if "GetCdrStats" in s.name]
    (caller,) = [s for s in spans if s.name == "caller"]
    assert client.parent is not None and client.parent.span_id == caller.context.span_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert server.context.trace_id == caller.context.trace_id
    assert trace.get_current_span() is trace.INVALID_SPAN


class _MetadataSeen:
    """A grpc.aio server that keeps each call's metadata: `test.Echo/Echo` answers the request, `test.Echo/Fail`
    NOT_FOUND quoting a phone number, `grpc.health.v1.Health/Check` SERVING."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])

        async def echo(request: bytes, context: Any) -> bytes:
            self.metadata.append(dict(context.invocation_metadata()))
            return request

        async def fail(request: bytes, context: Any) -> bytes:
            self.metadata.append(dict(context.invocation_metadata()))
            await context.abort(grpc.StatusCode.NOT_FOUND, f"binding of {PARTY_A} not found")
            raise AssertionError("abort returned")

        async def check(request: bytes, context: Any) -> bytes:
            self.metadata.append(dict(context.invocation_metadata()))
            return bytes(
                health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()
            )

        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        }
        health_check = {"Check": grpc.unary_unary_rpc_method_handler(check)}
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("test.Echo", handlers),
                grpc.method_handlers_generic_handler("grpc.health.v1.Health", health_check),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")


async def test_traced_channels_propagate_without_spans_unless_the_caller_records() -> None:
    """An unsampled caller's call carries its traceparent (the peer follows the decision) and makes no span; a
    sampled caller's call gets a CLIENT span whose context the peer receives, with the status on failure (phone
    numbers masked); health calls carry nothing; a call outside any span carries no trace context."""
    seen = _MetadataSeen()
    await seen.server.start()
    telemetry, exporter = traced({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"})
    channel = telemetry.traced_channel(grpc.aio.insecure_channel(f"127.0.0.1:{seen.port}"))
    try:
        echo: Any = channel.unary_unary("/test.Echo/Echo")  # type: ignore[call-arg]
        fail: Any = channel.unary_unary("/test.Echo/Fail")  # type: ignore[call-arg]
        unsampled = trace.NonRecordingSpan(
            trace.SpanContext(0x1234, 0x5678, True, trace.TraceFlags(trace.TraceFlags.DEFAULT))
        )
        with trace.use_span(unsampled):
            assert await echo(b"a", metadata=(("x-mine", "kept"),)) == b"a"
        assert seen.metadata[-1]["traceparent"] == f"00-{0x1234:032x}-{0x5678:016x}-00"
        assert seen.metadata[-1]["x-mine"] == "kept"
        assert finished(telemetry, exporter) == []

        assert await echo(b"b") == b"b"  # no span at all: no trace context, and no root span started
        assert "traceparent" not in seen.metadata[-1]
        assert finished(telemetry, exporter) == []

        with current_span(telemetry, "caller") as caller:
            assert await echo(b"c") == b"c"
            with pytest.raises(grpc.aio.AioRpcError):
                await fail(b"d")
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        for _ in range(100):  # the CLIENT spans end as their calls finish, on the loop
            if len(exporter.get_finished_spans()) >= 3:
                break
            await asyncio.sleep(0.01)
        spans = {s.name: s for s in finished(telemetry, exporter)}
        assert set(spans) == {"caller", "/test.Echo/Echo", "/test.Echo/Fail"}  # health: no span
        ok, failed = spans["/test.Echo/Echo"], spans["/test.Echo/Fail"]
        for span, code in ((ok, grpc.StatusCode.OK), (failed, grpc.StatusCode.NOT_FOUND)):
            assert span.kind == SpanKind.CLIENT
            assert span.parent is not None and span.parent.span_id == caller.get_span_context().span_id
            attributes = dict(span.attributes or {})
            assert attributes["rpc.system"] == "grpc" and attributes["rpc.service"] == "test.Echo"
            assert attributes["rpc.grpc.status_code"] == code.value[0]
        traceparents = [m.get("traceparent", "") for m in seen.metadata[-3:]]
        for traceparent, span in zip(traceparents, (ok, failed), strict=False):
            assert (
                traceparent
                == f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-0{span.context.trace_flags:x}"
            )
            assert span.context.trace_flags.sampled
        assert traceparents[2] == ""  # the health check
        assert failed.status.status_code == trace.StatusCode.ERROR
        assert "NOT_FOUND" in str(failed.status.description) and PARTY_A not in str(failed.status.description)
    finally:
        await channel.close(None)
        await seen.server.stop(0)


# --- the lean server interceptors: parent from traceparent, status codes, streaming, health untraced -------------


def test_sync_server_spans_continue_the_callers_trace_and_record_status() -> None:
    from concurrent import futures

    telemetry, exporter = traced()

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "party_a: 13812345678 must be a mobile number")
        return request

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield request
        yield request

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[SyncCallLayer(telemetry.call_concerns())])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    traceparent = (("traceparent", f"00-{trace_id:032x}-{span_id:016x}-01"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as opened:
            channel: Any = opened  # raw bytes methods: no serializers
            assert channel.unary_unary("/test.Echo/Unary")(b"ok", metadata=traceparent, timeout=5) == b"ok"
            with pytest.raises(grpc.RpcError) as failed:
                channel.unary_unary("/test.Echo/Unary")(b"bad", timeout=5)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert list(channel.unary_stream("/test.Echo/Stream")(b"s", timeout=5)) == [b"s", b"s"]
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        server.stop(None)
    ok, bad, streamed = finished(telemetry, exporter)
    assert (ok.name, ok.kind) == ("/test.Echo/Unary", SpanKind.SERVER)
    assert ok.context.trace_id == trace_id
    assert ok.parent is not None and ok.parent.span_id == span_id and ok.parent.is_remote
    assert dict(ok.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "test.Echo",
        "rpc.method": "Unary",
        "rpc.grpc.status_code": 0,
    }
    assert bad.parent is None  # no traceparent: a new trace
    assert dict(bad.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.status.status_code == trace.StatusCode.ERROR
    # A number quoted in the status message is masked like an attribute.
    assert bad.status.description == "INVALID_ARGUMENT: party_a: 138****5678 must be a mobile number"
    assert not bad.events  # exceptions are not recorded (messages may carry data)
    assert streamed.name == "/test.Echo/Stream"
    assert dict(streamed.attributes or {})["rpc.grpc.status_code"] == 0


async def test_aio_server_spans_record_status_of_failed_and_streaming_calls(redis_url: str) -> None:
    telemetry, exporter = traced()
    environ = {"NUMPROTECT_REDIS_URL": redis_url}
    async with running_service("cdr", build_cdr, environ, telemetry=telemetry) as svc:
        stub = cdr_pb2_grpc.CdrServiceStub(svc.channel_as(Role.CARRIER, "cm"))
        operator = cdr_pb2_grpc.CdrServiceStub(svc.channel_as(Role.OPERATOR))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await operator.ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="not a tenant id"))
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        async def requests() -> AsyncIterator[cdr_pb2.StreamCdrsRequest]:
            yield cdr_pb2.StreamCdrsRequest(record=cdr_pb2.CallDetailRecord(call_id="s1"))  # rejected, stream OK

        reply = await stub.StreamCdrs(requests())
        assert len(reply.rejected) == 1
    spans = {s.name: s for s in finished(telemetry, exporter) if s.kind == SpanKind.SERVER}
    listed = spans["/numprotect.cdr.v1.CdrService/ListCdrs"]
    assert dict(listed.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert listed.status.status_code == trace.StatusCode.ERROR
    stream = spans["/numprotect.cdr.v1.CdrService/StreamCdrs"]
    assert dict(stream.attributes or {})["rpc.grpc.status_code"] == 0
    assert stream.status.status_code == trace.StatusCode.UNSET


# --- the unsampled fast path: the sampler's decision without the SDK span -----------------------------------------


class _ContextRecorder:
    """A sync gRPC server (one worker thread) whose handlers record the span context current inside them."""

    def __init__(self, telemetry: Telemetry) -> None:
        from concurrent import futures

        self.seen: list[tuple[trace.SpanContext, bool]] = []

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            span = trace.get_current_span()
            self.seen.append((span.get_span_context(), span.is_recording()))
            return request

        def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            for _ in range(3):
                span = trace.get_current_span()
                self.seen.append((span.get_span_context(), span.is_recording()))
                yield request

        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        }
        self.server = grpc.server(
            futures.ThreadPoolExecutor(1), interceptors=[SyncCallLayer(telemetry.call_concerns())]
        )
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def __enter__(self) -> Any:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return self.channel

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        self.server.stop(None)


def _traceparent(trace_id: int, span_id: int, sampled: bool) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"),)


def test_unsampled_calls_carry_a_not_sampled_context_and_export_nothing() -> None:
    telemetry, exporter = traced({"OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    recorder = _ContextRecorder(telemetry)
    parent_trace, parent_span = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    with recorder as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        for _ in range(20):  # roots, one worker thread: a context left attached would show as a shared trace id
            assert unary(b"root", timeout=5) == b"root"
        unary(b"child", metadata=_traceparent(parent_trace, parent_span, sampled=False), timeout=5)
        unary(b"sampled", metadata=_traceparent(parent_trace, parent_span, sampled=True), timeout=5)
    roots, (not_sampled_child, _), (sampled_child, sampled_recording) = (
        recorder.seen[:20],
        recorder.seen[20],
        recorder.seen[21],
    )
    assert len({c.trace_id for c, _ in roots}) == 20
    for root, recording in roots:
        assert root.is_valid and not recording
        assert not root.trace_flags.sampled  # downstream calls get "-00": they do not start their own traces
        assert root.trace_flags.random_trace_id
    assert not_sampled_child.trace_id == parent_trace and not_sampled_child.span_id != parent_span
    assert not not_sampled_child.trace_flags.sampled
    # Parent-based: a sampled caller is followed even though the root sampler is always_off.
    assert sampled_child.trace_id == parent_trace and sampled_child.trace_flags.sampled and sampled_recording
    (exported,) = finished(telemetry, exporter)
    assert exported.context.span_id == sampled_child.span_id
    assert exported.parent is not None and exported.parent.span_id == parent_span


def test_sampled_server_spans_keep_the_trace_id_the_ratio_sampler_judged() -> None:
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    telemetry, exporter = traced({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    recorder = _ContextRecorder(telemetry)
    with recorder as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        for _ in range(400):
            unary(b"x", timeout=5)
    judge = TraceIdRatioBased(0.25)

    def judged_in(trace_id: int) -> bool:
        return trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < judge.bound

    sampled = {c.trace_id for c, recording in recorder.seen if recording}
    assert all(c.trace_flags.sampled == recording for c, recording in recorder.seen)
    assert 50 <= len(sampled) <= 160  # a quarter of 400, with a wide margin
    # Every decision agrees with the ratio rule on the call's own trace id, so another service judging the
    # same trace id with traceidratio decides alike.
    assert all(judged_in(c.trace_id) == recording for c, recording in recorder.seen)
    assert {s.context.trace_id for s in finished(telemetry, exporter)} == sampled


def test_sync_streaming_span_is_current_in_every_step_and_ended_once() -> None:
    telemetry, exporter = traced()
    recorder = _ContextRecorder(telemetry)
    with recorder as channel:
        assert list(channel.unary_stream("/test.Echo/Stream")(b"s", timeout=5)) == [b"s"] * 3
        assert channel.unary_unary("/test.Echo/Unary")(b"u", timeout=5) == b"u"
    steps, (after, _) = recorder.seen[:3], recorder.seen[3]
    assert len({c.span_id for c, _ in steps}) == 1 and all(recording for _, recording in steps)
    assert after.trace_id != steps[0][0].trace_id  # the stream's span did not stay attached to the thread
    stream, unary = finished(telemetry, exporter)
    assert stream.context.span_id == steps[0][0].span_id and stream.name == "/test.Echo/Stream"
    assert dict(stream.attributes or {})["rpc.grpc.status_code"] == 0
    assert unary.parent is None


@pytest.mark.parametrize("name", tel.SAMPLERS)
def test_sampling_rule_decides_like_the_sdk_sampler_it_builds(name: str) -> None:
    import random

    from opentelemetry.sdk.trace.sampling import Decision
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    rule = tel.SamplingRule.from_env(Env({"OTEL_TRACES_SAMPLER": name, "OTEL_TRACES_SAMPLER_ARG": "0.3"}))
    sampler = rule.sampler()
    generator = random.Random(7)
    decisions = set()
    for i in range(3000):
        trace_id = generator.getrandbits(128) or 1
        parent = None
        if i % 3:
            flags = TraceFlags(TraceFlags.SAMPLED if i % 3 == 1 else TraceFlags.DEFAULT)
            parent = SpanContext(trace_id, generator.getrandbits(64) or 1, True, flags)
        context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
        result = sampler.should_sample(context, trace_id, "m", SpanKind.SERVER)
        expected = result.decision == Decision.RECORD_AND_SAMPLE
        assert rule.samples(trace_id, parent) == expected, (name, i)
        decisions.add(expected)
    assert decisions == {"always_on": {True}, "always_off": {False}}.get(name, {True, False})


def test_a_call_handled_inside_a_current_span_follows_it_like_the_sdk() -> None:
    """Without a traceparent the current span is the parent (as for the SDK): decided as its child, not a root."""
    from opentelemetry import context as context_api
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    telemetry, exporter = traced({"OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    spans: Any = telemetry.call_concerns()[0].for_method(Method.from_path("/test.Echo/Unary"))

    class Context:
        def invocation_metadata(self) -> tuple[()]:
            return ()

        def code(self) -> None:
            return None

    sampled = SpanContext(0x1234, 0x5678, True, TraceFlags(TraceFlags.SAMPLED))
    token = context_api.attach(trace.set_span_in_context(NonRecordingSpan(sampled)))
    try:
        state = spans.enter(Context())
        spans.leave(state, Context())
    finally:
        context_api.detach(token)
    # Parent-based: the sampled current span is followed although roots are never sampled.
    (call,) = finished(telemetry, exporter)
    assert call.context.trace_id == 0x1234
    assert call.parent is not None and call.parent.span_id == 0x5678
    # Outside it, a call is a root again: not sampled, a trace of its own.
    state = spans.enter(Context())
    spans.leave(state, Context())
    span = state[0]
    assert not span.is_recording() and span.get_span_context().trace_id != 0x1234


def test_preset_trace_ids_are_used_once_per_thread() -> None:
    ids = _PresetTraceIds()
    ids.preset(42)
    assert ids.generate_trace_id() == 42
    following = ids.generate_trace_id()
    assert following != 42 and following > 0
