"""Tenant isolation of the EventService: a tenant cannot see or change another tenant's endpoints, deliveries, dead
letters, replay them or watch its events. Naming another tenant is PERMISSION_DENIED; another tenant's endpoint id
under one's own tenant is NOT_FOUND (no oracle: the same answer as an id that does not exist). Only tenants and the
operator call the service; the operator's calls are audited."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
from events.conftest import OTHER_TENANT, TENANT, EventsClients, ServiceFactory
from google.protobuf import field_mask_pb2, timestamp_pb2

from numprotect.core.conversions import timestamp_from_ms
from numprotect.core.event_keys import TenantKeys
from numprotect.core.identity import audit
from numprotect.core.identity.principal import Role
from numprotect.events.v1 import events_pb2 as pb
from numprotect.events.v1 import events_pb2_grpc
from support.rpc import code_of, fails, violated_fields

URL = "https://hooks.example.com/h"
MISSING = "ep_" + "z" * 26
EVENT_ID = "evt_" + "a" * 26

Call = Callable[[Any, str, str], Any]  # (stub, tenant_id, endpoint_id) -> awaitable


def _range() -> dict[str, timestamp_pb2.Timestamp]:
    end = timestamp_pb2.Timestamp()
    end.GetCurrentTime()
    return {"start_time": timestamp_pb2.Timestamp(seconds=end.seconds - 60), "end_time": end}


# Every method that names one endpoint, as (name, call).
ENDPOINT_CALLS: list[tuple[str, Call]] = [
    ("GetEndpoint", lambda s, t, e: s.GetEndpoint(pb.GetEndpointRequest(tenant_id=t, endpoint_id=e))),
    (
        "UpdateEndpoint",
        lambda s, t, e: s.UpdateEndpoint(
            pb.UpdateEndpointRequest(
                endpoint=pb.Endpoint(tenant_id=t, endpoint_id=e, description="mine now"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            )
        ),
    ),
    (
        "RotateEndpointSecret",
        lambda s, t, e: s.RotateEndpointSecret(pb.RotateEndpointSecretRequest(tenant_id=t, endpoint_id=e)),
    ),
    ("DeleteEndpoint", lambda s, t, e: s.DeleteEndpoint(pb.DeleteEndpointRequest(tenant_id=t, endpoint_id=e))),
    ("ListDeliveries", lambda s, t, e: s.ListDeliveries(pb.ListDeliveriesRequest(tenant_id=t, endpoint_id=e))),
    ("ListDeadLetters", lambda s, t, e: s.ListDeadLetters(pb.ListDeadLettersRequest(tenant_id=t, endpoint_id=e))),
    (
        "RedriveDeadLetters",
        lambda s, t, e: s.RedriveDeadLetters(
            pb.RedriveDeadLettersRequest(tenant_id=t, endpoint_id=e, event_ids=[EVENT_ID])
        ),
    ),
    (
        "ReplayEvents",
        lambda s, t, e: s.ReplayEvents(pb.ReplayEventsRequest(tenant_id=t, endpoint_id=e, **_range())),
    ),
]


async def _endpoint_of(events: EventsClients, tenant_id: str) -> pb.Endpoint:
    endpoint: pb.Endpoint = (await events.tenant(tenant_id).CreateEndpoint(pb.CreateEndpointRequest(url=URL))).endpoint
    return endpoint


async def test_another_tenants_endpoint_is_not_found_and_stays_unchanged(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        mine = await _endpoint_of(events, TENANT)
        intruder = events.tenant(OTHER_TENANT)
        for name, call in ENDPOINT_CALLS:
            # Its own tenant (empty: itself) with the other's endpoint id: as if the id did not exist.
            for tenant_field in ("", OTHER_TENANT):
                error = await fails(grpc.StatusCode.NOT_FOUND, call(intruder, tenant_field, mine.endpoint_id))
                missing = await fails(grpc.StatusCode.NOT_FOUND, call(intruder, tenant_field, MISSING))
                assert (error.details() or "").replace(mine.endpoint_id, MISSING) == missing.details(), name
            # Naming the owner: refused before anything is looked up.
            await fails(grpc.StatusCode.PERMISSION_DENIED, call(intruder, TENANT, mine.endpoint_id))
        listed = await intruder.ListEndpoints(pb.ListEndpointsRequest())
        assert list(listed.endpoints) == []
        await fails(
            grpc.StatusCode.PERMISSION_DENIED, intruder.ListEndpoints(pb.ListEndpointsRequest(tenant_id=TENANT))
        )
        await fails(
            grpc.StatusCode.PERMISSION_DENIED,
            intruder.CreateEndpoint(pb.CreateEndpointRequest(tenant_id=TENANT, url=URL)),
        )
        # Nothing changed: the same endpoint, the same secret, still there.
        stored = await events.endpoints.get_stored(TENANT, mine.endpoint_id)
        assert stored is not None
        assert stored.secret == mine.secret and stored.previous_secret == ""
        got = (await events.tenant(TENANT).GetEndpoint(pb.GetEndpointRequest(endpoint_id=mine.endpoint_id))).endpoint
        assert got.description == "" and got.update_time == mine.update_time
        assert [s.endpoint_id for s in await events.endpoints.stored(TENANT)] == [mine.endpoint_id]


async def test_the_operator_acts_on_the_tenant_it_names_and_is_audited(
    events_service: ServiceFactory, redis_sync: Any
) -> None:
    async with events_service(background=False) as events:
        mine = await _endpoint_of(events, TENANT)
        operator = events.operator
        got = (
            await operator.GetEndpoint(pb.GetEndpointRequest(tenant_id=TENANT, endpoint_id=mine.endpoint_id))
        ).endpoint
        assert got.endpoint_id == mine.endpoint_id and got.secret == ""
        # Under another tenant the id is not found; with no tenant the operator is told to name one.
        await fails(
            grpc.StatusCode.NOT_FOUND,
            operator.GetEndpoint(pb.GetEndpointRequest(tenant_id=OTHER_TENANT, endpoint_id=mine.endpoint_id)),
        )
        await fails(grpc.StatusCode.INVALID_ARGUMENT, operator.GetEndpoint(pb.GetEndpointRequest(endpoint_id=MISSING)))
        updated = await operator.UpdateEndpoint(
            pb.UpdateEndpointRequest(
                endpoint=pb.Endpoint(tenant_id=TENANT, endpoint_id=mine.endpoint_id, description="by the operator"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            )
        )
        assert updated.endpoint.description == "by the operator"
        # A tenant's own calls leave no audit event; the operator's do, naming the tenant and the endpoint.
        await events.tenant(TENANT).GetEndpoint(pb.GetEndpointRequest(endpoint_id=mine.endpoint_id))
        audit_log = events.svc.runtime.identity.audit
        assert audit_log is not None and audit_log.flush()
        rows = [json.loads(fields[b"e"]) for _, fields in redis_sync.xrange(audit.LOG_KEY)]
        ours = [r for r in rows if "/numprotect.events.v1.EventService/" in r["method"]]
        assert {(r["method"].rsplit("/", 1)[1], r["role"], r["outcome"]) for r in ours} == {
            ("GetEndpoint", "operator", "OK"),
            ("GetEndpoint", "operator", "NOT_FOUND"),
            ("GetEndpoint", "operator", "INVALID_ARGUMENT"),
            ("UpdateEndpoint", "operator", "OK"),
        }
        update = next(r for r in ours if r["method"].endswith("/UpdateEndpoint"))
        assert update["target"] == f"endpoint.tenant_id={TENANT},endpoint.endpoint_id={mine.endpoint_id}"
        get_ok = next(r for r in ours if r["method"].endswith("/GetEndpoint") and r["outcome"] == "OK")
        assert get_ok["target"] == f"tenant_id={TENANT},endpoint_id={mine.endpoint_id}"


async def test_only_tenants_and_the_operator_call_the_service(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        mine = await _endpoint_of(events, TENANT)
        request = pb.GetEndpointRequest(tenant_id=TENANT, endpoint_id=mine.endpoint_id)
        for role, principal_id in [(Role.CARRIER, "cmcc"), (Role.REGULATOR, "reg"), (Role.SERVICE, "binding")]:
            assert await code_of(events.stub_as(role, principal_id).GetEndpoint(request)) == (
                grpc.StatusCode.PERMISSION_DENIED
            ), role
        assert await code_of(events.anonymous.GetEndpoint(request)) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_tenant_cannot_watch_another_tenants_events(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        intruder = events.tenant(OTHER_TENANT)
        stream = intruder.WatchEvents(pb.WatchEventsRequest(tenant_id=TENANT, cursor="0"))
        error = await fails(grpc.StatusCode.PERMISSION_DENIED, stream.read())
        assert "own tenant" in (error.details() or "")


async def test_an_update_naming_another_tenant_inside_the_endpoint_is_denied_by_the_layer(
    events_service: ServiceFactory,
) -> None:
    async with events_service(background=False) as events:
        mine = await _endpoint_of(events, TENANT)
        stub = events_pb2_grpc.EventServiceStub(events.svc.channel_as(Role.TENANT, OTHER_TENANT))
        request = pb.UpdateEndpointRequest(
            endpoint=pb.Endpoint(tenant_id=TENANT, endpoint_id=mine.endpoint_id, url="https://evil.example/"),
            update_mask=field_mask_pb2.FieldMask(paths=["url"]),
        )
        error = await fails(grpc.StatusCode.PERMISSION_DENIED, stub.UpdateEndpoint(request))
        assert "endpoint.tenant_id" in (error.details() or "")
        stored = await events.endpoints.get_stored(TENANT, mine.endpoint_id)
        assert stored is not None and stored.url == URL


def _log_event(redis_sync: Any, tenant_id: str, event_type: str, at_ms: int, n: int) -> str:
    """Appends an event to a tenant's log as route.lua does (id, ty, at, p); its log entry id."""
    event = f"evt_{tenant_id}{n}".ljust(30, "a")[:30]
    body = json.dumps({"id": event, "type": event_type, "tenant": tenant_id})
    entry: bytes = redis_sync.xadd(
        TenantKeys(tenant_id).log, {"id": event, "ty": event_type, "at": str(at_ms), "p": body}
    )
    return entry.decode()


