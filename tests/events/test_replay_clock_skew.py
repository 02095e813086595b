"""ReplayEvents and clocks: a log entry's id is its routing time by the Redis node of the tenant's slot, its `at` the
event's time by another clock (the binding service's host, another Redis node), which may run a little ahead. An
event whose time is in the range is replayed even when it was logged just before the range's start by the log's
clock."""

from __future__ import annotations

from typing import Any

from events.conftest import TENANT

from numprotect.core.clock import SystemClock
from numprotect.core.event_keys import TenantKeys
from numprotect.services.events.log import EventLog
from support.event_routing import add_endpoint, events_settings, queued, router_parts


async def test_an_event_logged_just_before_the_range_by_the_logs_clock_is_replayed(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, store, _, _):
        endpoint = await add_endpoint(store, TENANT, ["binding.created"])
        at = SystemClock().now_ms() - 60_000
        log = TenantKeys(TENANT).log
        # Routed 300 ms "before" its event: the producer's clock ran 300 ms ahead of the log's Redis node.
        early = redis_sync.xadd(
            log, {"id": "evt_a", "ty": "binding.created", "at": str(at), "p": "{}"}, id=f"{at - 300}-0"
        )
        # Outside the range by its own time: not replayed, however close its log id.
        redis_sync.xadd(log, {"id": "evt_b", "ty": "binding.created", "at": str(at - 1), "p": "{}"}, id=f"{at - 200}-0")
        replayed = await EventLog(redis, events_settings(), SystemClock()).replay(endpoint, at, at + 1000)
        assert replayed == 1
        assert queued(redis_sync, TENANT, endpoint.endpoint_id) == [early.decode()]
