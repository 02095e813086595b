"""EventService request validation: every rule answers INVALID_ARGUMENT naming the field (google.rpc.BadRequest),
the per-tenant endpoint limit RESOURCE_EXHAUSTED naming its setting, paging, and update_mask's rules."""

from __future__ import annotations

from typing import Any

import grpc
from events.conftest import TENANT, ServiceFactory
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from numprotect.core.event_keys import EVENT_TYPES
from numprotect.events.v1 import events_pb2 as pb
from support.rpc import fails, violated_fields

URL = "https://hooks.example.com/h"
EP = "ep_" + "a" * 26


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


BAD_FIELDS: list[tuple[dict[str, Any], str, str]] = [
    ({"url": ""}, "url", "is required"),
    ({"url": "ftp://example.com/h"}, "url", "https://"),
    ({"url": "https:///nohost"}, "url", "host"),
    ({"url": "https://user:pw@example.com/h"}, "url", "user name or password"),
    ({"url": "https://example.com/h#frag"}, "url", "fragment"),
    ({"url": "https://example.com/a b"}, "url", "spaces"),
    ({"url": "https://example.com:99999/h"}, "url", "is not a URL"),
    ({"url": "https://example.com/" + "a" * 2048}, "url", "2048"),
    ({"url": "https://10.1.2.3/h"}, "url", "NUMPROTECT_EVENTS_ALLOWED_NETWORKS"),
    ({"url": "https://[fe80::1]/h"}, "url", "link-local"),
    ({"url": "https://169.254.169.254/latest"}, "url", "address not allowed"),
    ({"url": "https://[::ffff:127.0.0.1]/h"}, "url", "loopback"),
    # Legacy numeric IPv4 forms: the resolver maps them onto addresses (aiohttp refuses some outright at send time)
    ({"url": "https://127.1/h"}, "url", "four decimal numbers (127.0.0.1)"),
    ({"url": "https://2130706433/h"}, "url", "four decimal numbers (127.0.0.1)"),
    ({"url": "https://0x7f000001/h"}, "url", "four decimal numbers (127.0.0.1)"),
    ({"url": "https://0177.0.0.1/h"}, "url", "four decimal numbers (127.0.0.1)"),
    ({"url": "https://10.1/h"}, "url", "four decimal numbers (10.0.0.1)"),
    ({"event_types": ["binding.created", "call.started"]}, "event_types", "binding.created, binding.updated"),
    ({"description": "d" * 257}, "description", "256"),
    # Shown to people (the operator's CLI table too): no terminal escapes, NULs or other control characters
    ({"description": "orders\x1b[2J\x1b]0;pwned\x07"}, "description", "control characters"),
    ({"description": "a\x00b"}, "description", "control characters"),
    ({"description": "a\x9bb"}, "description", "control characters"),
    ({"batch_size": -1}, "batch_size", "NUMPROTECT_EVENTS_MAX_BATCH_SIZE"),
    ({"batch_size": 101}, "batch_size", "to 100"),
    ({"max_concurrency": 65}, "max_concurrency", "NUMPROTECT_EVENTS_MAX_ENDPOINT_CONCURRENCY"),
    ({"tenant_id": "bad:tenant"}, "tenant_id", "PERMISSION_DENIED"),
]


async def test_create_refuses_each_bad_field_naming_it(events_service: ServiceFactory) -> None:
    async with events_service(
        background=False, NUMPROTECT_EVENTS_ALLOW_HTTP="off", NUMPROTECT_EVENTS_ALLOWED_NETWORKS=""
    ) as events:
        for fields, field, words in BAD_FIELDS:
            request = pb.CreateEndpointRequest(**{"url": URL, **fields})
            if words == "PERMISSION_DENIED":  # a tenant key naming another tenant (even a malformed one)
                await fails(grpc.StatusCode.PERMISSION_DENIED, events.tenant().CreateEndpoint(request))
                error = await fails(grpc.StatusCode.INVALID_ARGUMENT, events.operator.CreateEndpoint(request))
                assert violated_fields(error) == [field]
                continue
            error = await fails(grpc.StatusCode.INVALID_ARGUMENT, events.tenant().CreateEndpoint(request))
            assert violated_fields(error) == [field], fields
            assert words in (error.details() or ""), error.details()
        assert not await events.endpoints.stored(TENANT)


