"""Fault 3: a slow Redis (CLIENT PAUSE, DEBUG SLEEP) and latency on the wire (a delaying TCP proxy between the
services and Redis, and between binding and allocation), each episode repeated under load.

Required: every answer within its deadline (UNAVAILABLE when the work cannot be done in time, never INTERNAL),
nothing hangs, and no thread or connection leak: each process's threads and sockets after the last episode are
no more than after the first (pools fill up once, a leak grows with every episode).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest

from support.chaos_run import Profile, conclude, recovered, running
from support.chaos_stack import ChaosStack, ProcessCounts

# Growth allowed between the first and the last episode's end: a worker thread started late, a connection being
# replaced at the moment of counting.
THREAD_SLACK = 2
SOCKET_SLACK = 4


@pytest.fixture
def proxied() -> Iterator[ChaosStack]:
    started = ChaosStack(proxy_redis=True, proxy_allocation=True)
    try:
        yield started
    finally:
        started.stop()


def pause_clients(stack: ChaosStack, milliseconds: int) -> None:
    client = stack.redis_client()
    try:
        client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")
    finally:
        client.close()


def debug_sleep(stack: ChaosStack, seconds: float) -> None:
    client = stack.redis_client()
    try:
        client.execute_command("DEBUG", "SLEEP", seconds)
    finally:
        client.close()


async def test_slow_redis_and_slow_links_answer_within_deadlines_without_leaks(
    profile: Profile, proxied: ChaosStack
) -> None:
    stack = proxied
    assert stack.redis_proxy is not None and stack.allocation_proxy is not None
    redis_proxy, allocation_proxy = stack.redis_proxy, stack.allocation_proxy
    outage = profile.outage

    async def latency(proxy_delay: Callable[[float], None], seconds: float) -> None:
        proxy_delay(seconds)
        await asyncio.sleep(outage)
        proxy_delay(0.0)

    episodes: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("CLIENT PAUSE", lambda: asyncio.to_thread(pause_clients, stack, int(outage * 1000))),
        ("DEBUG SLEEP", lambda: asyncio.to_thread(debug_sleep, stack, outage)),
        ("+0.3 s each way to Redis", lambda: latency(lambda d: setattr(redis_proxy, "delay", d), 0.3)),
        ("+0.5 s each way to allocation", lambda: latency(lambda d: setattr(allocation_proxy, "delay", d), 0.5)),
    ]
    async with running(stack) as run:
        recorder = run.driver.recorder
        pids = stack.pids()
        await asyncio.sleep(profile.warmup)
        counts: list[dict[str, ProcessCounts]] = []
        redis_connections: list[int] = []
        problems: list[str] = []
        for episode in range(profile.episodes):
            for name, inject in episodes:
                recorder.mark(f"{name} #{episode + 1}")
                await inject()
                recorder.mark("healed")
                await recovered(run, problems, f"after {name}")
            await asyncio.sleep(profile.after / profile.episodes)
            counts.append(stack.counts())
            redis_connections.append(len(redis_proxy.counters.open_connections))
        leaks = {
            service: (counts[0][service], counts[-1][service])
            for service in pids
            if counts[-1][service].threads > counts[0][service].threads + THREAD_SLACK
            or counts[-1][service].sockets > counts[0][service].sockets + SOCKET_SLACK
        }
        row, failed = await conclude(
            run,
            "slow Redis (CLIENT PAUSE, DEBUG SLEEP), +latency to Redis and to allocation",
            "  threads/sockets after each round: "
            + "; ".join(f"{s}: " + " ".join(f"{c[s].threads}/{c[s].sockets}" for c in counts) for s in pids)
            + f"; connections to Redis: {redis_connections}",
        )
        problems += failed
        if leaks:
            problems.append(f"threads or sockets grew from the first round to the last: {leaks}")
        if stack.pids() != pids:
            problems.append("a service process died")
        if redis_connections[-1] > redis_connections[0] + SOCKET_SLACK:
            problems.append(f"connections open to Redis grew from round to round: {redis_connections}")
        assert not problems, "\n".join([row.text(), *problems])
