"""EventService endpoints through the served service: create, get, list (paged), update (update_mask), rotate,
delete; the stored form and the keys delete removes."""

from __future__ import annotations

import base64
from typing import Any

import grpc
from events.conftest import OTHER_TENANT, TENANT, ServiceFactory
from google.protobuf import field_mask_pb2

from numprotect.core.event_keys import EVENT_TYPES, TENANTS_KEY, TenantKeys
from numprotect.events.v1 import events_pb2 as pb
from support.rpc import fails

URL = "https://hooks.example.com/numprotect"


def create(url: str = URL, **fields: Any) -> pb.CreateEndpointRequest:
    return pb.CreateEndpointRequest(url=url, **fields)


async def test_create_answers_the_endpoint_with_its_secret_once_and_stores_it(
    events_service: ServiceFactory, redis_sync: Any
) -> None:
    async with events_service(background=False) as events:
        tenant = events.tenant(TENANT)
        created = (
            await tenant.CreateEndpoint(
                create(event_types=["binding.created", "cdr.created"], description="orders", batch_size=10)
            )
        ).endpoint
        assert created.tenant_id == TENANT
        assert created.endpoint_id.startswith("ep_") and len(created.endpoint_id) == 29
        assert created.secret.startswith("whsec_")
        assert len(base64.b64decode(created.secret.removeprefix("whsec_"))) == 24
        assert list(created.event_types) == ["binding.created", "cdr.created"]
        assert (created.state, created.batch_size, created.description) == (pb.ENDPOINT_STATE_ENABLED, 10, "orders")
        assert created.create_time == created.update_time and created.create_time.seconds > 0

        got = (await tenant.GetEndpoint(pb.GetEndpointRequest(endpoint_id=created.endpoint_id))).endpoint
        assert got.secret == ""  # only Create and Rotate show it
        expected = pb.Endpoint()
        expected.CopyFrom(created)
        expected.ClearField("secret")
        assert got == expected

        keys = TenantKeys(TENANT)
        assert redis_sync.sismember(TENANTS_KEY, TENANT)
        assert redis_sync.hkeys(keys.endpoints) == [created.endpoint_id.encode()]
        stored = await events.endpoints.get_stored(TENANT, created.endpoint_id)
        assert stored is not None and stored.secret == created.secret
        assert stored.signing_secrets(0) == [created.secret]
        assert stored.subscribes("cdr.created") and not stored.subscribes("binding.expired")
        assert stored.batch_size == 10 and stored.concurrency(4) == 4 and stored.enabled


async def test_an_endpoint_with_no_types_subscribes_to_every_type(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        created = (await events.tenant().CreateEndpoint(create())).endpoint
        stored = await events.endpoints.get_stored(TENANT, created.endpoint_id)
        assert stored is not None
        assert all(stored.subscribes(t) for t in EVENT_TYPES)
        assert stored.batch_size == 1  # 0: one event per request


async def test_the_operator_creates_for_the_tenant_it_names(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        created = (await events.operator.CreateEndpoint(create(tenant_id=OTHER_TENANT))).endpoint
        assert created.tenant_id == OTHER_TENANT
        listed = await events.tenant(OTHER_TENANT).ListEndpoints(pb.ListEndpointsRequest())
        assert [e.endpoint_id for e in listed.endpoints] == [created.endpoint_id]
        error = await fails(grpc.StatusCode.INVALID_ARGUMENT, events.operator.CreateEndpoint(create()))
        assert "tenant_id" in (error.details() or "")


async def test_delete_removes_the_endpoint_and_every_key_of_its_deliveries(
    events_service: ServiceFactory, redis_sync: Any
) -> None:
    async with events_service(background=False) as events:
        tenant = events.tenant()
        kept = (await tenant.CreateEndpoint(create())).endpoint.endpoint_id
        gone = (await tenant.CreateEndpoint(create())).endpoint.endpoint_id
        keys = TenantKeys(TENANT)
        for ep in (kept, gone):
            redis_sync.zadd(keys.queue(ep), {"1-0": 1})
            redis_sync.zadd(keys.in_flight(ep), {"1-0": 1})
            redis_sync.hset(keys.attempts(ep), "1-0", 1)
            redis_sync.zadd(keys.dead(ep), {"2-0": 1})
            redis_sync.hset(keys.dead_errors(ep), "2-0", "HTTP 500")
            redis_sync.xadd(keys.deliveries(ep), {"e": "x"})
            redis_sync.hset(keys.state(ep), "fails", 3)
            redis_sync.zadd(keys.ready, {ep: 1})
        await tenant.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id=gone))
        assert not any(redis_sync.exists(key) for key in keys.endpoint_keys(gone))
        assert all(redis_sync.exists(key) for key in keys.endpoint_keys(kept))
        assert redis_sync.zrange(keys.ready, 0, -1) == [kept.encode()]
        assert redis_sync.hkeys(keys.endpoints) == [kept.encode()]
        await fails(grpc.StatusCode.NOT_FOUND, tenant.GetEndpoint(pb.GetEndpointRequest(endpoint_id=gone)))
        await fails(grpc.StatusCode.NOT_FOUND, tenant.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id=gone)))


async def test_update_changes_only_the_fields_the_mask_names(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        tenant = events.tenant()
        created = (await tenant.CreateEndpoint(create(description="a", batch_size=5))).endpoint
        change = pb.Endpoint(
            tenant_id=TENANT,
            endpoint_id=created.endpoint_id,
            url="https://other.example.com/h",
            description="b",
            batch_size=7,
            event_types=["binding.expired"],
        )
        updated = (
            await tenant.UpdateEndpoint(
                pb.UpdateEndpointRequest(
                    endpoint=change, update_mask=field_mask_pb2.FieldMask(paths=["url", "endpoint.event_types"])
                )
            )
        ).endpoint
        assert updated.url == "https://other.example.com/h"
        assert list(updated.event_types) == ["binding.expired"]
        assert (updated.description, updated.batch_size) == ("a", 5)  # not named: unchanged
        assert updated.secret == ""
        assert updated.update_time.ToMilliseconds() >= created.update_time.ToMilliseconds()
        got = (await tenant.GetEndpoint(pb.GetEndpointRequest(endpoint_id=created.endpoint_id))).endpoint
        assert got == updated
