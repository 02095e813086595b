"""EventLog.replay and read on a real Redis (standalone or cluster): the logged events of a time range, of the types
the endpoint subscribes to, queued again for that endpoint: the same log entries, the same event ids; an event
logged long after it happened is found by its time."""

from __future__ import annotations

from typing import Any

from numprotect.core.clock import SystemClock
from numprotect.core.event_keys import TenantKeys
from numprotect.services.events.log import EventLog
from support.event_routing import (
    add_endpoint,
    add_entry,
    events_settings,
    log_entries,
    number_entry,
    queued,
    router_parts,
)
from support.redis_state import plain

TENANT = "t1"
X = "70010000000"


async def test_replay_queues_the_events_of_a_range_again_with_the_same_ids(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, store, router, _):
        locks = await add_endpoint(store, TENANT, ["number.locked"])
        now = SystemClock().now_ms()
        hour = 3_600_000
        # Event times: two hours ago (routed only now, as after an outage), 30 min ago, 10 min ago, now; and an
        # unlock 20 min ago the endpoint does not subscribe to.
        times = [now - 2 * hour, now - hour // 2, now - hour // 6, now]
        for i, at in enumerate(times):
            add_entry(redis_sync, 100 + i, number_entry(TENANT, X, at))
        add_entry(redis_sync, 200, number_entry(TENANT, X, now - hour // 3, "number.unlocked"))
        assert await router.poll() == 5
        logged = {fields["at"]: (entry_id, fields["id"]) for entry_id, fields in log_entries(redis_sync, TENANT)}
        # Delivered: nothing queued any more.
        keys = TenantKeys(TENANT)
        redis_sync.delete(keys.queue(locks.endpoint_id), keys.attempts(locks.endpoint_id), keys.ready)

        log = EventLog(redis, events_settings(), SystemClock())
        assert await log.replay(locks, now - 3 * hour, now - hour // 6 + 1) == 3  # two hours ago .. 10 min ago

        expected = [logged[str(at)][0] for at in times[:3]]
        assert sorted(queued(redis_sync, TENANT, locks.endpoint_id)) == sorted(expected)
        attempts = {plain(k): plain(v) for k, v in redis_sync.hgetall(keys.attempts(locks.endpoint_id)).items()}
        assert attempts == dict.fromkeys(expected, "0")
        assert redis_sync.zscore(keys.ready, locks.endpoint_id) is not None
        events = await log.read(TENANT, [*expected, "1-1"])
        assert set(events) == set(expected)  # an entry not kept is absent
        assert [events[i].event_id for i in expected] == [logged[str(at)][1] for at in times[:3]]
        assert [events[i].time.ToMilliseconds() for i in expected] == times[:3]

        # Replayed again while still queued: queued once each, due as before.
        due = redis_sync.zrange(keys.queue(locks.endpoint_id), 0, -1, withscores=True)
        assert await log.replay(locks, now - 3 * hour, now - hour // 6 + 1) == 3
        assert redis_sync.zrange(keys.queue(locks.endpoint_id), 0, -1, withscores=True) == due
        # A range with none of its types: nothing.
        assert await log.replay(locks, now - hour // 3, now - hour // 3 + 1) == 0
