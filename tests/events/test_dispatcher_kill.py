"""`kill -9` of a real events process while its dispatcher has requests in flight loses no event: another process
takes the claims over once their lease runs out and delivers them, with the same event ids and valid signatures."""

from __future__ import annotations

import asyncio
import time

import pytest
from events.delivery_harness import FAST, TENANT, delivery_rig
from events.test_delivery import eventually
from standardwebhooks import Webhook

from support.processes import ServiceProcess
from support.webhook_receiver import Received, Reply, webhook_receiver

EVENTS = 5


@pytest.mark.slow
async def test_kill_9_mid_delivery_loses_no_event(redis_env: dict[str, str]) -> None:
    environ = {
        **redis_env,
        **FAST,
        "NUMPROTECT_EVENTS_REQUEST_TIMEOUT": "2s",  # lease 7 s
        "NUMPROTECT_EVENTS_SWEEP_INTERVAL": "10m",
    }
    killed = False

    def reply(request: Received) -> Reply:
        # Before the kill the receiver holds every request (they are in flight when the process dies).
        return Reply(200) if killed else Reply(200, delay_s=3)

    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        receiver.respond = reply
        endpoint = await rig.endpoint(receiver.url, max_concurrency=EVENTS)
        published = [await rig.publish([endpoint]) for _ in range(EVENTS)]
        first = await asyncio.to_thread(ServiceProcess, "events", environ)
        try:
            await receiver.wait_for(EVENTS, timeout_s=30)
            first.process.kill()  # SIGKILL: no shutdown, no settle
            killed_at = time.monotonic()
            killed = True
            await asyncio.to_thread(first.process.wait, 10)
        finally:
            await asyncio.to_thread(first.stop)
        assert first.process.returncode == -9
        second = await asyncio.to_thread(ServiceProcess, "events", environ)
        try:
            got = await receiver.wait_for(2 * EVENTS, timeout_s=rig.settings.lease_s + 30)
            after = got[EVENTS:]
            assert sorted(r.webhook_id for r in after) == sorted(p.event_id for p in published)
            assert min(r.at for r in after) - killed_at >= rig.settings.lease_s - 3.5  # (claimed <= 3.5 s before)
            for request in after:
                Webhook(endpoint.secret).verify(request.body, request.headers)
            assert {r.body for r in after} == {p.body for p in published}

            async def all_recorded() -> bool:
                deliveries, _ = await rig.deliveries.attempts(TENANT, endpoint.endpoint_id, "", 100, "")
                return len(deliveries) == EVENTS

            await eventually(all_recorded)
            deliveries, _ = await rig.deliveries.attempts(TENANT, endpoint.endpoint_id, "", 100, "")
            # The killed process's attempts were counted when claimed, never recorded: the takeover is attempt 2.
            assert {(d.attempt, d.succeeded) for d in deliveries} == {(2, True)}
            assert await rig.deliveries.dead_letters(TENANT, endpoint.endpoint_id, 10, "") == ([], "")
            await asyncio.sleep(0.5)
            assert len(receiver.received) == 2 * EVENTS
        finally:
            await asyncio.to_thread(second.stop)