async def _watched(stub: Any, request: pb.WatchEventsRequest, count: int) -> list[pb.WatchEventsResponse]:
    call = stub.WatchEvents(request)
    got: list[pb.WatchEventsResponse] = []
    try:
        async with asyncio.timeout(10):
            while len(got) < count:
                got.append(await call.read())
    finally:
        call.cancel()
    return got


async def test_a_watch_reads_only_its_own_tenants_log(events_service: ServiceFactory, redis_sync: Any) -> None:
    now_ms = int(time.time() * 1000)
    async with events_service(background=False) as events:
        mine = [_log_event(redis_sync, TENANT, "binding.created", now_ms, i) for i in range(2)]
        _log_event(redis_sync, OTHER_TENANT, "binding.created", now_ms, 9)
        theirs = _log_event(redis_sync, OTHER_TENANT, "cdr.created", now_ms, 8)
        got = await _watched(events.tenant(TENANT), pb.WatchEventsRequest(cursor="0"), 2)
        assert [r.cursor for r in got] == mine
        assert all(json.loads(r.event.payload_json)["tenant"] == TENANT for r in got)
        # The other tenant's events are there to be read: by it, and by the operator naming it (types filtered).
        got = await _watched(
            events.operator, pb.WatchEventsRequest(tenant_id=OTHER_TENANT, cursor="0", event_types=["cdr.created"]), 1
        )
        assert [r.cursor for r in got] == [theirs]
        # Resuming after its own last cursor, a tenant sees its next event, not the other tenant's newer ones.
        _log_event(redis_sync, OTHER_TENANT, "binding.created", now_ms, 7)
        newer = _log_event(redis_sync, TENANT, "binding.deleted", now_ms, 3)
        got = await _watched(events.tenant(TENANT), pb.WatchEventsRequest(cursor=mine[-1]), 1)
        assert [(r.cursor, r.event.type) for r in got] == [(newer, "binding.deleted")]


