"""Fault 1: kill -9 of a standalone Redis with `appendfsync always`, then a restart from its AOF, under load.

Required: no acknowledged binding, update, delete or CDR lost; every call during the outage answers UNAVAILABLE
within its deadline (never INTERNAL); the services recover without a restart (same processes).
"""

from __future__ import annotations

import asyncio

from support.chaos_run import LOAD_RPCS, Profile, report, running
from support.chaos_stack import ChaosStack
from support.chaos_verify import failures, figures, verify


async def test_redis_kill9_and_restart_from_aof_loses_nothing_acknowledged(profile: Profile, stack: ChaosStack) -> None:
    async with running(stack) as run:
        pids = stack.pids()
        recorder = run.driver.recorder
        await asyncio.sleep(profile.warmup)
        fault = recorder.mark("fault")
        await asyncio.to_thread(stack.redis.kill)
        await asyncio.sleep(profile.outage)
        await asyncio.to_thread(stack.redis.restart)
        healed = recorder.mark("healed")
        recovered = await run.driver.wait_for_answers(LOAD_RPCS, ok=3, within=30)
        await asyncio.sleep(profile.after)
        await run.driver.stop()
        verdict = await verify(run.driver, stack)
        row = figures("Redis kill -9 (appendfsync always), restart from AOF", run.driver, verdict)
        marks = {name: round(at - fault, 2) for name, at in recorder.marks.items()}
        report(row, f"  times after the kill: {marks}")

        problems = failures(row, verdict, stack)
        # During the outage nothing but UNAVAILABLE (an answer in flight at the kill may still be OK).
        during = [a for a in recorder.between(fault, healed) if a.code not in ("OK", "UNAVAILABLE")]
        if during:
            problems.append(f"{len(during)} answers other than UNAVAILABLE during the outage, e.g. {during[:3]}")
        if not recovered:
            problems.append("the load did not succeed again within 30 s of the restart")
        if stack.pids() != pids:
            problems.append("a service process was restarted")
        assert not problems, "\n".join([row.text(), *problems])
