"""ListDeliveries and ListDeadLetters through the served service: paged with signed tokens bound to their endpoint
and filter, newest attempts first, dead letters oldest first; filtered by event; redrive of named events."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from events.conftest import TENANT, ServiceFactory

from numprotect.core import event_keys
from numprotect.events.v1 import events_pb2 as pb
from support.event_routing import add_entry, number_entry
from support.rpc import fails, violated_fields
from support.webhook_receiver import Reply, webhook_receiver

SLOT = 977
NUMBERS = ("700100000000011", "700100000000012")


async def _pages(call: Any, request: Any, field: str) -> list[list[Any]]:
    pages = []
    while True:
        reply = await call(request)
        pages.append(list(getattr(reply, field)))
        if not reply.next_page_token:
            return pages
        request.page_token = reply.next_page_token


async def test_attempts_and_dead_letters_page_with_tokens_bound_to_their_listing(
    events_service: ServiceFactory, redis_sync: Any
) -> None:
    now_ms = int(time.time() * 1000)
    async with webhook_receiver() as receiver, events_service() as events:
        receiver.script([Reply(status=503)])
        tenant = events.tenant()
        create = pb.CreateEndpointRequest(url=receiver.url, event_types=[event_keys.NUMBER_LOCKED])
        ep = (await tenant.CreateEndpoint(create)).endpoint.endpoint_id
        other = (await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=receiver.url + "/2"))).endpoint.endpoint_id
        for number in NUMBERS:
            add_entry(redis_sync, SLOT, number_entry(TENANT, number, now_ms))
        attempts = len(events.servicer.settings.retry_schedule) + 1
        await receiver.wait_for(attempts * len(NUMBERS), timeout_s=15)

        deadline = time.monotonic() + 10
        while True:
            letters = await tenant.ListDeadLetters(pb.ListDeadLettersRequest(endpoint_id=ep))
            if len(letters.dead_letters) == len(NUMBERS) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        event_ids = [letter.event_id for letter in letters.dead_letters]
        assert len(event_ids) == len(NUMBERS)
        assert all(letter.attempts == attempts and letter.last_error for letter in letters.dead_letters)

        pages = await _pages(
            tenant.ListDeadLetters, pb.ListDeadLettersRequest(endpoint_id=ep, page_size=1), "dead_letters"
        )
        assert [[letter.event_id for letter in page] for page in pages] == [[event_id] for event_id in event_ids]

        everything = await tenant.ListDeliveries(pb.ListDeliveriesRequest(endpoint_id=ep))
        assert len(everything.deliveries) == attempts * len(NUMBERS) and not everything.next_page_token
        # Newest first (as recorded: two events' attempts in flight at once may end in either order; one event's
        # attempts are one after another).
        for event_id in event_ids:
            numbers = [d.attempt for d in everything.deliveries if d.event_id == event_id]
            assert numbers == list(range(attempts, 0, -1))
        assert all(d.http_status == 503 and not d.succeeded for d in everything.deliveries)
        pages = await _pages(tenant.ListDeliveries, pb.ListDeliveriesRequest(endpoint_id=ep, page_size=4), "deliveries")
        assert [len(page) for page in pages] == [4, attempts * len(NUMBERS) - 4]
        assert [d for page in pages for d in page] == list(everything.deliveries)
        one = await _pages(
            tenant.ListDeliveries,
            pb.ListDeliveriesRequest(endpoint_id=ep, event_id=event_ids[0], page_size=2),
            "deliveries",
        )
        assert sorted(d.attempt for page in one for d in page) == list(range(1, attempts + 1))
        assert {d.event_id for page in one for d in page} == {event_ids[0]}

        # A token continues only its own listing: not another endpoint's, not another filter's.
        first = await tenant.ListDeliveries(pb.ListDeliveriesRequest(endpoint_id=ep, page_size=1))
        for elsewhere in (
            pb.ListDeliveriesRequest(endpoint_id=other, page_token=first.next_page_token),
            pb.ListDeliveriesRequest(endpoint_id=ep, event_id=event_ids[1], page_token=first.next_page_token),
        ):
            error = await fails(grpc.StatusCode.INVALID_ARGUMENT, tenant.ListDeliveries(elsewhere))
            assert violated_fields(error) == ["page_token"]
        first_letter = await tenant.ListDeadLetters(pb.ListDeadLettersRequest(endpoint_id=ep, page_size=1))
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            tenant.ListDeadLetters(
                pb.ListDeadLettersRequest(endpoint_id=other, page_token=first_letter.next_page_token)
            ),
        )
        assert violated_fields(error) == ["page_token"]

        # Redrive of one named event: only it leaves the dead letters; an id that is none of them counts nothing.
        receiver.script([Reply(status=200)])
        unknown = "evt_" + "q" * 26
        redriven = await tenant.RedriveDeadLetters(
            pb.RedriveDeadLettersRequest(endpoint_id=ep, event_ids=[event_ids[1], unknown])
        )
        assert redriven.events_requeued == 1
        later = await receiver.wait_for(attempts * len(NUMBERS) + 1)
        assert later[-1].webhook_id == event_ids[1]
        left = await tenant.ListDeadLetters(pb.ListDeadLettersRequest(endpoint_id=ep))
        assert [letter.event_id for letter in left.dead_letters] == [event_ids[0]]
