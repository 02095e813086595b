"""Allocation cost against pool size: Redis round trips and time per allocation, 10^4 vs 10^6 numbers.

Starts its own redis-server, imports a pool of 1 block (10^4 numbers) and one of 100 blocks (10^6 numbers)
for two tenants, then runs the same allocation workload on each through `allocation.pools.NumberPools`
(the code the gRPC servicer calls; gRPC itself is size-independent and left out to keep the signal clean).
The two pools are measured in alternating rounds and medians are reported, so background load on the
machine hits both sides alike.

Round trips are counted on the client: every Redis command the service code awaits goes through a
counting wrapper (one command = one request/response on the connection). As a server-side cross-check,
`INFO commandstats` gives the EVALSHA calls and `INFO stats` total_commands_processed the commands Redis
executed, including those run inside the scripts (the INFO calls themselves are subtracted).

Run: python -m benchmarks allocation   (or python -m benchmarks.bench_allocation)
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from redis.asyncio import Redis

from numprotect.core.errors import ResourceExhausted
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.redis_client import RedisClient
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.allocation.pools import NumberPools
from numprotect.services.allocation.scripts import Scripts
from numprotect.services.allocation.settings import AllocationSettings
from support.redis_server import RedisServer

ROUNDS = 5
SEQUENTIAL = 600  # allocations per round timed one after the other (latency)
CONCURRENT = 1_600  # allocations per round by TASKS concurrent tasks (throughput)
TASKS = 32
RIDERS = [f"138{i:08d}" for i in range(300)]
CUSTOMERS = [f"139{i:08d}" for i in range(3_000)]


class CountingRedis:
    """Forwards to a redis.asyncio client and counts the commands (round trips) awaited through it."""

    def __init__(self, inner: Redis) -> None:
        self.inner = inner
        self.commands = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.commands += 1
            return await attr(*args, **kwargs)

        return counted


@dataclass
class Pool:
    tenant: str
    blocks: int
    redis: Redis
    counting: CountingRedis
    pools: NumberPools
    rng: random.Random
    import_seconds: float = 0.0
    round_trips: list[float] = field(default_factory=list)
    evalsha: list[float] = field(default_factory=list)
    server_commands: list[float] = field(default_factory=list)
    script_usec: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)


async def _allocate_one(pool: Pool, rng: random.Random, i: int) -> None:
    mode = "AXN" if i % 5 == 4 else "AXB"
    parties = [rng.choice(RIDERS)] if mode == "AXN" else [rng.choice(RIDERS), rng.choice(CUSTOMERS)]
    try:
        await pool.pools.allocate(pool.tenant, mode, parties, "010", True, 600.0)
    except ResourceExhausted:
        raise SystemExit(f"pool of {pool.tenant} exhausted: the workload is too large for it") from None


async def _server_counters(client: Redis) -> tuple[int, int, int]:
    """total_commands_processed, EVALSHA calls, microseconds Redis spent in EVALSHA."""
    stats = await client.info("stats")
    evalsha = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats["total_commands_processed"]), int(evalsha.get("calls", 0)), int(evalsha.get("usec", 0))


async def prepare(redis_url: str, tenant: str, prefix: str, blocks: int) -> Pool:
    raw = Redis.from_url(redis_url, max_connections=64)
    counting = CountingRedis(raw)
    limit = ConcurrencyLimit.for_redis(RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": redis_url})))
    pools = NumberPools(
        cast(RedisClient, counting), AllocationSettings.from_env(Env({})), Scripts.load(), redis_limit=limit
    )
    pool = Pool(tenant, blocks, raw, counting, pools, random.Random(7))
    started = time.perf_counter()
    for b in range(blocks):
        await pools.import_block(f"700{prefix}{b:06d}", tenant, "010", "bench-carrier", "bench")
    pool.import_seconds = time.perf_counter() - started
    total = (await pools.stats(tenant, "010")).total
    assert total == blocks * 10_000, f"{tenant}: {total} numbers imported, expected {blocks * 10_000}"
    for i in range(200):  # warm-up: scripts loaded, connections open
        await _allocate_one(pool, pool.rng, i)
    return pool


async def one_round(pool: Pool, round_no: int) -> None:
    commands_before, evalsha_before, usec_before = await _server_counters(pool.redis)
    pool.counting.commands = 0
    for i in range(SEQUENTIAL):
        t0 = time.perf_counter()
        await _allocate_one(pool, pool.rng, i)
        pool.latencies_ms.append((time.perf_counter() - t0) * 1000)
    pool.round_trips.append(pool.counting.commands / SEQUENTIAL)
    commands_after, evalsha_after, usec_after = await _server_counters(pool.redis)
    # The two INFO commands of the first _server_counters call are counted by the server too.
    pool.server_commands.append((commands_after - commands_before - 2) / SEQUENTIAL)
    pool.evalsha.append((evalsha_after - evalsha_before) / SEQUENTIAL)
    pool.script_usec.append((usec_after - usec_before) / SEQUENTIAL)

    async def worker(seed: int) -> None:
        local = random.Random(seed)
        for i in range(CONCURRENT // TASKS):
            await _allocate_one(pool, local, i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(round_no * 1000 + s) for s in range(TASKS)))
    pool.throughput.append(CONCURRENT / (time.perf_counter() - t0))


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def main() -> None:
    server = RedisServer()
    try:
        small = await prepare(server.url, "small", "01", 1)
        big = await prepare(server.url, "big", "02", 100)
        for round_no in range(ROUNDS):
            for pool in (small, big) if round_no % 2 == 0 else (big, small):
                await one_round(pool, round_no)
        memory = (await small.redis.info("memory"))["used_memory_human"]
        for pool in (small, big):
            await pool.redis.aclose()
    finally:
        server.stop()
    allocations = ROUNDS * (SEQUENTIAL + CONCURRENT)
    print(
        f"allocation cost vs pool size: redis-server 7, NumberPools directly, {allocations} allocations per pool "
        f"in {ROUNDS} alternating rounds (4 AXB : 1 AXN, {len(RIDERS)} riders x {len(CUSTOMERS)} customers)"
    )
    print(f"{'':36}{'10^4 numbers':>14}{'10^6 numbers':>14}{'ratio':>8}")

    def both(stat: Callable[[Pool], float]) -> tuple[float, float]:
        return stat(small), stat(big)

    rows: list[tuple[str, tuple[float, float], bool]] = [
        ("import (s; 1 vs 100 blocks)", (small.import_seconds, big.import_seconds), False),
        ("round trips / allocation (client)", both(lambda p: statistics.median(p.round_trips)), True),
        ("EVALSHA / allocation (server)", both(lambda p: statistics.median(p.evalsha)), True),
        ("Redis commands / allocation", both(lambda p: statistics.median(p.server_commands)), True),
        ("Redis time in scripts (us / allocation)", both(lambda p: statistics.median(p.script_usec)), True),
        ("latency p50 (ms, sequential)", both(lambda p: _percentile(p.latencies_ms, 0.5)), True),
        ("latency p90 (ms, sequential)", both(lambda p: _percentile(p.latencies_ms, 0.9)), True),
        (f"throughput (/s, {TASKS} tasks, median)", both(lambda p: statistics.median(p.throughput)), True),
    ]
    for label, (a, b), ratio in rows:
        shown = f"{b / a:8.2f}" if ratio and a else ""
        print(f"{label:36}{a:14.3f}{b:14.3f}{shown}")
    print(f"redis used_memory with both pools: {memory}")
    print(
        "round trips: Redis commands the service code awaited, counted on the client. 'Redis commands' = "
        "INFO total_commands_processed delta per allocation, including the commands run inside the script."
    )


if __name__ == "__main__":
    asyncio.run(main())
