"""The router's and the expirer's scripts run twice with the same arguments, as a cluster client does when it loses
a reply and re-sends (docs/redis-schema.md, "Scripts run twice"): the second run leaves every events key (and the
binding record) as the first left it."""

from __future__ import annotations

import asyncio
from typing import Any

from events.test_router import TENANT, X, binding_record

from numprotect.core import event_keys
from numprotect.core.binding_records import binding_key
from numprotect.core.clock import SystemClock
from numprotect.core.metrics import Metrics
from numprotect.core.redis_batch import Command, raise_first, send_together
from numprotect.core.redis_client import RedisClient
from numprotect.services.events.expirer import Expirer
from numprotect.services.events.log import enqueue_command
from numprotect.services.events.render import OutboxEntry
from support.event_routing import (
    add_endpoint,
    add_entry,
    committed_binding,
    events_settings,
    number_entry,
    router_parts,
)
from support.redis_state import plain, state
from support.redis_state import run_twice as twice

# Every events key but the endpoints hash (protobuf bytes, which no script writes), and the binding records.
EVENT_KEYS = ("np:ev:[^{]*", f"np:ev:{{ev:t:{TENANT}}}:[^e]*", "np:b:*")


async def send(redis: RedisClient, command: Command) -> Any:
    return plain(raise_first(await send_together(redis, [command]))[0])


async def test_route_take_done_and_enqueue_repeated_change_nothing(redis_env: dict[str, str], redis_sync: Any) -> None:
    async with router_parts(redis_env) as (redis, store, router, _):
        endpoint = await add_endpoint(store, TENANT)
        entry = number_entry(TENANT, X, 1_790_000_000_000)
        entry_id = add_entry(redis_sync, 21, entry)
        take = Command.run(
            router._take_script,
            [event_keys.outbox_key(21), event_keys.route_lease_key(21)],
            [router._token, 5000, 10],
        )
        first, second = await twice(redis_sync, EVENT_KEYS, lambda: send(redis, take))
        assert first == second and [e[0] for e in first] == [entry_id]  # the lease is this router's both times

        [rendered] = await router.renderer.render([OutboxEntry.decode(entry_id, entry)])
        assert not isinstance(rendered, Exception)
        route = router.route_command(TENANT, [rendered], [endpoint])
        assert await twice(redis_sync, EVENT_KEYS, lambda: send(redis, route)) == ([1], [0])
        tenant_keys = state(redis_sync, EVENT_KEYS[1])  # what the comparison covers: the log, seen, queue, ready
        assert {kind for kind, _ in tenant_keys.values()} == {"stream", "string", "zset", "hash"}

        [(log_id, _)] = [(plain(i), f) for i, f in redis_sync.xrange(event_keys.TenantKeys(TENANT).log)]
        enqueue = enqueue_command(TENANT, endpoint.endpoint_id, [log_id])
        assert await twice(redis_sync, EVENT_KEYS, lambda: send(redis, enqueue)) == (1, 1)

        done = Command.run(
            router._done_script,
            [event_keys.outbox_key(21), event_keys.route_lease_key(21)],
            [router._token, entry_id],
        )
        assert await twice(redis_sync, EVENT_KEYS, lambda: send(redis, done)) == (1, 0)


async def test_expire_due_and_rearm_repeated_change_nothing(redis_env: dict[str, str], redis_sync: Any) -> None:
    async with router_parts(redis_env) as (redis, _, _, _):
        record = binding_record("b-twice-1", SystemClock().now_ms(), ttl_ms=100)
        await committed_binding(redis, record)
        slot = event_keys.key_slot(binding_key(record.binding_id))
        expirer = Expirer(redis, events_settings(), Metrics("events"), SystemClock())
        await asyncio.sleep(0.15)
        expire = expirer.expire_command(slot)
        assert await twice(redis_sync, EVENT_KEYS, lambda: send(redis, expire)) == ([1, -1], [0, -1])

        ring = event_keys.expiry_ring_key(slot)
        seen = int(redis_sync.zscore(ring, str(slot)))
        later = seen + 60_000
        rearm = Command.run(Expirer._rearm, [ring], [slot, seen, later])
        assert await twice(redis_sync, EVENT_KEYS, lambda: send(redis, rearm)) == (1, 1)
        assert int(redis_sync.zscore(ring, str(slot))) == later
        remove = Command.run(Expirer._rearm, [ring], [slot, later, -1])
        assert await twice(redis_sync, EVENT_KEYS, lambda: send(redis, remove)) == (1, 1)
        assert redis_sync.zscore(ring, str(slot)) is None