async def test_every_violation_of_a_request_is_named_at_once(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        request = pb.CreateEndpointRequest(url="gopher://x", event_types=["nope"], batch_size=1000, max_concurrency=-1)
        error = await fails(grpc.StatusCode.INVALID_ARGUMENT, events.tenant().CreateEndpoint(request))
        assert violated_fields(error) == ["url", "event_types", "batch_size", "max_concurrency"]


async def test_http_and_private_addresses_only_when_the_settings_allow_them(events_service: ServiceFactory) -> None:
    async with events_service(
        background=False, NUMPROTECT_EVENTS_ALLOW_HTTP="off", NUMPROTECT_EVENTS_ALLOWED_NETWORKS=""
    ) as events:
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            events.tenant().CreateEndpoint(pb.CreateEndpointRequest(url="http://a.example/")),
        )
        assert "NUMPROTECT_EVENTS_ALLOW_HTTP" in (error.details() or "")
    async with events_service(background=False) as events:  # FAST_SETTINGS: http on, 127.0.0.0/8 allowed
        created = await events.tenant().CreateEndpoint(pb.CreateEndpointRequest(url="http://127.0.0.1:8080/h"))
        assert created.endpoint.url == "http://127.0.0.1:8080/h"
        await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            events.tenant().CreateEndpoint(pb.CreateEndpointRequest(url="http://192.168.1.1/h")),
        )


async def test_a_tenant_has_at_most_the_configured_endpoints(events_service: ServiceFactory) -> None:
    async with events_service(background=False, NUMPROTECT_EVENTS_MAX_ENDPOINTS_PER_TENANT="2") as events:
        tenant = events.tenant()
        first = await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL))
        await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL))
        error = await fails(
            grpc.StatusCode.RESOURCE_EXHAUSTED, tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL))
        )
        assert "NUMPROTECT_EVENTS_MAX_ENDPOINTS_PER_TENANT" in (error.details() or "")
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        quota = error_details_pb2.QuotaFailure()
        assert any(d.Unpack(quota) for d in status.details)
        assert quota.violations[0].subject == "NUMPROTECT_EVENTS_MAX_ENDPOINTS_PER_TENANT"
        # Another tenant has its own count; a deleted endpoint frees a place.
        await events.tenant("t9").CreateEndpoint(pb.CreateEndpointRequest(url=URL))
        await tenant.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id=first.endpoint.endpoint_id))
        await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL))


async def test_list_pages_oldest_first_with_signed_tokens(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        tenant = events.tenant()
        created = [
            (await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=f"{URL}/{i}"))).endpoint.endpoint_id
            for i in range(5)
        ]
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await tenant.ListEndpoints(pb.ListEndpointsRequest(page_size=2, page_token=token))
            assert all(not e.secret for e in page.endpoints)
            seen.extend(e.endpoint_id for e in page.endpoints)
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == created and pages == 3
        everything = await tenant.ListEndpoints(pb.ListEndpointsRequest())
        assert [e.endpoint_id for e in everything.endpoints] == created and not everything.next_page_token
        first = await tenant.ListEndpoints(pb.ListEndpointsRequest(page_size=2))
        # A token continues only its own listing: another tenant's (the operator naming it) is refused.
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            events.operator.ListEndpoints(
                pb.ListEndpointsRequest(tenant_id="t2", page_size=2, page_token=first.next_page_token)
            ),
        )
        assert violated_fields(error) == ["page_token"]
        for bad in ("garbage", first.next_page_token[:-2]):
            error = await fails(
                grpc.StatusCode.INVALID_ARGUMENT, tenant.ListEndpoints(pb.ListEndpointsRequest(page_token=bad))
            )
            assert violated_fields(error) == ["page_token"]
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT, tenant.ListEndpoints(pb.ListEndpointsRequest(page_size=1001))
        )
        assert violated_fields(error) == ["page_size"]


