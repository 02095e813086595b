"""Fault 1: kill -9 of a standalone Redis with `appendfsync always`, then a restart from its AOF, under load.

Required: no acknowledged binding, update, delete or CDR lost; every call during the outage (and the AOF load
after the restart, `LOADING`) answers UNAVAILABLE within its deadline, never INTERNAL; the services recover
without a restart (the same processes). The long profile writes filler keys first, so the AOF load lasts.
"""

from __future__ import annotations

import asyncio

from support.chaos_run import Profile, conclude, only, recovered, running
from support.chaos_stack import ChaosStack


def write_filler(stack: ChaosStack, keys: int) -> None:
    """`keys` keys of 100 bytes outside np:* (nothing reads them; the invariant checker scans np:* only)."""
    client = stack.redis_client()
    try:
        for first in range(0, keys, 10_000):
            pipe = client.pipeline(transaction=False)
            for i in range(first, min(keys, first + 10_000)):
                pipe.set(f"chaos:filler:{i}", b"x" * 100)
            pipe.execute()
    finally:
        client.close()


async def test_redis_kill9_and_restart_from_aof_loses_nothing_acknowledged(profile: Profile, stack: ChaosStack) -> None:
    if profile.filler_keys:
        await asyncio.to_thread(write_filler, stack, profile.filler_keys)
    async with running(stack) as run:
        pids = stack.pids()
        recorder = run.driver.recorder
        await asyncio.sleep(profile.warmup)
        fault = recorder.mark("fault")
        await asyncio.to_thread(stack.redis.kill)
        await asyncio.sleep(profile.outage)
        restarted = recorder.mark("restart")
        await asyncio.to_thread(stack.redis.restart)  # returns once Redis answers PING: its AOF is loaded
        healed = recorder.mark("healed")
        problems: list[str] = []
        await recovered(run, problems, "after the restart")
        await asyncio.sleep(profile.after)
        row, failed = await conclude(
            run,
            "Redis kill -9 (appendfsync always), restart from AOF",
            f"  AOF load after the restart: {healed - restarted:.2f} s",
        )
        problems += failed
        # An answer in flight at the kill may still be OK; everything else in the outage is UNAVAILABLE. (After the
        # restart, a retried update or delete may find its own first try's lock: ABORTED, counted in the recovery.)
        problems += only(recorder, fault, restarted, {"OK", "UNAVAILABLE"}, "while Redis was down")
        if stack.pids() != pids:
            problems.append("a service process was restarted")
        assert not problems, "\n".join([row.text(), *problems])
