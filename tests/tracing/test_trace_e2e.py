"""One trace across the suite: the six services as processes export over real OTLP/gRPC to a receiver here.

- CreateBinding: binding SERVER -> binding INTERNAL allocation.batch -> binding CLIENT (a batch call to
  allocation) -> allocation SERVER -> Redis CLIENT spans.
- Translate and the CDR ingestion of that call: the ingestion span links to the translation span whose ids
  the call_ref carried.
- events serves its API traced (CreateEndpoint) while its router renders the binding's event, which carries the
  parties' numbers: neither shows them in a span.
- A SIP INVITE through the adapter: its `SIP INVITE` span is the parent of translation's span of that call (the
  traceparent rides in the TranslateStream request), the 302's call_ref names that span, and the CDR ingested with
  that call_ref links to it.
- No span attribute (nor event, link attribute or status text) carries an unmasked phone number.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.common.v1 import common_pb2 as np_common_pb2
from numprotect.core.call_ref import CallRef
from numprotect.core.identity.principal import Role
from numprotect.core.settings import SERVICE_NAMES
from numprotect.events.v1 import events_pb2, events_pb2_grpc
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.identity import mint_in
from support.processes import ServiceProcess
from support.redis_server import free_port
from support.sip_client import SipClient

PARTY_A = "13812345678"
PARTY_B = "13987654321"
BLOCK = "70010000042"
TENANT = "t-trace"
CITY = "010"
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
REDIS_SCOPE = "opentelemetry.instrumentation.redis"

pytestmark = pytest.mark.slow


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class Received:
    """One span as the receiver got it, ids as hex (as in logs and call_refs)."""

    service: str
    scope: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    links: list[tuple[str, str, dict[str, Any]]]
    texts: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, service: str, scope: str, span: trace_pb2.Span) -> Received:
        texts = [span.name, span.status.message]
        texts += [f"{kv.key}={_value(kv.value)!r}" for event in span.events for kv in event.attributes]
        texts += [event.name for event in span.events]
        links = [
            (link.trace_id.hex(), link.span_id.hex(), {kv.key: _value(kv.value) for kv in link.attributes})
            for link in span.links
        ]
        texts += [f"{k}={v!r}" for _, _, attrs in links for k, v in attrs.items()]
        attributes = {kv.key: _value(kv.value) for kv in span.attributes}
        texts += [f"{k}={v!r}" for k, v in attributes.items()]
        return cls(
            service,
            scope,
            span.trace_id.hex(),
            span.span_id.hex(),
            span.parent_span_id.hex(),
            span.name,
            span.kind,
            attributes,
            links,
            texts,
        )


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC trace collector on a loopback port: keeps every span and every resource."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.resources: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(  # noqa: N802 (the generated servicer's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
                service = str(resource.get("service.name", ""))
                self.resources[service] = resource
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(Received.of(service, scope_spans.scope.name, span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, what: str, predicate: Callable[[list[Received]], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return
            time.sleep(0.05)
        names = sorted({f"{s.service}:{s.name}" for s in self.snapshot()})
        raise AssertionError(f"no {what} after {timeout}s; received: {names}")

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def receiver() -> Iterator[TraceReceiver]:
    collector = TraceReceiver()
    yield collector
    collector.stop()


@dataclass
class Suite:
    processes: dict[str, ServiceProcess]
    channels: dict[str, grpc.Channel]  # each service's, as the principal that calls it here
    sip_port: int  # the adapter's SIP port (UDP and TCP)


@pytest.fixture
def suite(receiver: TraceReceiver, redis_env: dict[str, str], tmp_path: Path) -> Iterator[Suite]:
    """allocation, binding, translation, cdr, events and sip (as carrier cmcc) as processes, tracing everything to
    the receiver."""
    environ = {
        **redis_env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    processes: dict[str, ServiceProcess] = {}
    channels: dict[str, grpc.Channel] = {}
    # Minted before the processes start, so each loads them at start-up.
    callers = {
        "allocation": mint_in(redis_env, Role.OPERATOR),
        "binding": mint_in(redis_env, Role.TENANT, TENANT),
        "translation": mint_in(redis_env, Role.CARRIER, "cmcc"),
        "cdr": mint_in(redis_env, Role.CARRIER, "cmcc"),
        "events": mint_in(redis_env, Role.TENANT, TENANT),
        "sip": mint_in(redis_env, Role.OPERATOR),  # its gRPC port serves health only
    }
    sip_token = tmp_path / "sip.token"
    sip_token.write_text(mint_in(redis_env, Role.CARRIER, "cmcc"))
    sip_token.chmod(0o600)
    sip_port = free_port()
    sip_env = {"NUMPROTECT_SIP_PORT": str(sip_port), "NUMPROTECT_SERVICE_TOKEN_FILE": str(sip_token)}
    try:
        for service in SERVICE_NAMES:
            peers = {f"NUMPROTECT_{name.upper()}_ADDR": p.address for name, p in processes.items()}
            processes[service] = ServiceProcess(service, {**environ, **peers, **(sip_env if service == "sip" else {})})
        for service, process in processes.items():
            process.wait_serving()
            channels[service] = process.channel(callers[service])
        yield Suite(processes, channels, sip_port)
    finally:
        for channel in channels.values():
            channel.close()
        for process in reversed(processes.values()):
            process.stop()
            # Shown by pytest only when the test fails.
            print(f"--- {process.service} log (last 40 lines) ---", *process.lines[-40:], sep="\n")


def _ancestors(span: Received, by_id: dict[str, Received]) -> Iterator[Received]:
    current = by_id.get(span.parent_span_id)
    while current is not None:
        yield current
        current = by_id.get(current.parent_span_id)


def test_create_binding_translate_and_cdr_form_linked_traces(suite: Suite, receiver: TraceReceiver) -> None:
    allocation: Any = allocation_pb2_grpc.AllocationServiceStub(suite.channels["allocation"])
    binding: Any = binding_pb2_grpc.BindingServiceStub(suite.channels["binding"])
    translation: Any = translation_pb2_grpc.TranslationServiceStub(suite.channels["translation"])
    cdr: Any = cdr_pb2_grpc.CdrServiceStub(suite.channels["cdr"])
    events: Any = events_pb2_grpc.EventServiceStub(suite.channels["events"])

    # An endpoint for the tenant's events (a receiver that does not resolve: only the routing and the spans count).
    events.CreateEndpoint(events_pb2.CreateEndpointRequest(url="https://hooks.example.invalid/np"), timeout=10)
    allocation.ImportBlock(
        allocation_pb2.ImportBlockRequest(
            block=BLOCK, tenant_id=TENANT, city_code=CITY, actor="test", carrier_id="cmcc"
        ),
        timeout=10,
    )
    time.sleep(0.3)  # translation and cdr learn the block's carrier on their next reload (every 0.1 s here)
    created = binding.CreateBinding(
        binding_pb2.CreateBindingRequest(
            tenant_id=TENANT,
            out_order_id="order-trace-1",
            mode=np_common_pb2.BINDING_MODE_AXB,
            party_a=PARTY_A,
            party_b=PARTY_B,
            ttl=duration_pb2.Duration(seconds=3600),
            city_code=CITY,
            user_consent=True,
        ),
        timeout=10,
    ).binding
    virtual = created.virtual_number
    assert virtual.startswith(BLOCK)
    numbers = (PARTY_A, PARTY_B, virtual)

    translated = translation.Translate(
        translation_pb2.TranslateRequest(calling_number=PARTY_A, called_number=virtual, call_id="call-trace-1"),
        timeout=10,
    )
    assert translated.decision == translation_pb2.DECISION_CONNECT
    assert translated.target_number == PARTY_B
    call_ref = CallRef.decode(translated.call_ref)
    assert call_ref.trace_id and call_ref.span_id, "Translate's call_ref carries no trace ids"
    streamed = list(
        translation.TranslateStream(
            iter(
                [
                    translation_pb2.TranslateStreamRequest(
                        request=translation_pb2.TranslateRequest(
                            calling_number=PARTY_B, called_number=virtual, call_id="call-trace-2"
                        )
                    )
                ]
            ),
            timeout=10,
        )
    )
    assert [m.response.decision for m in streamed] == [translation_pb2.DECISION_CONNECT]

    record = cdr_pb2.CallDetailRecord(
        call_id="call-trace-1",
        binding_id=created.binding_id,
        tenant_id=TENANT,
        calling_number=PARTY_A,
        called_number=virtual,
        target_number=PARTY_B,
        display_number=virtual,
        call_type=cdr_pb2.CALL_TYPE_A_TO_PEER,
        release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
        release_cause=16,
        unconnected_cause=cdr_pb2.UNCONNECTED_CAUSE_NONE,
        carrier_id="cmcc",
        call_ref=translated.call_ref,
    )
    start_ms = int(time.time() * 1000) - 60_000
    record.call_time.FromMilliseconds(start_ms)
    record.ring_time.FromMilliseconds(start_ms + 2_000)
    record.answer_time.FromMilliseconds(start_ms + 5_000)
    record.release_time.FromMilliseconds(start_ms + 35_000)
    ingested = cdr.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[record]), timeout=10)
    assert ingested.accepted == 1, ingested

    def server_span(spans: list[Received], service: str, method: str) -> Received | None:
        found = [s for s in spans if s.service == f"numprotect-{service}" and s.kind == SERVER and s.name == method]
        return found[-1] if found else None

    create_method = "/numprotect.binding.v1.BindingService/CreateBinding"
    translate_method = "/numprotect.translation.v1.TranslationService/Translate"

    def create_trace_complete(spans: list[Received]) -> bool:
        root = server_span(spans, "binding", create_method)
        if root is None:
            return False
        in_trace = [s for s in spans if s.trace_id == root.trace_id]
        return any(s.service == "numprotect-allocation" and s.scope == REDIS_SCOPE for s in in_trace)

    receiver.wait_for("complete CreateBinding trace", create_trace_complete)
    receiver.wait_for("Translate span", lambda spans: server_span(spans, "translation", translate_method) is not None)
    receiver.wait_for(
        "TranslateStream span",
        lambda spans: server_span(spans, "translation", translate_method + "Stream") is not None,
    )
    # The router has rendered the binding's event (its payload holds both parties): the tenant's log has it.
    # (Events of different slots are routed in no set order: the CDR's may come first.)
    watch = events.WatchEvents(events_pb2.WatchEventsRequest(cursor="0", event_types=["binding.created"]), timeout=15)
    assert next(iter(watch)).event.type == "binding.created"
    watch.cancel()
    receiver.wait_for(
        "events WatchEvents span",
        lambda spans: server_span(spans, "events", "/numprotect.events.v1.EventService/WatchEvents") is not None,
    )
    receiver.wait_for(
        "events CreateEndpoint span",
        lambda spans: server_span(spans, "events", "/numprotect.events.v1.EventService/CreateEndpoint") is not None,
    )
    receiver.wait_for(
        "linked cdr span",
        lambda spans: any(
            s.service == "numprotect-cdr" and any(link[1] == format(call_ref.span_id, "016x") for link in s.links)
            for s in spans
        ),
    )
    spans = receiver.snapshot()
    by_id = {s.span_id: s for s in spans}

    # --- CreateBinding: binding SERVER -> allocation.batch -> binding CLIENT -> allocation SERVER -> Redis ---------
    root = server_span(spans, "binding", create_method)
    assert root is not None
    assert root.parent_span_id == ""  # the test's client is untraced: the trace starts at binding
    in_trace = [s for s in spans if s.trace_id == root.trace_id]
    binding_clients = [s for s in in_trace if s.service == "numprotect-binding" and s.kind == CLIENT]
    allocation_calls = [s for s in binding_clients if s.name.startswith("/numprotect.allocation.v1.")]
    assert allocation_calls, f"binding made no traced call to allocation: {[s.name for s in in_trace]}"
    assert {c.name.rsplit("/", 1)[1] for c in allocation_calls} == {"AllocateNumbers", "ConfirmReservations"}
    for client in allocation_calls:
        # The batch call's own span (this create went alone: one item) sits between the create and the call.
        batch = by_id[client.parent_span_id]
        assert (batch.service, batch.name, batch.parent_span_id) == (
            "numprotect-binding",
            "allocation.batch",
            root.span_id,
        )
        assert batch.attributes["numprotect.batch_items"] == 1 and not batch.links
        (server,) = [s for s in in_trace if s.kind == SERVER and s.parent_span_id == client.span_id]
        assert server.service == "numprotect-allocation"
        assert server.name == client.name
        redis_children = [s for s in in_trace if s.parent_span_id == server.span_id and s.scope == REDIS_SCOPE]
        assert redis_children, f"no Redis span under {server.name}"
        assert all(s.kind == CLIENT and s.service == "numprotect-allocation" for s in redis_children)
    binding_redis = [s for s in in_trace if s.service == "numprotect-binding" and s.scope == REDIS_SCOPE]
    assert binding_redis, "binding's own Redis calls made no span"
    assert all(root in _ancestors(s, by_id) for s in binding_redis)
    # Every span of the trace hangs under the binding server span: one tree, no orphan.
    assert all(root in _ancestors(s, by_id) for s in in_trace if s is not root)

    # --- Translate -> CDR ingestion: a span link ---------------------------------------------------------------------
    translate = server_span(spans, "translation", translate_method)
    assert translate is not None
    carried = (format(call_ref.trace_id, "032x"), format(call_ref.span_id, "016x"))
    assert (translate.trace_id, translate.span_id) == carried  # the call_ref names the translation span
    # The hot path's own Redis client (the sync server model) makes a CLIENT span under the Translate span.
    (translate_redis,) = [s for s in spans if s.parent_span_id == translate.span_id]
    assert (translate_redis.service, translate_redis.kind, translate_redis.name) == (
        "numprotect-translation",
        CLIENT,
        "EVALSHA",
    )
    assert translate_redis.attributes["db.system"] == "redis"
    assert translate_redis.attributes["db.statement"] == "EVALSHA ?"
    stream = server_span(spans, "translation", "/numprotect.translation.v1.TranslationService/TranslateStream")
    assert stream is not None
    (stream_redis,) = [s for s in spans if s.parent_span_id == stream.span_id]
    assert (stream_redis.kind, stream_redis.name, stream_redis.attributes["db.redis.pipeline_length"]) == (
        CLIENT,
        "EVALSHA",
        1,
    )
    linked = [
        s
        for s in spans
        if s.service == "numprotect-cdr" and (translate.trace_id, translate.span_id) in [(t, p) for t, p, _ in s.links]
    ]
    assert linked, "no cdr span links to the translation span"
    ingest_server = server_span(spans, "cdr", "/numprotect.cdr.v1.CdrService/IngestCdrs")
    assert ingest_server is not None
    for span in linked:
        assert span.trace_id != translate.trace_id  # linked, not the same trace
        assert span is ingest_server or ingest_server in _ancestors(span, by_id)

    # --- SIP INVITE -> translation's span of that call -> the CDR of that call_ref ---------------------------------
    with SipClient(suite.sip_port) as sip:
        deadline = time.monotonic() + 15
        for attempt in range(1000):
            branch = f"z9hG4bK-trace-{attempt}"
            answer = sip.request("INVITE", virtual, caller=PARTY_A, call_id=f"sip-trace-{attempt}", branch=branch)
            if answer.status == 302 or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # 503 until the adapter's TranslateStreams are up
    assert answer.status == 302, answer.text
    assert f"sip:{PARTY_B}@" in answer.header("Contact"), answer.text
    sip_ref = CallRef.decode(answer.header("X-Numprotect-Call-Ref"))
    sip_translation_ids = (format(sip_ref.trace_id, "032x"), format(sip_ref.span_id, "016x"))
    sip_record = cdr_pb2.CallDetailRecord()
    sip_record.CopyFrom(record)
    sip_record.call_id = f"sip-trace-{attempt}"
    sip_record.call_ref = answer.header("X-Numprotect-Call-Ref")
    assert cdr.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[sip_record]), timeout=10).accepted == 1

    def sip_call_traced(spans: list[Received]) -> bool:
        ids = {(s.trace_id, s.span_id) for s in spans}
        links = {(t, p) for s in spans if s.service == "numprotect-cdr" for t, p, _ in s.links}
        # The INVITE's span too: the adapter exports it on its own, and may do so after translation and cdr.
        parents = {(s.trace_id, s.parent_span_id) for s in spans if (s.trace_id, s.span_id) == sip_translation_ids}
        return sip_translation_ids in ids and sip_translation_ids in links and bool(parents & ids)

    receiver.wait_for("SIP INVITE -> translation -> cdr", sip_call_traced)
    spans = receiver.snapshot()
    by_id = {s.span_id: s for s in spans}
    (call_span,) = [s for s in spans if (s.trace_id, s.span_id) == sip_translation_ids]
    assert call_span.service == "numprotect-translation"
    invite = by_id[call_span.parent_span_id]  # the call's own span hangs under the INVITE's
    assert (invite.service, invite.name, invite.kind) == ("numprotect-sip", "SIP INVITE", SERVER)
    assert invite.trace_id == call_span.trace_id and invite.parent_span_id == ""
    assert invite.attributes["sip.response.status_code"] == 302

    # --- resources, health, masking -----------------------------------------------------------------------------------
    for service in SERVICE_NAMES:
        resource = receiver.resources[f"numprotect-{service}"]
        assert resource["service.version"]
        assert resource["service.instance.id"]
    assert not [s.name for s in spans if "grpc.health" in s.name or "Reflection" in s.name]
    leaks = [(s.service, s.name, text) for s in spans for text in s.texts for n in numbers if n in text]
    assert not leaks, f"unmasked phone numbers in spans: {leaks}"
    assert any(
        "****" in str(value) for s in spans for key, value in s.attributes.items() if key.startswith("numprotect.")
    ), "no masked number attribute at all"