async def test_update_mask_rules(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        tenant = events.tenant()
        ep = (await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL, description="d"))).endpoint.endpoint_id
        endpoint = pb.Endpoint(endpoint_id=ep, url=URL)

        async def refused(request: pb.UpdateEndpointRequest) -> tuple[list[str], str]:
            error = await fails(grpc.StatusCode.INVALID_ARGUMENT, tenant.UpdateEndpoint(request))
            return violated_fields(error), error.details() or ""

        fields, message = await refused(pb.UpdateEndpointRequest(endpoint=endpoint))
        assert fields == ["update_mask"] and "at least one" in message
        fields, message = await refused(pb.UpdateEndpointRequest(endpoint=endpoint, update_mask=mask("url", "secret")))
        assert fields == ["update_mask"] and "'secret'" in message and "updatable: url" in message
        fields, _ = await refused(pb.UpdateEndpointRequest(endpoint=endpoint, update_mask=mask("tenant_id")))
        assert fields == ["update_mask"]
        gone = pb.Endpoint(endpoint_id=ep, state=pb.ENDPOINT_STATE_GONE)
        fields, message = await refused(pb.UpdateEndpointRequest(endpoint=gone, update_mask=mask("state")))
        assert fields == ["endpoint.state"] and "GONE" in message
        bad = pb.Endpoint(endpoint_id=ep, url="ftp://x", event_types=["x.y"], batch_size=-3)
        fields, _ = await refused(
            pb.UpdateEndpointRequest(endpoint=bad, update_mask=mask("url", "event_types", "batch_size"))
        )
        assert fields == ["endpoint.url", "endpoint.event_types", "endpoint.batch_size"]
        hostile = pb.Endpoint(endpoint_id=ep, url="https://0x0a000001/h", description="ok\x1b[31m")
        fields, message = await refused(
            pb.UpdateEndpointRequest(endpoint=hostile, update_mask=mask("url", "description"))
        )
        assert fields == ["endpoint.url", "endpoint.description"] and "(10.0.0.1)" in message
        fields, _ = await refused(
            pb.UpdateEndpointRequest(endpoint=pb.Endpoint(endpoint_id="nope"), update_mask=mask("description"))
        )
        assert fields == ["endpoint.endpoint_id"]
        # A field the mask does not name is not checked, nor changed.
        updated = await tenant.UpdateEndpoint(
            pb.UpdateEndpointRequest(
                endpoint=pb.Endpoint(endpoint_id=ep, batch_size=-3), update_mask=mask("description")
            )
        )
        assert updated.endpoint.description == "" and updated.endpoint.batch_size == 0
        # "*": every updatable field, so a state must be given.
        whole = pb.Endpoint(
            endpoint_id=ep,
            url=URL + "/2",
            event_types=["number.locked"],
            state=pb.ENDPOINT_STATE_DISABLED,
            batch_size=3,
        )
        replaced = (
            await tenant.UpdateEndpoint(pb.UpdateEndpointRequest(endpoint=whole, update_mask=mask("*")))
        ).endpoint
        assert (
            replaced.url,
            list(replaced.event_types),
            replaced.state,
            replaced.batch_size,
            replaced.max_concurrency,
        ) == (
            URL + "/2",
            ["number.locked"],
            pb.ENDPOINT_STATE_DISABLED,
            3,
            0,
        )
        await fails(
            grpc.StatusCode.NOT_FOUND,
            tenant.UpdateEndpoint(
                pb.UpdateEndpointRequest(endpoint=pb.Endpoint(endpoint_id=EP), update_mask=mask("description"))
            ),
        )


