"""Fault 5: the disk under Redis' AOF fills up, under load.

- `appendfsync everysec`: Redis refuses writes (MISCONF) and keeps serving reads. Required: writes answer
  UNAVAILABLE, reads (Translate, GetBinding) go on, and once space is back Redis and the services resume by
  themselves.
- `appendfsync always`: Redis cannot take back a write it failed to log and exits (by design: "Can't recover
  from AOF write error when the AOF fsync policy is 'always'"); reads stop too. Required: the same as a crash
  (fault 1): UNAVAILABLE, nothing acknowledged lost after space is freed and Redis restarted.
"""

from __future__ import annotations

import asyncio
import time

from support.chaos_run import Profile, conclude, only, recovered, running
from support.chaos_stack import ChaosStack

READS = {"Translate", "GetBinding"}


def aof_write_ok(stack: ChaosStack) -> bool:
    client = stack.redis_client()
    try:
        return bool(client.info("persistence")["aof_last_write_status"] == "ok")
    finally:
        client.close()


async def test_disk_full_refuses_writes_cleanly_and_reads_go_on(profile: Profile, stack: ChaosStack) -> None:
    assert stack.disk is not None
    disk = stack.disk
    client = stack.redis_client()
    client.config_set("appendfsync", "everysec")
    client.close()
    try:
        async with running(stack) as run:
            recorder = run.driver.recorder
            await asyncio.sleep(profile.warmup)
            fault = recorder.mark("fault")
            await asyncio.to_thread(disk.fill)
            await asyncio.sleep(profile.outage)
            refused = not await asyncio.to_thread(aof_write_ok, stack)
            await asyncio.to_thread(disk.free)
            freed = recorder.mark("freed")
            # Redis retries the AOF write every second and accepts writes again once it succeeds.
            deadline = time.monotonic() + 10
            while not await asyncio.to_thread(aof_write_ok, stack) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            recorder.mark("healed")
            problems: list[str] = []
            await recovered(run, problems, "after freeing the disk")
            await asyncio.sleep(profile.after)
            row, failed = await conclude(run, "disk full under the AOF (appendfsync everysec): writes refused")
            problems += failed
            if not refused:
                problems.append("the filled disk did not make Redis refuse writes (the fault was not injected)")
            window = recorder.between(fault + 1.0, freed)  # Redis notices at its next write (within a second)
            problems += only(recorder, fault, freed, {"OK", "UNAVAILABLE"}, "while the disk was full")
            bad_reads = [a for a in window if a.rpc in READS and a.code != "OK"]
            reads_ok = sum(a.rpc in READS and a.code == "OK" for a in window)
            if bad_reads or not reads_ok:
                problems.append(f"reads with the disk full: {reads_ok} OK, {len(bad_reads)} failed {bad_reads[:3]}")
            assert not problems, "\n".join([row.text(), *problems])
    finally:
        client = stack.redis_client()
        client.config_set("appendfsync", "always")
        client.close()


async def test_disk_full_with_appendfsync_always_stops_redis_and_loses_nothing(
    profile: Profile, stack: ChaosStack
) -> None:
    assert stack.disk is not None
    disk = stack.disk
    async with running(stack) as run:
        recorder = run.driver.recorder
        await asyncio.sleep(profile.warmup)
        fault = recorder.mark("fault")
        await asyncio.to_thread(disk.fill)
        await asyncio.to_thread(stack.redis.process.wait, 30)  # exits at its first failed AOF write
        await asyncio.sleep(profile.outage)
        await asyncio.to_thread(disk.free)
        restarted = recorder.mark("restart")
        await asyncio.to_thread(stack.redis.restart)
        recorder.mark("healed")
        problems: list[str] = []
        await recovered(run, problems, "after the restart")
        await asyncio.sleep(profile.after)
        row, failed = await conclude(run, "disk full under the AOF (appendfsync always): Redis exits, restart")
        problems += failed
        problems += only(recorder, fault, restarted, {"OK", "UNAVAILABLE"}, "while Redis was down")
        assert not problems, "\n".join([row.text(), *problems])
