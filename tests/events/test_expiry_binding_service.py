"""binding.expired end to end: bindings made by the real binding service (with allocation) with a short TTL, the
real events service running its router and expirer, one Redis (standalone or cluster). The binding nobody touches
is told expired within 5 s of its expiry instant; the one extended and the one deleted are not."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from binding import conftest as binding_fixtures
from binding.test_binding import _mask, _ts, create_request
from events.test_expiry import EXPIRY_PROMISE_MS, now_ms

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.core import event_keys
from support.event_routing import log_entries

TENANT = "t1"
# The binding service's fixtures (allocation + binding served, a block imported for TENANT).
services = binding_fixtures.services
service_token_file = binding_fixtures.service_token_file


def events_of(redis_sync: Any, binding_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(type, body) of the binding's events in the tenant's log, in log order."""
    found = []
    for _, fields in log_entries(redis_sync, TENANT):
        body = json.loads(fields["p"])
        if body["type"].startswith("binding.") and body["data"]["bindingId"] == binding_id:
            found.append((fields["ty"], body))
    return found


async def test_only_the_binding_nobody_touched_is_told_expired_within_5_s(
    services: Any, events_service: Any, redis_sync: Any
) -> None:
    async with services(NUMPROTECT_BINDING_MIN_TTL="1s") as s, events_service():
        # A first create warms the connections (on a busy host it takes longer than the short TTL below).
        await s.binding.CreateBinding(create_request("exp-warm-up", ttl_seconds=600))
        untouched, extended, deleted = [
            reply.binding
            for reply in await asyncio.gather(
                *(
                    s.binding.CreateBinding(create_request(f"exp-{name}", ttl_seconds=2))
                    for name in ("untouched", "extended", "deleted")
                )
            )
        ]
        later = pb.Binding(
            binding_id=extended.binding_id,
            tenant_id=TENANT,
            expire_time=_ts(extended.expire_time.ToMilliseconds() + 60_000),
        )
        await s.binding.UpdateBinding(pb.UpdateBindingRequest(binding=later, update_mask=_mask("expire_time")))
        await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=deleted.binding_id, tenant_id=TENANT))

        expire_ms = untouched.expire_time.ToMilliseconds()
        deadline = time.monotonic() + 10
        while not any(t == "binding.expired" for t, _ in events_of(redis_sync, untouched.binding_id)):
            assert time.monotonic() < deadline, "binding.expired never came"
            await asyncio.sleep(0.02)
        lag_ms = now_ms() - expire_ms
        print(f"binding.expired in the log {lag_ms} ms after the expiry instant (binding service, events service)")
        assert 0 <= lag_ms < EXPIRY_PROMISE_MS
        await asyncio.sleep(1.0)  # the other two's old expiry passed too, and a few expiry polls

        [(_, created), (_, expired)] = events_of(redis_sync, untouched.binding_id)
        assert (created["type"], expired["type"]) == ("binding.created", "binding.expired")
        assert expired["id"] == event_keys.event_id("binding.expired", untouched.binding_id, str(expire_ms))
        assert expired["data"]["state"] == "BINDING_STATE_EXPIRED"
        assert expired["data"]["partyB"] == untouched.party_b
        assert [t for t, _ in events_of(redis_sync, extended.binding_id)] == ["binding.created", "binding.updated"]
        assert [t for t, _ in events_of(redis_sync, deleted.binding_id)] == ["binding.created", "binding.deleted"]
