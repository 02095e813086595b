"""Tracing on: the Translate span carries masked numbers only, and call_ref carries its trace and span ids."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from numprotect.core.call_ref import CallRef
from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import create_redis
from numprotect.core.routes import RouteTable
from numprotect.core.settings import Env, RedisSettings
from numprotect.core.telemetry import Telemetry
from numprotect.services.translation.app import build_sync
from numprotect.translation.v1 import translation_pb2 as pb
from numprotect.translation.v1 import translation_pb2_grpc
from support.identity import record_blocks
from support.inprocess import running_sync_service

X = "700100000000001"
A = "13800000001"
B = "13900000002"


async def test_span_attributes_are_masked_and_call_ref_links_the_span(
    redis_env: dict[str, str], route_factory: Any
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    redis = create_redis(RedisSettings.from_env(Env(redis_env)))
    await RouteTable(redis).put(X, route_factory("b1"))
    await redis.aclose()
    async with running_sync_service("translation", build_sync, redis_env, telemetry=Telemetry(provider)) as service:
        record_blocks(service.redis, "cm", X)
        assert service.runtime.identity.directory is not None
        service.runtime.identity.directory.reload()
        stub: Any = translation_pb2_grpc.TranslationServiceStub(service.channel_as(Role.CARRIER, "cm"))
        reply = await stub.Translate(pb.TranslateRequest(calling_number=A, called_number=X, call_id="t"))
        rejected = await stub.Translate(pb.TranslateRequest(calling_number="13700000003", called_number=X))
    assert reply.decision == pb.DECISION_CONNECT and rejected.decision == pb.DECISION_REJECT
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith("/Translate")]
    assert len(spans) == 2
    connect, reject = spans
    attributes = dict(connect.attributes or {})
    assert attributes["numprotect.virtual_number"] == "700********0001"
    assert attributes["numprotect.calling_number"] == "138****0001"
    assert attributes["numprotect.binding_id"] == "b1"
    flat = " ".join(str(v) for s in spans for v in (s.attributes or {}).values())
    assert A not in flat and X not in flat and B not in flat  # never a clear number
    assert dict(reject.attributes or {})["numprotect.reject_reason"] == "REJECT_REASON_NO_BINDING"
    ref = CallRef.decode(reply.call_ref)
    assert (ref.trace_id, ref.span_id) == (connect.context.trace_id, connect.context.span_id)
