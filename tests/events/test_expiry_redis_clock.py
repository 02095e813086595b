"""The expirer finds due bindings by Redis's clock, the one expire_due.lua expires by: an events process whose own
clock lags Redis's (here by an hour) still records binding.expired at once, not that much later."""

from __future__ import annotations

import asyncio
from typing import Any

from events.test_router import binding_record

from numprotect.core.binding_records import binding_key
from numprotect.core.clock import FixedClock, SystemClock
from numprotect.core.metrics import Metrics
from numprotect.services.events.expirer import Expirer
from support.event_outbox import outbox
from support.event_routing import committed_binding, events_settings, router_parts

HOUR_MS = 3_600_000


async def test_a_binding_is_expired_by_redis_time_when_the_process_clock_lags(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, _, _, _):
        record = binding_record("b-exp-clock", SystemClock().now_ms(), ttl_ms=200)
        await committed_binding(redis, record)
        await asyncio.sleep(0.3)
        lagging = FixedClock(SystemClock().now_ms() - HOUR_MS)
        expirer = Expirer(redis, events_settings(), Metrics("events"), lagging)
        assert await expirer.round() == 1
        [entry] = [e for e in outbox(redis_sync, binding_key(record.binding_id)) if e["ty"] == "binding.expired"]
        assert entry["d"] == str(record.expire_ms)