async def test_watch_request_rules(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        for request, field in (
            (pb.WatchEventsRequest(cursor="yesterday"), "cursor"),
            (pb.WatchEventsRequest(event_types=["binding.created", "call.ended"]), "event_types"),
        ):
            error = await fails(grpc.StatusCode.INVALID_ARGUMENT, events.tenant().WatchEvents(request).read())
            assert violated_fields(error) == [field]
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT, events.operator.WatchEvents(pb.WatchEventsRequest()).read()
        )
        assert violated_fields(error) == ["tenant_id"]


async def test_replay_queues_only_the_tenants_own_events_for_an_enabled_endpoint(
    events_service: ServiceFactory, redis_sync: Any
) -> None:
    now_ms = int(time.time() * 1000)
    async with events_service(background=False) as events:
        mine = await _endpoint_of(events, TENANT)
        logged = [_log_event(redis_sync, TENANT, "binding.created", now_ms - 1000, i) for i in range(3)]
        _log_event(redis_sync, OTHER_TENANT, "binding.created", now_ms - 1000, 5)
        replay = pb.ReplayEventsRequest(
            endpoint_id=mine.endpoint_id,
            start_time=timestamp_from_ms(now_ms - 60_000),
            end_time=timestamp_from_ms(now_ms + 1),
        )
        replayed = await events.tenant(TENANT).ReplayEvents(replay)
        assert replayed.events_queued == 3
        keys = TenantKeys(TENANT)
        assert sorted(m.decode() for m in redis_sync.zrange(keys.queue(mine.endpoint_id), 0, -1)) == sorted(logged)
        assert not redis_sync.exists(TenantKeys(OTHER_TENANT).queue(mine.endpoint_id))
        # A disabled endpoint gets nothing queued: FAILED_PRECONDITION saying how to enable it.
        await events.tenant(TENANT).UpdateEndpoint(
            pb.UpdateEndpointRequest(
                endpoint=pb.Endpoint(endpoint_id=mine.endpoint_id, state=pb.ENDPOINT_STATE_DISABLED),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            )
        )
        error = await fails(
            grpc.StatusCode.FAILED_PRECONDITION,
            events.tenant(TENANT).ReplayEvents(replay),
        )
        assert "ENDPOINT_STATE_DISABLED" in (error.details() or "")
