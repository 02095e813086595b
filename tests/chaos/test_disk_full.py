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

from support.chaos_run import LOAD_RPCS, Profile, report, running
from support.chaos_stack import ChaosStack
from support.chaos_verify import failures, figures, verify

WRITES = {"CreateBinding", "UpdateBinding", "DeleteBinding", "IngestCdrs"}
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
            healed = recorder.mark("freed")
            # Redis retries the AOF write every second and accepts writes again once it succeeds.
            deadline = time.monotonic() + 10
            while not await asyncio.to_thread(aof_write_ok, stack) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            recorder.mark("healed")
            recovered = await run.driver.wait_for_answers(LOAD_RPCS, ok=2, within=30)
            await asyncio.sleep(profile.after)
            await run.driver.stop()
            verdict = await verify(run.driver, stack)
            row = figures("disk full under the AOF (appendfsync everysec): writes refused", run.driver, verdict)
            report(row)

            problems = failures(row, verdict, stack)
            if not refused:
                problems.append("the filled disk did not make Redis refuse writes (the fault was not injected)")
            window = recorder.between(fault + 1.0, healed)  # Redis notices within its next write
            bad_writes = {a.code for a in window if a.rpc in WRITES} - {"OK", "UNAVAILABLE"}
            bad_reads = [a for a in window if a.rpc in READS and a.code != "OK"]
            reads_ok = sum(a.rpc in READS and a.code == "OK" for a in window)
            if bad_writes:
                problems.append(f"writes answered {sorted(bad_writes)} while the disk was full")
            if bad_reads or not reads_ok:
                problems.append(
                    f"reads while the disk was full: {reads_ok} OK, {len(bad_reads)} failed {bad_reads[:3]}"
                )
            if not recovered:
                problems.append("the load did not succeed again within 30 s of freeing the disk")
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
        await asyncio.to_thread(stack.redis.restart)
        healed = recorder.mark("healed")
        recovered = await run.driver.wait_for_answers(LOAD_RPCS, ok=2, within=30)
        await asyncio.sleep(profile.after)
        await run.driver.stop()
        verdict = await verify(run.driver, stack)
        row = figures("disk full under the AOF (appendfsync always): Redis exits, restart", run.driver, verdict)
        report(row)

        problems = failures(row, verdict, stack)
        during = {a.code for a in recorder.between(fault, healed)} - {"OK", "UNAVAILABLE"}
        if during:
            problems.append(f"answers {sorted(during)} while Redis was down")
        if not recovered:
            problems.append("the load did not succeed again within 30 s of the restart")
        assert not problems, "\n".join([row.text(), *problems])
