"""Tenant isolation end to end, through the served events service with its router and dispatcher, real receivers on
loopback and real Redis: each tenant's events reach only its own endpoint, signed with its own secret; its
deliveries and dead letters are listed to it alone, and only it (or the operator) redrives them."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
from events.conftest import OTHER_TENANT, TENANT, EventsClients, ServiceFactory
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from numprotect.core import event_keys
from numprotect.core.conversions import timestamp_from_ms
from numprotect.events.v1 import events_pb2 as pb
from support.event_routing import add_entry, number_entry
from support.rpc import fails
from support.webhook_receiver import Reply, WebhookReceiver, webhook_receiver

SLOT = 4242


async def _endpoint(events: EventsClients, tenant_id: str, receiver: WebhookReceiver) -> pb.Endpoint:
    request = pb.CreateEndpointRequest(url=receiver.url, event_types=[event_keys.NUMBER_LOCKED])
    endpoint: pb.Endpoint = (await events.tenant(tenant_id).CreateEndpoint(request)).endpoint
    return endpoint


async def _eventually(check: Any, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = await check()
        if outcome or time.monotonic() > deadline:
            return outcome
        await asyncio.sleep(0.05)


def _verified(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


async def test_each_tenants_events_reach_only_its_own_endpoint_and_records(
    events_service: ServiceFactory, redis_sync: Any
) -> None:
    now_ms = int(time.time() * 1000)
    async with (
        webhook_receiver() as mine_receiver,
        webhook_receiver() as theirs_receiver,
        events_service() as events,
    ):
        theirs_receiver.script([Reply(status=500)])  # every attempt fails: the other tenant's event dies
        mine = await _endpoint(events, TENANT, mine_receiver)
        theirs = await _endpoint(events, OTHER_TENANT, theirs_receiver)
        add_entry(redis_sync, SLOT, number_entry(TENANT, "700100000000001", now_ms))
        add_entry(redis_sync, SLOT, number_entry(OTHER_TENANT, "700100000000002", now_ms))

        [got] = await mine_receiver.wait_for(1)
        data = json.loads(got.body)["data"]
        assert (data["tenantId"], data["virtualNumber"]) == (TENANT, "700100000000001")
        assert _verified(mine.secret, got.body, got.headers)
        assert not _verified(theirs.secret, got.body, got.headers)

        attempts = len(events.servicer.settings.retry_schedule) + 1
        received = await theirs_receiver.wait_for(attempts)
        assert {json.loads(r.body)["data"]["tenantId"] for r in received} == {OTHER_TENANT}
        assert {r.webhook_id for r in received} == {received[0].webhook_id}

        tenant, other = events.tenant(TENANT), events.tenant(OTHER_TENANT)

        async def dead_letters() -> list[pb.DeadLetter]:
            reply = await other.ListDeadLetters(pb.ListDeadLettersRequest(endpoint_id=theirs.endpoint_id))
            return list(reply.dead_letters)

        [letter] = await _eventually(dead_letters)
        assert (letter.event_id, letter.attempts) == (received[0].webhook_id, attempts)

        async def my_deliveries() -> list[pb.Delivery]:
            reply = await tenant.ListDeliveries(pb.ListDeliveriesRequest(endpoint_id=mine.endpoint_id))
            return list(reply.deliveries)

        [delivery] = await _eventually(my_deliveries)
        assert (delivery.event_id, delivery.succeeded, delivery.http_status) == (got.webhook_id, True, 200)

        # Neither tenant reaches the other's records: NOT_FOUND, as for an endpoint that does not exist.
        for call in (
            tenant.ListDeadLetters(pb.ListDeadLettersRequest(endpoint_id=theirs.endpoint_id)),
            tenant.ListDeliveries(pb.ListDeliveriesRequest(endpoint_id=theirs.endpoint_id)),
            tenant.RedriveDeadLetters(pb.RedriveDeadLettersRequest(endpoint_id=theirs.endpoint_id)),
            other.ListDeliveries(pb.ListDeliveriesRequest(endpoint_id=mine.endpoint_id)),
        ):
            await fails(grpc.StatusCode.NOT_FOUND, call)
        assert (
            list((await tenant.ListDeadLetters(pb.ListDeadLettersRequest(endpoint_id=mine.endpoint_id))).dead_letters)
            == []
        )

        # Its owner redrives the dead letter: the same event, the same id, to its own receiver only.
        theirs_receiver.script([Reply(status=204)])
        redriven = await other.RedriveDeadLetters(pb.RedriveDeadLettersRequest(endpoint_id=theirs.endpoint_id))
        assert redriven.events_requeued == 1
        again = await theirs_receiver.wait_for(attempts + 1)
        assert again[-1].webhook_id == letter.event_id
        assert len(mine_receiver.received) == 1

        # Replay sends a tenant's own events again, with the same ids, to its own endpoint only.
        window = pb.ReplayEventsRequest(
            endpoint_id=mine.endpoint_id,
            start_time=timestamp_from_ms(now_ms - 1000),
            end_time=timestamp_from_ms(int(time.time() * 1000) + 1),
        )
        assert (await tenant.ReplayEvents(window)).events_queued == 1
        replayed = await mine_receiver.wait_for(2)
        assert [r.webhook_id for r in replayed] == [got.webhook_id, got.webhook_id]
        assert replayed[1].body == got.body
        await fails(
            grpc.StatusCode.NOT_FOUND,
            other.ReplayEvents(
                pb.ReplayEventsRequest(
                    endpoint_id=mine.endpoint_id, start_time=window.start_time, end_time=window.end_time
                )
            ),
        )
        await asyncio.sleep(0.3)
        assert len(mine_receiver.received) == 2 and len(theirs_receiver.received) == attempts + 1
