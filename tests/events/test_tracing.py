"""Spans of the events service's background work, with the in-memory exporter the tracing tests use: an
"events route" span per router drain that had slots to read (counts only), and a "webhook POST" CLIENT span per
request to a receiver (endpoint, tenant, event count, first event id, attempt, HTTP status, outcome; ERROR when no
2xx came), with no secret, no URL path or query and no phone number in any span."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from events.conftest import TENANT, ServiceFactory
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from tracing.test_telemetry import all_attribute_text, finished, traced

from numprotect.core import event_keys
from numprotect.core.clock import SystemClock
from numprotect.core.metrics import Metrics
from numprotect.events.v1 import events_pb2 as pb
from numprotect.services.events.router import Router
from support.event_routing import add_entry, number_entry, router_parts
from support.webhook_receiver import Reply, webhook_receiver

X = "70010000000"  # a virtual number (the event's subject): masked or absent in spans
SECRET_QUERY = "token=sekret-receiver-token"


async def spans_named(telemetry: Any, exporter: Any, name: str, count: int) -> list[ReadableSpan]:
    deadline = time.monotonic() + 10
    while True:
        spans = [s for s in finished(telemetry, exporter) if s.name == name]
        if len(spans) >= count or time.monotonic() > deadline:
            return sorted(spans, key=lambda s: s.start_time or 0)
        await asyncio.sleep(0.05)


async def test_each_webhook_request_and_routing_round_has_a_span_without_secrets_or_numbers(
    events_service: ServiceFactory, redis_sync: Any
) -> None:
    telemetry, exporter = traced()
    async with webhook_receiver() as receiver, events_service(telemetry=telemetry) as events:
        receiver.script([Reply(500), Reply(200)])
        created = await events.tenant().CreateEndpoint(
            pb.CreateEndpointRequest(url=f"{receiver.url}?{SECRET_QUERY}", event_types=["number.locked"])
        )
        endpoint = created.endpoint
        at = int(time.time() * 1000)
        add_entry(redis_sync, 9, number_entry(TENANT, X, at))
        await receiver.wait_for(2)
        posts = await spans_named(telemetry, exporter, "webhook POST", 2)
        routes = await spans_named(telemetry, exporter, "events route", 1)

    expected_id = event_keys.event_id("number.locked", X, str(at))
    assert [s.kind for s in posts] == [SpanKind.CLIENT, SpanKind.CLIENT]
    failed, succeeded = (dict(s.attributes or {}) for s in posts)
    for attributes in (failed, succeeded):
        assert attributes["numprotect.endpoint_id"] == endpoint.endpoint_id
        assert attributes["numprotect.tenant_id"] == TENANT
        assert attributes["numprotect.event_count"] == 1
        assert attributes["numprotect.event_id"] == expected_id
        assert attributes["server.address"] == "127.0.0.1"
    assert (failed["numprotect.attempt"], failed["http.response.status_code"], failed["numprotect.outcome"]) == (
        1,
        500,
        "retry",
    )
    assert posts[0].status.status_code is StatusCode.ERROR and posts[0].status.description == "HTTP 500"
    assert (succeeded["numprotect.attempt"], succeeded["http.response.status_code"]) == (2, 200)
    assert succeeded["numprotect.outcome"] == "success" and posts[1].status.status_code is StatusCode.UNSET

    assert any((s.attributes or {}).get("numprotect.events_routed") == 1 for s in routes)
    assert all(set(s.attributes or {}) <= ROUTE_ATTRIBUTES for s in routes)

    text = all_attribute_text(finished(telemetry, exporter))
    assert endpoint.secret and endpoint.secret not in text
    assert "sekret" not in text and "/hook" not in text
    assert X not in text


ROUTE_ATTRIBUTES = {
    "numprotect.slots",
    "numprotect.events_routed",
    "numprotect.entries_dropped",
    "numprotect.slots_left",
}


async def test_a_round_with_nothing_to_read_makes_no_span(redis_env: dict[str, str], redis_sync: Any) -> None:
    telemetry, exporter = traced()
    async with router_parts(redis_env) as (redis, store, router, _):
        traced_router = Router(redis, router.settings, store, Metrics("events"), SystemClock(), tracer=telemetry.tracer)
        assert await traced_router.poll() == 0
        assert [s for s in finished(telemetry, exporter) if s.name == "events route"] == []
        add_entry(redis_sync, 5, {"ty": "binding.renamed", "tn": TENANT, "at": "1", "src": "b", "n": "1", "d": ""})
        add_entry(redis_sync, 6, number_entry(TENANT, X, 1_790_000_000_000))
        assert await traced_router.poll() == 1
        [span] = [s for s in finished(telemetry, exporter) if s.name == "events route"]
        assert dict(span.attributes or {}) == {
            "numprotect.slots": 2,
            "numprotect.events_routed": 1,
            "numprotect.entries_dropped": 1,
            "numprotect.slots_left": 0,
        }
