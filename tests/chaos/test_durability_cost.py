"""What the durability settings cost the writes (docs/reliability.md, "Settings an operator must choose"): the same
write load (CreateBinding, UpdateBinding, DeleteBinding, IngestCdrs; 4 writers and an ingester, 30 ms apart)
against Redis with `appendfsync always`, with `everysec`, and with each of those plus a replica the services wait
for (NUMPROTECT_REDIS_WAIT_REPLICAS=1). No fault. Long profile only (make chaos); it prints calls per second and
latency percentiles per configuration, and checks that every configuration served every write RPC."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from support.chaos_run import PROFILES, running
from support.chaos_stack import ChaosStack

WRITE_RPCS = ("CreateBinding", "UpdateBinding", "DeleteBinding", "IngestCdrs")
WAIT_ONE = {"NUMPROTECT_REDIS_WAIT_REPLICAS": "1", "NUMPROTECT_REDIS_WAIT_TIMEOUT": "0.3s"}
CONFIGURATIONS: dict[str, tuple[str, dict[str, str]]] = {
    "appendfsync always": ("always", {}),
    "appendfsync everysec": ("everysec", {}),
    "appendfsync always + WAIT 1 replica": ("always", WAIT_ONE),
    "appendfsync everysec + WAIT 1 replica": ("everysec", WAIT_ONE),
}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(appendfsync: str, env: dict[str, str], seconds: float) -> dict[str, tuple[float, float, float]]:
    """Per write RPC: calls answered OK per second, p50 and p99 latency (ms)."""
    stack = await asyncio.to_thread(ChaosStack, appendfsync=appendfsync, replica=bool(env), env=env)
    try:
        only_writes = {"translators": 0, "streams": 0, "readers": 0, "watchers": 0, "writers": 4}
        async with running(stack, ready=WRITE_RPCS, **only_writes) as run:
            recorder = run.driver.recorder
            start = recorder.mark("measure")
            await asyncio.sleep(seconds)
            end = recorder.mark("measured")
            await run.driver.stop()
    finally:
        await asyncio.to_thread(stack.stop)
    window = [a for a in recorder.answers if start <= a.start and a.end <= end]
    results = {}
    for rpc in WRITE_RPCS:
        latencies = [a.latency for a in window if a.rpc == rpc and a.code == "OK"]
        assert latencies, f"no {rpc} answered OK with appendfsync {appendfsync} {env}"
        results[rpc] = (
            len(latencies) / (end - start),
            statistics.median(latencies) * 1000,
            percentile(latencies, 0.99) * 1000,
        )
    return results


@pytest.mark.chaos
async def test_the_cost_of_appendfsync_always_and_of_waiting_for_a_replica() -> None:
    seconds = PROFILES["long"].after
    for name, (appendfsync, env) in CONFIGURATIONS.items():
        results = await measure(appendfsync, env, seconds)
        for rpc, (rate, p50, p99) in results.items():
            print(f"{name}: {rpc} {rate:.1f}/s p50 {p50:.1f} ms p99 {p99:.1f} ms")
