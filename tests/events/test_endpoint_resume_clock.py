"""An endpoint that resumes (enabled again, or a new URL) is ready for a claim at once by Redis's clock, which
claim.lua compares the ready scores with, even when the API process's clock runs ahead of Redis's (endpoint_swap.lua
takes the caller's now only up to Redis's)."""

from __future__ import annotations

from typing import Any

from numprotect.core.clock import FixedClock
from numprotect.core.event_keys import TenantKeys
from numprotect.core.redis_client import create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.events.v1 import events_pb2 as pb
from numprotect.services.events.endpoints import EndpointSpec, EndpointStore, StoredEndpoint
from numprotect.services.events.settings import EventsSettings

TENANT = "t-resume-clock"
KEYS = TenantKeys(TENANT)
HOUR_MS = 3_600_000


def redis_now_ms(redis_sync: Any) -> int:
    seconds, micros = redis_sync.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_resumed_endpoint_is_ready_by_redis_time_when_the_callers_clock_runs_ahead(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    client = create_redis(RedisSettings.from_env(Env(redis_env)))
    ahead = FixedClock(redis_now_ms(redis_sync) + HOUR_MS)
    store = EndpointStore(client, EventsSettings.from_env(Env({})), ahead)
    try:
        created = await store.create(EndpointSpec(TENANT, "https://a.example/h", (), "", 0, 0))

        def new_url(stored: StoredEndpoint) -> tuple[StoredEndpoint, bool]:
            return stored.changed(lambda e: setattr(e, "url", "https://b.example/h"), ahead.now_ms()), True

        def disable(stored: StoredEndpoint) -> tuple[StoredEndpoint, bool]:
            return stored.changed(lambda e: setattr(e, "state", pb.ENDPOINT_STATE_DISABLED), ahead.now_ms()), False

        def enable(stored: StoredEndpoint) -> tuple[StoredEndpoint, bool]:
            return stored.changed(lambda e: setattr(e, "state", pb.ENDPOINT_STATE_ENABLED), ahead.now_ms()), True

        assert await store.change(TENANT, created.endpoint_id, new_url) is not None
        ready = redis_sync.zscore(KEYS.ready, created.endpoint_id)
        assert ready is not None and ready <= redis_now_ms(redis_sync), (ready, redis_now_ms(redis_sync))

        redis_sync.zrem(KEYS.ready, created.endpoint_id)
        assert await store.change(TENANT, created.endpoint_id, disable) is not None
        assert await store.change(TENANT, created.endpoint_id, enable) is not None
        ready = redis_sync.zscore(KEYS.ready, created.endpoint_id)
        assert ready is not None and ready <= redis_now_ms(redis_sync), (ready, redis_now_ms(redis_sync))
    finally:
        await client.aclose()
