"""Signing secrets leave the service only in the answers of CreateEndpoint and RotateEndpointSecret: never in a span
(attributes, events, status), a log record, an audit event or an error."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from events.conftest import OTHER_TENANT, TENANT, ServiceFactory
from google.protobuf import field_mask_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from numprotect.core.identity import audit
from numprotect.core.telemetry import Telemetry
from numprotect.events.v1 import events_pb2 as pb
from support.rpc import fails

URL = "https://hooks.example.com/h"


async def test_secrets_appear_in_no_span_log_audit_event_or_error(
    events_service: ServiceFactory, redis_sync: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    secrets: list[str] = []
    errors: list[str] = []
    async with events_service(telemetry=Telemetry(provider), background=False) as events:
        for stub, tenant_id in ((events.tenant(TENANT), ""), (events.operator, TENANT)):
            created = (await stub.CreateEndpoint(pb.CreateEndpointRequest(tenant_id=tenant_id, url=URL))).endpoint
            ep = created.endpoint_id
            rotated = (
                await stub.RotateEndpointSecret(pb.RotateEndpointSecretRequest(tenant_id=tenant_id, endpoint_id=ep))
            ).endpoint
            secrets += [created.secret, rotated.secret]
            await stub.GetEndpoint(pb.GetEndpointRequest(tenant_id=tenant_id, endpoint_id=ep))
            await stub.ListEndpoints(pb.ListEndpointsRequest(tenant_id=tenant_id))
            await stub.UpdateEndpoint(
                pb.UpdateEndpointRequest(
                    endpoint=pb.Endpoint(tenant_id=tenant_id, endpoint_id=ep, url=URL + "/2"),
                    update_mask=field_mask_pb2.FieldMask(paths=["url"]),
                )
            )
            bad = pb.UpdateEndpointRequest(
                endpoint=pb.Endpoint(tenant_id=tenant_id, endpoint_id=ep, url="ftp://x"),
                update_mask=field_mask_pb2.FieldMask(paths=["url", "secret"]),
            )
            errors.append((await fails(grpc.StatusCode.INVALID_ARGUMENT, stub.UpdateEndpoint(bad))).details() or "")
        other = events.tenant(OTHER_TENANT)
        error = await fails(grpc.StatusCode.NOT_FOUND, other.GetEndpoint(pb.GetEndpointRequest(endpoint_id=ep)))
        errors.append(error.details() or "")
        audit_log = events.svc.runtime.identity.audit
        assert audit_log is not None and audit_log.flush()
    provider.shutdown()

    spans = exporter.get_finished_spans()
    assert any("CreateEndpoint" in span.name for span in spans)  # the calls were traced
    texts = [str(span.to_json()) for span in spans]
    texts += [record.getMessage() + str(record.__dict__) for record in caplog.records]
    audited = [str(fields) for _, fields in redis_sync.xrange(audit.LOG_KEY)]
    assert any("RotateEndpointSecret" in row for row in audited)  # the operator's calls were audited
    texts += audited + errors
    for secret in secrets:
        key = secret.removeprefix("whsec_")
        assert len(key) == 32
        assert not [text for text in texts if key in text]
    assert not [text for text in texts if "whsec_" in text]
