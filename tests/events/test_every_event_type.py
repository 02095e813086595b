"""Every event type, end to end: the real allocation, binding, cdr and events services in-process (TLS, API keys) on
one Redis (standalone or cluster), a tenant's endpoint for every type on a real HTTP receiver on loopback, and the
state changes made through the RPCs (the tenant's bindings, the carrier's records, the operator's lock and unlock).
Each of the 8 types arrives, every request verifies with the standardwebhooks library and the secret CreateEndpoint
answered, each body names the binding, call or number it is about, and binding.expired comes within 5 s of the
expiry of a binding nobody touched."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from typing import Any

from binding import conftest as binding_fixtures
from binding.test_binding import create_request
from cdr import conftest as cdr_fixtures
from events.test_expiry import EXPIRY_PROMISE_MS
from google.protobuf.field_mask_pb2 import FieldMask
from standardwebhooks import Webhook

from numprotect.allocation.v1 import allocation_pb2
from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.cdr.v1 import cdr_pb2
from numprotect.core import event_keys
from numprotect.core.phone import mask
from numprotect.events.v1 import events_pb2
from support.webhook_receiver import Received, webhook_receiver

# allocation + binding (a block imported for TENANT, routed by CARRIER) and cdr, as their own tests serve them.
services = binding_fixtures.services
service_token_file = binding_fixtures.service_token_file
cdr_service = cdr_fixtures.cdr_service
make_record = cdr_fixtures.make_record
TENANT = binding_fixtures.TENANT
CARRIER = binding_fixtures.CARRIER

NEW_PARTY_B = "13700000003"
NUISANCE_CALLER = "13500000005"  # short calls to the first binding's number, enough to be flagged
SHORT_CALLS = 3
LOCK_REASON = "fraud report"
# What names an event's subject in its data, per type.
SUBJECT_FIELD = {
    "binding.created": "bindingId",
    "binding.updated": "bindingId",
    "binding.deleted": "bindingId",
    "binding.expired": "bindingId",
    "cdr.created": "callId",
    "abuse.flagged": "callingNumber",
    "number.locked": "virtualNumber",
    "number.unlocked": "virtualNumber",
}


def wall_ms(received: Received) -> int:
    """When the request arrived, by the wall clock (Received.at is monotonic)."""
    return int((time.time() - (time.monotonic() - received.at)) * 1000)


async def wait_for_every_type(received: list[Received], deadline_s: float) -> None:
    """Until the receiver has had every type (the test fails at `deadline_s` of the monotonic clock)."""
    while {json.loads(r.body)["type"] for r in received} != set(SUBJECT_FIELD):
        seen = sorted({json.loads(r.body)["type"] for r in received})
        assert time.monotonic() < deadline_s, f"only {seen} arrived"
        await asyncio.sleep(0.05)


async def test_every_event_type_arrives_signed_at_a_real_receiver(
    services: Any, cdr_service: Any, events_service: Any, make_record: Any
) -> None:
    async with (
        services(NUMPROTECT_BINDING_MIN_TTL="1s") as s,
        cdr_service(NUMPROTECT_CDR_ABUSE_MIN_CALLS=str(SHORT_CALLS)) as cdr,
        events_service() as events,
        webhook_receiver() as receiver,
    ):
        created = await events.tenant(TENANT).CreateEndpoint(
            events_pb2.CreateEndpointRequest(url=receiver.url, description="every type")
        )
        secret = created.endpoint.secret
        assert secret.startswith("whsec_") and list(created.endpoint.event_types) == []

        # The tenant's first binding: created, party B changed, deleted.
        first = (await s.binding.CreateBinding(create_request("every-type-1", ttl_seconds=600))).binding
        changed = pb.Binding(binding_id=first.binding_id, tenant_id=TENANT, party_b=NEW_PARTY_B)
        await s.binding.UpdateBinding(
            pb.UpdateBindingRequest(binding=changed, update_mask=FieldMask(paths=["party_b"]))
        )
        await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=first.binding_id, tenant_id=TENANT))
        # A second one that nobody touches again: it expires into binding.expired.
        second = (await s.binding.CreateBinding(create_request("every-type-2", ttl_seconds=2))).binding
        expire_ms = second.expire_time.ToMilliseconds()

        # The carrier reports the first binding's answered 62 s call (A to B) and a nuisance caller's short calls.
        x = first.virtual_number
        answered = make_record(
            "call-62s",
            answered_s=62,
            calling_number=first.party_a,
            called_number=x,
            target_number=first.party_b,
            call_type=cdr_pb2.CALL_TYPE_A_TO_PEER,
            binding_id=first.binding_id,
            carrier_id=CARRIER,
        )
        short = [
            make_record(
                f"call-short-{i}",
                answered_s=2,
                calling_number=NUISANCE_CALLER,
                called_number=x,
                binding_id=first.binding_id,
                carrier_id=CARRIER,
            )
            for i in range(SHORT_CALLS)
        ]
        ingested = await cdr.as_carrier(CARRIER).IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[answered, *short]))
        assert ingested.accepted == 1 + SHORT_CALLS, ingested

        # The operator locks the tenant's number, then unlocks it.
        locked = await s.allocation.LockNumber(allocation_pb2.LockNumberRequest(virtual_number=x, reason=LOCK_REASON))
        assert locked.number.state == allocation_pb2.NUMBER_STATE_LOCKED
        await s.allocation.UnlockNumber(allocation_pb2.UnlockNumberRequest(virtual_number=x))

        # binding.expired is the last due: every type by then, at most EXPIRY_PROMISE_MS after the expiry instant.
        wait_s = max(0.0, (expire_ms - time.time() * 1000) / 1000) + EXPIRY_PROMISE_MS / 1000
        await wait_for_every_type(receiver.received, time.monotonic() + wait_s)
        await asyncio.sleep(0.3)  # a few dispatcher polls: anything sent twice or extra has arrived by now
        received = list(receiver.received)

        # Every request verifies with the standardwebhooks library; its body's id is its webhook-id; an id that
        # comes again comes with the same bytes.
        bodies_by_id: dict[str, set[bytes]] = defaultdict(set)
        events_by_id: dict[str, dict[str, Any]] = {}
        for request in received:
            body = Webhook(secret).verify(request.body, request.headers)
            assert body["id"] == request.webhook_id and body["id"].startswith("evt_"), body
            bodies_by_id[body["id"]].add(request.body)
            events_by_id[body["id"]] = body
        assert {i: len(b) for i, b in bodies_by_id.items() if len(b) > 1} == {}
        by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for body in events_by_id.values():
            by_type[body["type"]].append(body)

        # One event per change, each about the right thing.
        subjects = {t: sorted(e["data"][SUBJECT_FIELD[t]] for e in events) for t, events in by_type.items()}
        assert subjects == {
            "abuse.flagged": [mask(NUISANCE_CALLER)],
            "binding.created": sorted([first.binding_id, second.binding_id]),
            "binding.deleted": [first.binding_id],
            "binding.expired": [second.binding_id],
            "binding.updated": [first.binding_id],
            "cdr.created": sorted(["call-62s", *(f"call-short-{i}" for i in range(SHORT_CALLS))]),
            "number.locked": [x],
            "number.unlocked": [x],
        }
        for body in events_by_id.values():
            assert body["data"].get("tenantId", TENANT) == TENANT, body

        created_first = next(e for e in by_type["binding.created"] if e["data"]["bindingId"] == first.binding_id)
        assert (created_first["data"]["partyB"], created_first["data"]["virtualNumber"]) == (first.party_b, x)
        (updated,) = by_type["binding.updated"]
        assert updated["data"]["partyB"] == NEW_PARTY_B != first.party_b
        (deleted,) = by_type["binding.deleted"]
        assert deleted["data"]["partyB"] == NEW_PARTY_B and "deleteTime" in deleted["data"]

        (call,) = [e["data"] for e in by_type["cdr.created"] if e["data"]["callId"] == "call-62s"]
        assert (call["bindingId"], call["calledNumber"], call["tenantId"]) == (first.binding_id, x, TENANT)
        answer_ms = answered.answer_time.ToMilliseconds()
        assert answered.release_time.ToMilliseconds() - answer_ms == 62_000
        assert (call["answerTime"], call["releaseTime"]) == (
            answered.answer_time.ToJsonString(),
            answered.release_time.ToJsonString(),
        )

        (flag,) = by_type["abuse.flagged"]
        assert flag["data"]["virtualNumber"] == x and flag["data"]["flagged"] is True
        assert int(flag["data"]["shortCalls"]) == SHORT_CALLS, flag

        (lock,) = by_type["number.locked"]
        (unlock,) = by_type["number.unlocked"]
        expected_number = {"virtualNumber": x, "tenantId": TENANT, "reason": LOCK_REASON}
        assert lock["data"] == expected_number and unlock["data"] == expected_number

        (expired,) = by_type["binding.expired"]
        assert expired["id"] == event_keys.event_id("binding.expired", second.binding_id, str(expire_ms))
        assert expired["data"]["state"] == "BINDING_STATE_EXPIRED"
        arrived_ms = min(wall_ms(r) for r in received if r.webhook_id == expired["id"])
        lag_ms = arrived_ms - expire_ms
        print(f"binding.expired arrived {lag_ms} ms after the expiry instant; {len(received)} requests in all")
        assert 0 <= lag_ms < EXPIRY_PROMISE_MS
