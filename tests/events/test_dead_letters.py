"""Dead letters: an event whose every attempt failed, listed oldest first with its last error, and put back by a
redrive (the same event id, attempts from 1 again); the attempts listing pages newest first."""

from __future__ import annotations

import asyncio
import time

from events.delivery_harness import TENANT, DeliveryRig, delivery_rig, metric
from events.test_delivery import eventually

from numprotect.core.event_keys import TenantKeys
from support.webhook_receiver import Reply, webhook_receiver


async def test_an_event_failing_every_attempt_becomes_a_dead_letter_and_a_redrive_delivers_it(
    redis_env: dict[str, str],
) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        receiver.script([Reply(500, body=b"down")])
        endpoint = await rig.endpoint(receiver.url)
        published = [await rig.publish([endpoint]) for _ in range(3)]
        ep = endpoint.endpoint_id
        rig.dispatcher()
        attempts = rig.settings.attempts
        got = await receiver.wait_for(3 * attempts)

        async def all_dead() -> bool:
            return int(await rig.redis.zcard(TenantKeys(TENANT).dead(ep))) == 3

        await eventually(all_dead)
        assert sorted(r.webhook_id for r in got) == sorted(p.event_id for p in published for _ in range(attempts))
        letters, following = await rig.deliveries.dead_letters(TENANT, ep, 2, "")
        rest, last = await rig.deliveries.dead_letters(TENANT, ep, 2, following)
        assert following and last == ""
        listed = letters + rest
        assert sorted(d.event_id for d in listed) == sorted(p.event_id for p in published)
        assert [d.dead_time.ToMilliseconds() for d in listed] == sorted(d.dead_time.ToMilliseconds() for d in listed)
        for letter in listed:
            assert (letter.attempts, letter.last_error, letter.event_type) == (attempts, "HTTP 500", "binding.created")
            assert abs(letter.event_time.ToMilliseconds() - time.time() * 1000) < 10_000
        assert metric(rig.metrics[0], "numprotect_webhook_dead_letters_total") == 3
        assert await rig.redis.zcard(TenantKeys(TENANT).queue(ep)) == 0
        await asyncio.sleep(0.5)
        assert len(receiver.received) == 3 * attempts  # nothing after the last attempt

        # Redrive one by id (an unknown id is left out), then the rest: each delivered once more, same id.
        receiver.script([Reply(200)])
        receiver.received.clear()
        assert await rig.deliveries.redrive(TENANT, ep, [published[0].event_id, "evt_unknown"]) == 1
        [again] = await receiver.wait_for(1)
        assert again.webhook_id == published[0].event_id
        assert await rig.deliveries.redrive(TENANT, ep, [published[0].event_id]) == 0  # no dead letter now
        assert await rig.deliveries.redrive(TENANT, ep, []) == 2
        got = await receiver.wait_for(3)
        assert sorted(r.webhook_id for r in got) == sorted(p.event_id for p in published)
        assert await rig.deliveries.dead_letters(TENANT, ep, 10, "") == ([], "")
        newest, _ = await rig.deliveries.attempts(TENANT, ep, published[0].event_id, 10, "")
        assert [(d.attempt, d.succeeded) for d in newest][:2] == [(1, True), (attempts, False)]  # attempts reset
        await asyncio.sleep(0.3)
        assert len(receiver.received) == 3


async def test_attempts_page_newest_first(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        endpoint = await rig.endpoint(receiver.url, max_concurrency=1)
        published = [await rig.publish([endpoint]) for _ in range(5)]
        rig.dispatcher()
        await receiver.wait_for(5)
        ep = endpoint.endpoint_id

        async def recorded() -> bool:
            return len((await rig.deliveries.attempts(TENANT, ep, "", 10, ""))[0]) == 5

        await eventually(recorded)
        seen: list[str] = []
        after = ""
        while True:
            page, after = await rig.deliveries.attempts(TENANT, ep, "", 2, after)
            assert len(page) <= 2
            seen += [d.event_id for d in page]
            if not after:
                break
        assert seen == [p.event_id for p in reversed(published)]
        # One event's attempts only.
        [only] = (await rig.deliveries.attempts(TENANT, ep, published[2].event_id, 10, ""))[0]
        assert only.event_id == published[2].event_id
        assert (await rig.deliveries.attempts(TENANT, ep, "evt_none", 10, "")) == ([], "")


async def test_an_event_trimmed_from_the_log_before_its_attempt_counts_as_undeliverable(
    redis_env: dict[str, str],
) -> None:
    # Its log entry went with the retention (a receiver that kept answering Retry-After for days): the event cannot
    # be sent or redriven. It is counted with the dead letters, so NumprotectWebhookDeadLettersGrowing fires.
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        endpoint = await rig.endpoint(receiver.url)
        published = await rig.publish([endpoint])
        await rig.redis.xdel(TenantKeys(TENANT).log, published.log_id)
        rig.dispatcher()
        await eventually(
            lambda: _when_counted(rig, "numprotect_webhook_dead_letters_total", 1),
        )
        assert receiver.received == []


async def _when_counted(rig: DeliveryRig, name: str, value: float) -> bool | None:
    return True if rig.metrics and metric(rig.metrics[0], name) == value else None
