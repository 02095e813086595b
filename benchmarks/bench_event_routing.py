"""What routing events costs the events service (services/events/router.py, expirer.py; docs/events.md).

On one redis-server, with the default settings (NUMPROTECT_EVENTS_* unset) and one tenant with two endpoints:
  - routing: N number.locked outbox entries (with their ring hints, as producers write them) routed by one router
    (poll after poll until all are in the tenant's log and queues), the entries spread over all 16,384 slots (what
    binding records, in every slot, give) and packed into 64 slots; per event: the router process's CPU
    (process_time) and redis-server's (/proc), and events per second of wall time (host shared: indicative);
  - binding.expired lag: bindings committed with expiries spread over a few seconds, the router and the expirer
    running at the default polls (expiry 1 s, outbox 0.2 s); the lag of each binding.expired is its log entry id's ms
    (Redis's clock when it was routed) minus the expiry instant (the promise: within 5 s);
  - idle: what a router and an expirer with nothing to do cost per second: with the default settings (the polls;
    the 30 s sweep falls outside the 10 s measured) and with a sweep of every slot's outbox and expiries every 1 s
    (what a sweep costs, ten times over).
Run: python -m benchmarks.bench_event_routing (or make bench BENCH_ARGS=event_routing). Environment:
NUMPROTECT_BENCH_OPERATIONS (events per routing round, default 20000), NUMPROTECT_BENCH_ROUNDS (default 3).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import cpu_seconds, free_port, redis_server_args, wait_redis
from numprotect.core import event_keys
from numprotect.core.binding_records import BindingRecord, BindingRecordStore
from numprotect.core.clock import SystemClock
from numprotect.core.event_keys import TenantKeys
from numprotect.core.metrics import Metrics
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.events.endpoints import EndpointSpec, EndpointStore
from numprotect.services.events.expirer import Expirer
from numprotect.services.events.router import Router
from numprotect.services.events.settings import EventsSettings

TENANT = "t1"
# The expiring bindings' tenant: its log holds only their events (binding.created, binding.expired).
EXPIRY_TENANT = "t2"
LAYOUTS = {"spread over all slots": event_keys.CLUSTER_SLOTS, "packed into 64 slots": 64}
EXPIRING = 300
IDLE_SECONDS = 10.0


def write_entries(sync: Any, count: int, slots: int, first: int) -> None:
    pipe = sync.pipeline(transaction=False)
    for i in range(first, first + count):
        slot = (i * 7919) % slots if slots == event_keys.CLUSTER_SLOTS else i % slots
        entry = {"ty": "number.locked", "tn": TENANT, "at": str(1_790_000_000_000 + i), "src": "70010000000", "n": ""}
        pipe.xadd(event_keys.outbox_key(slot), {**entry, "d": "bench|op"})
        pipe.sadd(event_keys.ring_key(slot), slot)
    pipe.execute()


async def route_round(
    router: Router, sync: Any, redis_pid: int, count: int, slots: int, first: int
) -> tuple[float, ...]:
    write_entries(sync, count, slots, first)
    started, cpu, redis_cpu = time.perf_counter(), time.process_time(), cpu_seconds(redis_pid)
    routed = 0
    while routed < count:
        routed += await router.poll()
    wall = time.perf_counter() - started
    return (
        (time.process_time() - cpu) / count * 1e6,
        (cpu_seconds(redis_pid) - redis_cpu) / count * 1e6,
        count / wall,
    )


def binding(binding_id: str, now_ms: int, ttl_ms: int) -> BindingRecord:
    parties = ("13800000001", "13900000002", "70010000000", "", "010")
    return BindingRecord(
        binding_id, EXPIRY_TENANT, "o-" + binding_id, 1, *parties, 0, False, False, True, now_ms, now_ms + ttl_ms,
        now_ms, 0,
    )  # fmt: skip


async def expiry_lags(redis: RedisClient, router: Router, settings: EventsSettings, sync: Any) -> list[int]:
    records = BindingRecordStore(redis)
    now = SystemClock().now_ms()
    made = [binding(f"bench-exp-{i}", now, 2000 + i * 10) for i in range(EXPIRING)]
    for record in made:
        await records.create(record, reservation_id="r", city_fallback=False)
        await records.activate(record.binding_id, record.end_ms(), expire_ms=record.expire_ms)
    expirer = Expirer(redis, settings, Metrics("bench", enabled=False), SystemClock())
    expirer.start()
    router.start()
    try:
        deadline = time.monotonic() + 30
        log = TenantKeys(EXPIRY_TENANT).log
        while time.monotonic() < deadline:
            if sync.xlen(log) >= 2 * EXPIRING:  # read once complete: reading it must not slow what is measured
                lags = [
                    int(entry_id.decode().split("-")[0]) - int(fields[b"at"])
                    for entry_id, fields in sync.xrange(log)
                    if fields[b"ty"] == b"binding.expired"
                ]
                return sorted(lags)
            await asyncio.sleep(0.5)
        raise SystemExit(f"not every binding.expired within 30 s ({sync.xlen(log)} events of {2 * EXPIRING})")
    finally:
        await router.close()
        await expirer.close()


async def idle_cost(redis: RedisClient, store: EndpointStore, redis_pid: int, **env: str) -> tuple[float, float]:
    """(process, redis-server) CPU seconds per second of a router and an expirer with nothing to do."""
    settings = EventsSettings.from_env(Env(env))
    router = Router(redis, settings, store, Metrics("bench", enabled=False), SystemClock())
    expirer = Expirer(redis, settings, Metrics("bench", enabled=False), SystemClock())
    router.start()
    expirer.start()
    await asyncio.sleep(2)  # the first rounds (their sweeps, script loads) out of the measure
    cpu, redis_cpu = time.process_time(), cpu_seconds(redis_pid)
    await asyncio.sleep(IDLE_SECONDS)
    used = (time.process_time() - cpu) / IDLE_SECONDS, (cpu_seconds(redis_pid) - redis_cpu) / IDLE_SECONDS
    await router.close()
    await expirer.close()
    return used


async def bench(url: str, redis_pid: int) -> None:
    count = int(os.environ.get("NUMPROTECT_BENCH_OPERATIONS", "20000"))
    rounds = int(os.environ.get("NUMPROTECT_BENCH_ROUNDS", "3"))
    redis = create_redis(RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": url})))
    sync = wait_redis(int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0]))
    settings = EventsSettings.from_env(Env({}))
    try:
        store = EndpointStore(redis, settings, SystemClock())
        for types in ((), ("number.locked", "binding.expired")):
            await store.create(EndpointSpec(TENANT, "https://receiver.example/hook", types, "", 1, 0))
        router = Router(redis, settings, store, Metrics("bench", enabled=False), SystemClock())
        event_keys.slot_tag(0)  # the slots' tags, computed once per process, out of the measure
        print(f"routing {count} number.locked events per round, {rounds} rounds, one tenant with two endpoints")
        print(f"{'layout':<24}{'router us CPU/event':>22}{'redis us CPU/event':>22}{'events/s (wall)':>18}")
        first = 0
        for layout, slots in LAYOUTS.items():
            samples = []
            for _ in range(rounds):
                samples.append(await route_round(router, sync, redis_pid, count, slots, first))
                first += count
            router_cpu, redis_cpu, rate = (statistics.median(s[i] for s in samples) for i in range(3))
            print(f"{layout:<24}{router_cpu:>22.0f}{redis_cpu:>22.0f}{rate:>18.0f}")
        lags = await expiry_lags(redis, router, settings, sync)
        print(
            f"binding.expired after the expiry instant ({EXPIRING} bindings, default polls): "
            f"median {statistics.median(lags):.0f} ms, p99 {lags[int(len(lags) * 0.99) - 1]} ms, max {lags[-1]} ms"
        )
        for label, env in (("default settings", {}), ("sweeps every 1 s", {"NUMPROTECT_EVENTS_SWEEP_INTERVAL": "1s"})):
            process_idle, redis_idle = await idle_cost(redis, store, redis_pid, **env)
            print(
                f"idle router + expirer, {label}: {process_idle * 100:.1f}% of a core in the process, "
                f"{redis_idle * 100:.1f}% in redis-server"
            )
    finally:
        sync.close()
        await redis.aclose()


def main() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        server = subprocess.Popen(
            redis_server_args("redis-server", port, Path(folder), "--appendonly", "no"), stdout=subprocess.DEVNULL
        )
        try:
            wait_redis(port, timeout=20).close()
            asyncio.run(bench(f"redis://127.0.0.1:{port}/0", server.pid))
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
