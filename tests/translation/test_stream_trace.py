"""TranslateStream with TranslateRequest.traceparent: a call of a sampled trace gets its own `translation.call` span
(child of that context, linked to the stream's span), masked attributes, and its ids in the call's call_ref."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from numprotect.core.call_ref import CallRef
from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import create_redis
from numprotect.core.routes import RouteTable
from numprotect.core.settings import Env, RedisSettings
from numprotect.core.telemetry import Telemetry, link_from_call_ref
from numprotect.services.translation.app import build_sync
from numprotect.services.translation.core import CALL_SPAN
from numprotect.translation.v1 import translation_pb2 as pb
from numprotect.translation.v1 import translation_pb2_grpc
from support.inprocess import running_sync_service

X = "700100000000001"
OTHER_CARRIERS = "700200000000001"  # a block carrier "ct" routes, not "cm"
A = "13800000001"
B = "13900000002"
STRANGER = "13700000003"
INVITE_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
INVITE_SPAN = 0x00F067AA0BA902B7


def traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


@asynccontextmanager
async def traced_stream_stub(
    redis_env: dict[str, str], route_factory: Any
) -> AsyncIterator[tuple[Any, InMemorySpanExporter]]:
    """Translation in-process with every span exported in memory; carrier "cm" routes X (bound A <-> B)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # ParentBased(ALWAYS_ON): a stream without a traceparent is sampled
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    redis = create_redis(RedisSettings.from_env(Env(redis_env)))
    await RouteTable(redis).put(X, route_factory("b1"))
    await redis.aclose()
    async with running_sync_service("translation", build_sync, redis_env, telemetry=Telemetry(provider)) as service:
        service.route("cm", X)
        service.route("ct", OTHER_CARRIERS)
        yield translation_pb2_grpc.TranslationServiceStub(service.channel_as(Role.CARRIER, "cm")), exporter


async def _one_batch(stub: Any, requests: list[pb.TranslateRequest], **kwargs: Any) -> pb.TranslateStreamResponse:
    async def send() -> AsyncIterator[pb.TranslateStreamRequest]:
        yield pb.TranslateStreamRequest(requests=requests)

    answers = [message async for message in stub.TranslateStream(send(), **kwargs)]
    assert len(answers) == 1
    answer: pb.TranslateStreamResponse = answers[0]
    assert [r.call_id for r in answer.responses] == [r.call_id for r in requests]
    return answer


def _call(call_id: str, caller: str, called: str = X, context: str = "") -> pb.TranslateRequest:
    return pb.TranslateRequest(call_id=call_id, calling_number=caller, called_number=called, traceparent=context)


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


async def test_a_call_with_a_sampled_traceparent_gets_its_own_span_and_call_ref(
    redis_env: dict[str, str], route_factory: Any
) -> None:
    async with traced_stream_stub(redis_env, route_factory) as (stub, exporter):
        answer = await _one_batch(
            stub,
            [
                _call("traced", A, context=traceparent(INVITE_TRACE, INVITE_SPAN)),
                _call("plain", B),
                _call("unsampled", A, context=traceparent(INVITE_TRACE + 1, INVITE_SPAN, sampled=False)),
                _call("garbage", A, context="00-zz-01"),
                _call("stranger", STRANGER, context=traceparent(INVITE_TRACE + 2, INVITE_SPAN)),
                _call("forbidden", A, OTHER_CARRIERS, traceparent(INVITE_TRACE + 3, INVITE_SPAN)),
            ],
        )
    traced, plain, unsampled, garbage, stranger, forbidden = answer.responses
    for connected in (traced, plain, unsampled, garbage):
        assert connected.response.decision == pb.DECISION_CONNECT, connected
    assert stranger.response.reject_reason == pb.REJECT_REASON_NO_BINDING
    assert forbidden.error.startswith("PERMISSION_DENIED")

    (stream,) = _named(exporter, "/numprotect.translation.v1.TranslationService/TranslateStream")
    calls = {span.context.trace_id: span for span in _named(exporter, CALL_SPAN)}
    # Only the three calls with a valid, sampled traceparent have a span, each in its own (the INVITE's) trace.
    assert set(calls) == {INVITE_TRACE, INVITE_TRACE + 2, INVITE_TRACE + 3}
    for span in calls.values():
        assert span.kind is SpanKind.SERVER
        assert span.parent is not None and span.parent.span_id == INVITE_SPAN and span.parent.is_remote
        assert [link.context.span_id for link in span.links] == [stream.context.span_id]
        assert span.links[0].context.trace_id == stream.context.trace_id != span.context.trace_id

    call = calls[INVITE_TRACE]
    attributes = dict(call.attributes or {})
    assert attributes["numprotect.decision"] == "DECISION_CONNECT"
    assert attributes["numprotect.virtual_number"] == "700********0001"
    assert attributes["numprotect.calling_number"] == "138****0001"
    assert attributes["numprotect.binding_id"] == "b1"
    # The call_ref names the call's own span: a CDR carrying it links there, and through it to the INVITE.
    ref = CallRef.decode(traced.response.call_ref)
    assert (ref.trace_id, ref.span_id) == (INVITE_TRACE, call.context.span_id)
    link = link_from_call_ref(traced.response.call_ref)
    assert link is not None and link.context.span_id == call.context.span_id
    # Calls without a sampled context of their own keep the stream's span, as before.
    for other in (plain, unsampled, garbage):
        ref = CallRef.decode(other.response.call_ref)
        assert (ref.trace_id, ref.span_id) == (stream.context.trace_id, stream.context.span_id)

    assert dict(calls[INVITE_TRACE + 2].attributes or {})["numprotect.reject_reason"] == "REJECT_REASON_NO_BINDING"
    denied = calls[INVITE_TRACE + 3]
    assert denied.status.status_code is StatusCode.ERROR
    assert denied.status.description is not None and denied.status.description.startswith("PERMISSION_DENIED")

    spans = exporter.get_finished_spans()
    flat = " ".join(
        [str(value) for span in spans for value in (span.attributes or {}).values()]
        + [span.status.description or "" for span in spans]
    )
    for number in (A, B, STRANGER, X, OTHER_CARRIERS):
        assert number not in flat  # never a clear number


async def test_no_link_when_the_stream_itself_is_not_sampled(redis_env: dict[str, str], route_factory: Any) -> None:
    async with traced_stream_stub(redis_env, route_factory) as (stub, exporter):
        unsampled_stream = (("traceparent", traceparent(INVITE_TRACE + 9, INVITE_SPAN + 9, sampled=False)),)
        answer = await _one_batch(
            stub,
            [
                _call("traced", A, context=traceparent(INVITE_TRACE, INVITE_SPAN)),
                _call("plain", B),
            ],
            metadata=unsampled_stream,
        )
    traced, plain = answer.responses
    assert not _named(exporter, "/numprotect.translation.v1.TranslationService/TranslateStream")
    (call,) = _named(exporter, CALL_SPAN)
    assert call.context.trace_id == INVITE_TRACE and not call.links
    ref = CallRef.decode(traced.response.call_ref)
    assert (ref.trace_id, ref.span_id) == (INVITE_TRACE, call.context.span_id)
    # An unsampled call's call_ref carries no ids (a CDR must not link to a span that was never exported).
    plain_ref = CallRef.decode(plain.response.call_ref)
    assert (plain_ref.trace_id, plain_ref.span_id) == (0, 0)
