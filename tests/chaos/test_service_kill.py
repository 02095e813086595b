"""Fault 4: kill -9 of each service process in turn under load, then a restart on the same port.

Required: callers get UNAVAILABLE (never INTERNAL, nothing hangs past its deadline); creates retried with the
same out_order_id stay idempotent (one binding per order); nothing acknowledged is lost and no half-written state
remains (routes agree with the records; the invariant checker finds nothing).
"""

from __future__ import annotations

import asyncio

from support.chaos_run import LOAD_RPCS, Profile, report, running
from support.chaos_stack import SERVICES, ChaosStack
from support.chaos_verify import failures, figures, verify


async def test_kill9_of_each_service_mid_load_loses_nothing_and_leaves_no_half_state(
    profile: Profile, stack: ChaosStack
) -> None:
    async with running(stack) as run:
        recorder = run.driver.recorder
        await asyncio.sleep(profile.warmup)
        problems: list[str] = []
        windows: dict[str, tuple[float, float]] = {}
        recovery: dict[str, float] = {}
        for service in SERVICES:
            killed = recorder.mark(f"kill {service}")
            await asyncio.to_thread(stack.kill_service, service)
            await asyncio.sleep(profile.outage / 2)
            await asyncio.to_thread(stack.start_service, service)
            healed = recorder.mark("healed")
            if not await run.driver.wait_for_answers(LOAD_RPCS, ok=2, within=30):
                problems.append(f"the load did not succeed again within 30 s of {service}'s restart")
            recovery[service] = round(healed - killed, 2)
            windows[service] = (killed, healed)
            await asyncio.sleep(profile.warmup / 2)
        await asyncio.sleep(profile.after)
        await run.driver.stop()
        verdict = await verify(run.driver, stack)
        row = figures("kill -9 of each service in turn, restart", run.driver, verdict)
        # The row's recovery is measured from the last restart; each service's own outage is printed too.
        report(row, f"  down (kill to SERVING again) per service: {recovery}")

        problems += failures(row, verdict, stack)
        for service, (killed, healed) in windows.items():
            codes = {a.code for a in recorder.between(killed, healed)} - {"OK", "UNAVAILABLE"}
            if codes:
                problems.append(f"while {service} was down: answers {sorted(codes)}")
        assert not problems, "\n".join([row.text(), *problems])
