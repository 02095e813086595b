"""The outbox backlog: numprotect_events_outbox_entries is what all slots' outboxes held at the router's last sweep
(the gauge an alert watches when producers run and no router keeps up); an outbox the router empties is deleted,
but only when empty: an entry a producer added after the router's read stays, and a later XADD makes it again."""

from __future__ import annotations

from typing import Any

from events.test_router import TENANT, X

from numprotect.core import event_keys
from numprotect.core.redis_batch import Command, raise_first, send_together
from support.event_routing import add_endpoint, add_entry, number_entry, outbox_length, router_parts, sample

GAUGE = "numprotect_events_outbox_entries"


async def test_the_gauge_counts_every_outbox_entry_at_the_sweep_and_emptied_outboxes_go(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (_, store, router, metrics):
        await add_endpoint(store, TENANT)
        per_slot = {3: 2, 4000: 1, 16_000: 4}
        at = 1_790_000_000_000
        for slot, count in per_slot.items():
            for _ in range(count):
                at += 1
                add_entry(redis_sync, slot, number_entry(TENANT, X, at), hint=False)  # no hints: only a sweep sees
        assert sample(metrics, GAUGE) == 0
        assert await router.poll() == 0 and sample(metrics, GAUGE) == 0  # a poll reads no lengths
        assert await router.sweep() == 7
        assert sample(metrics, GAUGE) == 7  # what waited when the sweep looked
        assert all(redis_sync.exists(event_keys.outbox_key(slot)) == 0 for slot in per_slot)
        assert await router.sweep() == 0 and sample(metrics, GAUGE) == 0

        # A producer writes again: the outbox is made again and routed.
        add_entry(redis_sync, 3, number_entry(TENANT, X, at + 1))
        assert await router.poll() == 1 and redis_sync.exists(event_keys.outbox_key(3)) == 0


async def test_an_entry_added_after_the_read_keeps_the_outbox(redis_env: dict[str, str], redis_sync: Any) -> None:
    async with router_parts(redis_env) as (redis, _, router, _):
        slot = 77
        first = add_entry(redis_sync, slot, number_entry(TENANT, X, 1_790_000_000_001))
        keys = [event_keys.outbox_key(slot), event_keys.route_lease_key(slot)]
        take = Command.run(router._take_script, keys, [router._token, 5000, 10])
        [taken] = raise_first(await send_together(redis, [take]))
        assert len(taken) == 1
        later = add_entry(redis_sync, slot, number_entry(TENANT, X, 1_790_000_000_002))  # between read and removal
        done = Command.run(router._done_script, keys, [router._token, first])
        assert raise_first(await send_together(redis, [done])) == [1]
        assert outbox_length(redis_sync, slot) == 1
        assert [entry_id.decode() for entry_id, _ in redis_sync.xrange(keys[0])] == [later]
