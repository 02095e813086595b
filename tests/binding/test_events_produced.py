"""The binding events (binding.created, .updated, .deleted) recorded by the real RPCs, each in the outbox of its
record's slot in the step that makes the change (binding_record_update.lua), with the hints for the events service
(the slot in its ring, the binding's expiry in the expiry ring) and the slot's binding expiries kept: an entry
while the binding is committed and not deleted. A repeated call records nothing again."""

from __future__ import annotations

from typing import Any

from binding.test_binding import B2, _mask, _ts, create_request

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.core.binding_records import binding_key
from support.event_outbox import all_outbox_entries, expiries, expiry_hint, hinted, outbox


def _entry(kind: str, binding: pb.Binding, at_ms: int, n: int) -> dict[str, str]:
    return {"ty": kind, "tn": "t1", "at": str(at_ms), "src": binding.binding_id, "n": str(n), "d": ""}


async def test_create_update_delete_record_their_events_in_the_records_slot(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        created = (await s.binding.CreateBinding(create_request("ev-1", ttl_seconds=600))).binding
        record = binding_key(created.binding_id)
        expire_ms = created.expire_time.ToMilliseconds()
        assert outbox(redis_sync, record) == [
            _entry("binding.created", created, created.create_time.ToMilliseconds(), 1)
        ]
        assert hinted(redis_sync, record)
        assert expiries(redis_sync, record) == {created.binding_id: expire_ms}
        assert expiry_hint(redis_sync, record) == expire_ms
        # The same order again: the same binding, nothing recorded again.
        again = (await s.binding.CreateBinding(create_request("ev-1", ttl_seconds=600))).binding
        assert again.binding_id == created.binding_id and len(outbox(redis_sync, record)) == 1

        moved = pb.Binding(binding_id=created.binding_id, tenant_id="t1", party_b=B2)
        updated = await s.binding.UpdateBinding(pb.UpdateBindingRequest(binding=moved, update_mask=_mask("party_b")))
        later = pb.Binding(binding_id=created.binding_id, tenant_id="t1", expire_time=_ts(expire_ms + 60_000))
        extended = await s.binding.UpdateBinding(
            pb.UpdateBindingRequest(binding=later, update_mask=_mask("expire_time"))
        )
        assert outbox(redis_sync, record)[1:] == [
            _entry("binding.updated", created, updated.binding.update_time.ToMilliseconds(), 2),
            _entry("binding.updated", created, extended.binding.update_time.ToMilliseconds(), 3),
        ]
        assert expiries(redis_sync, record) == {created.binding_id: expire_ms + 60_000}
        assert expiry_hint(redis_sync, record) == expire_ms  # ZADD LT: the earlier hint stays (early, never late)

        request = pb.DeleteBindingRequest(binding_id=created.binding_id, tenant_id="t1")
        deleted = await s.binding.DeleteBinding(request)
        assert outbox(redis_sync, record)[3:] == [
            _entry("binding.deleted", created, deleted.binding.delete_time.ToMilliseconds(), 4)
        ]
        assert expiries(redis_sync, record) == {}
        await s.binding.DeleteBinding(request)  # a repeated delete changes nothing: no event
        assert len(outbox(redis_sync, record)) == 4
        # Nothing else anywhere: every event of the binding is in its record's slot.
        assert len(all_outbox_entries(redis_sync)) == 4


async def test_an_update_that_changes_nothing_recorded_records_no_event(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        created = (await s.binding.CreateBinding(create_request("ev-2", ttl_seconds=600))).binding
        same = pb.Binding(binding_id=created.binding_id, tenant_id="t1", party_b=created.party_b)
        await s.binding.UpdateBinding(pb.UpdateBindingRequest(binding=same, update_mask=_mask("party_b")))
        assert [e["ty"] for e in outbox(redis_sync, binding_key(created.binding_id))] == ["binding.created"]
