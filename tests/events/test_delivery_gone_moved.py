"""A 410 Gone disables the endpoint only while it still points at the receiver that answered it: a tenant that moves
its endpoint to a new receiver, and retires the old one with 410s, keeps receiving at the new one (a request sent
to the old URL before the move, answered 410 after it, must not disable the moved endpoint)."""

from __future__ import annotations

import json
from typing import Any

from events.delivery_harness import TENANT, delivery_rig

from numprotect.core.clock import SystemClock
from numprotect.services.events.endpoints import StoredEndpoint
from support.webhook_receiver import Reply, webhook_receiver


async def test_a_410_from_the_old_receiver_does_not_disable_the_endpoint_moved_to_a_new_one(
    redis_env: dict[str, str],
) -> None:
    async with webhook_receiver() as old, webhook_receiver() as new, delivery_rig(redis_env) as rig:
        old.script([Reply(410, delay_s=1.0), Reply(410)])  # retired: every request answered 410
        endpoint = await rig.endpoint(old.url)
        published = await rig.publish([endpoint])
        rig.dispatcher()
        await old.wait_for(1)

        # The tenant moves the endpoint while the old receiver's 410 is on its way.
        def move(stored: StoredEndpoint) -> tuple[StoredEndpoint, bool]:
            return stored.changed(lambda e: setattr(e, "url", new.url), SystemClock().now_ms()), True

        assert await rig.endpoints.change(TENANT, endpoint.endpoint_id, move) is not None
        received = await new.wait_for(1)
        assert json.loads(received[0].body)["id"] == published.event_id
        stored: Any = await rig.endpoints.get_stored(TENANT, endpoint.endpoint_id)
        assert stored.enabled and stored.url == new.url, stored.endpoint
