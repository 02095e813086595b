"""Delivery as the events service's own Redis user (core.redis_acl, a redis-server run with the ACL file): claims,
settles, a 410's mark_gone, the queue depth, the attempts and dead-letter listings and a redrive are all commands
that user may run on the keys they touch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core.test_redis_acl import AclRedis
from events.delivery_harness import TENANT, DeliveryRig, delivery_rig
from events.test_delivery import eventually

from numprotect.core.redis_acl import SERVICE_USERS
from numprotect.services.events.endpoints import GONE
from support.webhook_receiver import Received, Reply, webhook_receiver


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedis]:
    server = AclRedis(tmp_path)
    yield server
    server.server.stop()


def _by_path(request: Received) -> Reply:
    return Reply({"/ok": 200, "/down": 503, "/gone": 410}[request.path])


async def test_delivery_works_as_the_events_user(acl_redis: AclRedis) -> None:
    environ = acl_redis.env(SERVICE_USERS["events"])
    async with webhook_receiver() as receiver, delivery_rig(environ, NUMPROTECT_EVENTS_RETRY_SCHEDULE="100ms") as rig:
        receiver.respond = _by_path
        ok = await rig.endpoint(receiver.url.replace("/hook", "/ok"), batch_size=2)
        down = await rig.endpoint(receiver.url.replace("/hook", "/down"))
        gone = await rig.endpoint(receiver.url.replace("/hook", "/gone"))
        first = await rig.publish([ok, down, gone])
        await rig.publish([ok])
        dispatcher = rig.dispatcher(start=False)
        assert await dispatcher.refresh_queue_depth() == 4
        dispatcher.start()

        async def settled() -> bool:
            letters, _ = await rig.deliveries.dead_letters(TENANT, down.endpoint_id, 10, "")
            stored = await rig.endpoints.get_stored(TENANT, gone.endpoint_id)
            return len(letters) == 1 and stored is not None and stored.endpoint.state == GONE

        await eventually(settled)
        [letter] = (await rig.deliveries.dead_letters(TENANT, down.endpoint_id, 10, ""))[0]
        assert (letter.event_id, letter.attempts, letter.last_error) == (first.event_id, 2, "HTTP 503")
        [batch] = (await rig.deliveries.attempts(TENANT, ok.endpoint_id, "", 10, ""))[0]
        assert batch.succeeded and len(batch.batched_event_ids) == 1
        assert await rig.deliveries.redrive(TENANT, down.endpoint_id, []) == 1
        await eventually(lambda: _attempts(rig, down.endpoint_id, 3))
        assert [r.path for r in receiver.received].count("/gone") == 1


async def _attempts(rig: DeliveryRig, endpoint_id: str, count: int) -> bool:
    return len((await rig.deliveries.attempts(TENANT, endpoint_id, "", 10, ""))[0]) >= count