async def test_disable_and_re_enable_a_gone_endpoint(events_service: ServiceFactory, redis_sync: Any) -> None:
    async with events_service(background=False) as events:
        tenant = events.tenant()
        ep = (await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL))).endpoint.endpoint_id
        await events.endpoints.mark_gone(TENANT, ep, "HTTP 410 from the receiver")
        got = (await tenant.GetEndpoint(pb.GetEndpointRequest(endpoint_id=ep))).endpoint
        assert (got.state, got.state_reason) == (pb.ENDPOINT_STATE_GONE, "HTTP 410 from the receiver")
        stored = await events.endpoints.get_stored(TENANT, ep)
        assert stored is not None and not stored.enabled
        for event_type in EVENT_TYPES:
            assert stored.subscribes(event_type)
        # A pause and failure count left by the old receiver go when the endpoint is enabled again.
        from numprotect.core.event_keys import TenantKeys

        keys = TenantKeys(TENANT)
        redis_sync.hset(keys.state(ep), mapping={"pause": 2**40, "fails": 7})
        enabled = pb.Endpoint(endpoint_id=ep, state=pb.ENDPOINT_STATE_ENABLED)
        again = (
            await tenant.UpdateEndpoint(pb.UpdateEndpointRequest(endpoint=enabled, update_mask=mask("state")))
        ).endpoint
        assert (again.state, again.state_reason) == (pb.ENDPOINT_STATE_ENABLED, "")
        assert not redis_sync.exists(keys.state(ep))
        assert redis_sync.zscore(keys.ready, ep) is not None
        # Disabled by the tenant: a 410 afterwards leaves it DISABLED (the tenant's word stands).
        disabled = pb.Endpoint(endpoint_id=ep, state=pb.ENDPOINT_STATE_DISABLED)
        await tenant.UpdateEndpoint(pb.UpdateEndpointRequest(endpoint=disabled, update_mask=mask("state")))
        await events.endpoints.mark_gone(TENANT, ep, "HTTP 410")
        got = (await tenant.GetEndpoint(pb.GetEndpointRequest(endpoint_id=ep))).endpoint
        assert (got.state, got.state_reason) == (pb.ENDPOINT_STATE_DISABLED, "")


async def test_ids_grace_and_ranges_are_checked(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        tenant = events.tenant()
        for call in (
            tenant.GetEndpoint(pb.GetEndpointRequest(endpoint_id="ep_x")),
            tenant.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id="")),
            tenant.RotateEndpointSecret(pb.RotateEndpointSecretRequest(endpoint_id="EP_" + "A" * 26)),
        ):
            error = await fails(grpc.StatusCode.INVALID_ARGUMENT, call)
            assert violated_fields(error) == ["endpoint_id"]
        ep = (await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL))).endpoint.endpoint_id
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            tenant.RotateEndpointSecret(
                pb.RotateEndpointSecretRequest(endpoint_id=ep, grace_period=duration_pb2.Duration(seconds=8 * 86400))
            ),
        )
        assert violated_fields(error) == ["grace_period"]
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            tenant.RotateEndpointSecret(
                pb.RotateEndpointSecretRequest(endpoint_id=ep, grace_period=duration_pb2.Duration(seconds=-1))
            ),
        )
        assert violated_fields(error) == ["grace_period"]
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            tenant.ListDeliveries(pb.ListDeliveriesRequest(endpoint_id=ep, event_id="evt_bad")),
        )
        assert violated_fields(error) == ["event_id"]
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            tenant.RedriveDeadLetters(pb.RedriveDeadLettersRequest(endpoint_id=ep, event_ids=["evt_" + "a" * 26, "x"])),
        )
        assert violated_fields(error) == ["event_ids[1]"]
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        later = timestamp_pb2.Timestamp(seconds=now.seconds + 60)
        long_ago = timestamp_pb2.Timestamp(seconds=now.seconds - 3 * 3600)  # retention 2h in FAST_SETTINGS
        for fields, violated in (
            ({}, ["start_time", "end_time"]),
            ({"start_time": now}, ["end_time"]),
            ({"start_time": later, "end_time": now}, ["end_time"]),
            ({"start_time": long_ago, "end_time": now}, ["start_time"]),
            ({"start_time": timestamp_pb2.Timestamp(seconds=-(10**12)), "end_time": now}, ["start_time"]),
        ):
            error = await fails(
                grpc.StatusCode.INVALID_ARGUMENT,
                tenant.ReplayEvents(pb.ReplayEventsRequest(endpoint_id=ep, **fields)),  # type: ignore[arg-type]
            )
            assert violated_fields(error) == violated, fields
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            tenant.ReplayEvents(pb.ReplayEventsRequest(endpoint_id=ep, start_time=long_ago, end_time=now)),
        )
        assert "NUMPROTECT_EVENTS_RETENTION" in (error.details() or "")
