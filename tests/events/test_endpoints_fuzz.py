"""Fuzzing the EventService contract (tests/fuzz's generators and judges, against the served events service): every
RPC, called as a tenant and as the operator with random requests and with near-valid ones (a valid request with one
field changed), answers no INTERNAL, UNKNOWN or UNAVAILABLE, and every INVALID_ARGUMENT names a field of the
request. Examples per RPC: NUMPROTECT_FUZZ_PROFILE (tests/fuzz/profiles.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest
from events.conftest import TENANT, ServiceFactory
from fuzz.contracts import Rpc, call, problems, shown
from fuzz.profiles import FUZZ
from fuzz.strategies import Strategies
from google.protobuf import duration_pb2, field_mask_pb2
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from numprotect.core.conversions import timestamp_from_ms
from numprotect.core.identity.principal import Role
from numprotect.events.v1 import events_pb2 as pb
from support.tls import sync_channel_for

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
SERVICE = pb.DESCRIPTOR.services_by_name["EventService"]
RPCS = [Rpc(method) for method in SERVICE.methods]
STRATEGIES = Strategies({"numprotect.events.v1.RedriveDeadLettersRequest.event_ids": 1000})
URL = "https://hooks.example.com/h"


def valid_requests(endpoint_id: str) -> dict[str, Callable[[], Message]]:
    """A request of each RPC that succeeds for the tenant's endpoint (the operator's names the tenant)."""
    now_ms = int(time.time() * 1000)
    return {
        "CreateEndpoint": lambda: pb.CreateEndpointRequest(
            tenant_id=TENANT, url=URL, event_types=["binding.created"], description="d", batch_size=10
        ),
        "GetEndpoint": lambda: pb.GetEndpointRequest(tenant_id=TENANT, endpoint_id=endpoint_id),
        "ListEndpoints": lambda: pb.ListEndpointsRequest(tenant_id=TENANT, page_size=10),
        "UpdateEndpoint": lambda: pb.UpdateEndpointRequest(
            endpoint=pb.Endpoint(tenant_id=TENANT, endpoint_id=endpoint_id, description="e", batch_size=2),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "batch_size"]),
        ),
        "RotateEndpointSecret": lambda: pb.RotateEndpointSecretRequest(
            tenant_id=TENANT, endpoint_id=endpoint_id, grace_period=duration_pb2.Duration(seconds=60)
        ),
        "DeleteEndpoint": lambda: pb.DeleteEndpointRequest(tenant_id=TENANT, endpoint_id=endpoint_id),
        "ListDeliveries": lambda: pb.ListDeliveriesRequest(tenant_id=TENANT, endpoint_id=endpoint_id, page_size=5),
        "ReplayEvents": lambda: pb.ReplayEventsRequest(
            tenant_id=TENANT,
            endpoint_id=endpoint_id,
            start_time=timestamp_from_ms(now_ms - 60_000),
            end_time=timestamp_from_ms(now_ms),
        ),
        "ListDeadLetters": lambda: pb.ListDeadLettersRequest(tenant_id=TENANT, endpoint_id=endpoint_id),
        "RedriveDeadLetters": lambda: pb.RedriveDeadLettersRequest(
            tenant_id=TENANT, endpoint_id=endpoint_id, event_ids=["evt_" + "a" * 26]
        ),
        "WatchEvents": lambda: pb.WatchEventsRequest(tenant_id=TENANT, event_types=["cdr.created"], cursor="0"),
    }


@pytest.mark.parametrize("rpc", RPCS, ids=[rpc.method.name for rpc in RPCS])
async def test_no_request_gets_an_internal_answer(events_service: ServiceFactory, rpc: Rpc) -> None:
    async with events_service(background=False, NUMPROTECT_EVENTS_MAX_ENDPOINTS_PER_TENANT="10000") as events:
        created = await events.tenant().CreateEndpoint(pb.CreateEndpointRequest(url=URL))
        valid = valid_requests(created.endpoint.endpoint_id)[rpc.method.name]
        channels = {
            role: sync_channel_for(events.svc.address, events.svc.environ, events.svc.token(role, principal_id))
            for role, principal_id in ((Role.TENANT, TENANT), (Role.OPERATOR, ""))
        }
        first = await asyncio.to_thread(call, channels[Role.OPERATOR], rpc, valid())
        assert first.code == grpc.StatusCode.OK, first.details

        @FUZZ
        @given(
            role=st.sampled_from(list(channels)),
            request=st.one_of(STRATEGIES.message_of(rpc.input), STRATEGIES.near_valid(valid())),
        )
        def one(role: Role, request: Message) -> None:
            answer = call(channels[role], rpc, request)
            found = problems(rpc, answer)
            assert not found, f"{rpc.name} as {role.name}: {found}\nrequest:\n{shown(request)}"

        try:
            await asyncio.to_thread(one)
        finally:
            for channel in channels.values():
                channel.close()
