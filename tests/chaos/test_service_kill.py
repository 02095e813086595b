"""Fault 4: kill -9 of the service processes under load, then a restart on the same ports.

The long profile kills each service in turn; the short one (make test) kills all five at once and starts them
together. Required: callers get UNAVAILABLE (never INTERNAL, nothing past its deadline); creates retried with the
same out_order_id stay idempotent (one binding per order); nothing acknowledged is lost and no half-written state
remains (routes agree with the records; the invariant checker finds nothing).
"""

from __future__ import annotations

import asyncio

from support.chaos_run import Profile, conclude, only, recovered, running
from support.chaos_stack import SERVICES, ChaosStack

# While a process is down, besides UNAVAILABLE: a binding's lock or an order's claim left by a killed binding
# process answers ABORTED until its lease lapses (docs/binding.md).
WHILE_DOWN = {"OK", "UNAVAILABLE", "ABORTED"}


async def kill_and_restart(stack: ChaosStack, services: tuple[str, ...], outage: float) -> None:
    await asyncio.gather(*(asyncio.to_thread(stack.kill_service, service) for service in services))
    await asyncio.sleep(outage)
    # allocation first: binding's channel to it is made at start-up
    if "allocation" in services:
        await asyncio.to_thread(stack.start_service, "allocation")
    await asyncio.gather(
        *(asyncio.to_thread(stack.start_service, service) for service in services if service != "allocation")
    )


async def test_kill9_of_the_services_mid_load_loses_nothing_and_leaves_no_half_state(
    profile: Profile, stack: ChaosStack
) -> None:
    rounds = [(service,) for service in SERVICES] if profile.name == "long" else [SERVICES]
    async with running(stack) as run:
        recorder = run.driver.recorder
        await asyncio.sleep(profile.warmup)
        problems: list[str] = []
        down: dict[str, float] = {}
        for services in rounds:
            name = "+".join(services)
            killed = recorder.mark(f"kill {name}")
            await kill_and_restart(stack, services, profile.outage)
            healed = recorder.mark("healed")
            down[name] = round(healed - killed, 2)
            await recovered(run, problems, f"after {name} restarted")
            problems += only(recorder, killed, healed, WHILE_DOWN, f"while {name} was down")
            await asyncio.sleep(profile.warmup)
        await asyncio.sleep(profile.after)
        row, failed = await conclude(
            run, "kill -9 of the services, restart", f"  down (kill to SERVING again) per round: {down}"
        )
        assert not (problems + failed), "\n".join([row.text(), *problems, *failed])
