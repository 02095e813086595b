"""What `appendfsync` costs the writes (docs/reliability.md, "Settings an operator must choose"): the same write
load (CreateBinding, UpdateBinding, DeleteBinding, IngestCdrs) against Redis with `appendfsync always` and with
`everysec`, no fault. Long profile only (make chaos); it prints calls per second and latency percentiles."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from support.chaos_run import PROFILES, running
from support.chaos_stack import ChaosStack

WRITE_RPCS = ("CreateBinding", "UpdateBinding", "DeleteBinding", "IngestCdrs")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@pytest.mark.chaos
async def test_the_cost_of_appendfsync_always_against_everysec() -> None:
    profile = PROFILES["long"]
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    for policy in ("always", "everysec"):
        stack = await asyncio.to_thread(ChaosStack, appendfsync=policy)
        try:
            only_writes = {"translators": 0, "streams": 0, "readers": 0, "watchers": 0, "writers": 4}
            async with running(stack, ready=WRITE_RPCS, **only_writes) as run:
                recorder = run.driver.recorder
                start = recorder.mark("measure")
                await asyncio.sleep(profile.after)
                end = recorder.mark("measured")
                await run.driver.stop()
            window = [a for a in recorder.answers if start <= a.start and a.end <= end]
            results[policy] = {}
            for rpc in WRITE_RPCS:
                latencies = [a.latency for a in window if a.rpc == rpc and a.code == "OK"]
                assert latencies, f"no {rpc} answered OK with appendfsync {policy}"
                results[policy][rpc] = (
                    len(latencies) / (end - start),
                    statistics.median(latencies) * 1000,
                    percentile(latencies, 0.99) * 1000,
                )
        finally:
            await asyncio.to_thread(stack.stop)
    for policy, rows in results.items():
        for rpc, (rate, p50, p99) in rows.items():
            print(f"appendfsync {policy}: {rpc} {rate:.1f}/s p50 {p50:.1f} ms p99 {p99:.1f} ms")
