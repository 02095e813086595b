"""The router, the expirer and the log as the events service's own Redis user (core.redis_acl, a redis-server run
with the ACL file): every command and script they send is one that user may run on the keys it touches (the
sweep's undeclared keys, expire_due.lua's binding records), the binding written as the binding user."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from core.test_redis_acl import AclRedis
from events.test_router import TENANT, binding_record

from numprotect.core.clock import SystemClock
from numprotect.core.event_keys import TenantKeys
from numprotect.core.metrics import Metrics
from numprotect.core.redis_acl import ADMIN_USER, SERVICE_USERS
from numprotect.core.redis_client import create_redis
from numprotect.services.events.endpoints import EndpointStore
from numprotect.services.events.expirer import Expirer
from numprotect.services.events.log import EventLog
from numprotect.services.events.router import Router
from support.event_routing import add_endpoint, committed_binding, events_settings, log_entries, queued


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedis]:
    server = AclRedis(tmp_path)
    yield server
    server.server.stop()


async def test_router_expirer_and_log_work_as_the_events_user(acl_redis: AclRedis) -> None:
    binding_user = create_redis(acl_redis.settings(SERVICE_USERS["binding"]))
    events_user = create_redis(acl_redis.settings(SERVICE_USERS["events"]))
    admin: Any = acl_redis.sync(ADMIN_USER)
    try:
        settings = events_settings()
        store = EndpointStore(events_user, settings, SystemClock())
        endpoint = await add_endpoint(store, TENANT)
        router = Router(events_user, settings, store, Metrics("events"), SystemClock())
        expirer = Expirer(events_user, settings, Metrics("events"), SystemClock())
        record = binding_record("b-acl-1", SystemClock().now_ms(), ttl_ms=200)
        await committed_binding(binding_user, record)
        await asyncio.sleep(0.3)

        assert await expirer.round() == 1  # sweeps first, then expires
        assert await router.round() == 2  # binding.created, binding.expired
        types = [fields["ty"] for _, fields in log_entries(admin, TENANT)]
        assert types == ["binding.created", "binding.expired"]
        assert len(queued(admin, TENANT, endpoint.endpoint_id)) == 2

        log = EventLog(events_user, settings, SystemClock())
        watch = log.watch(TENANT, (), "0")
        event, _ = await anext(watch)  # type: ignore[call-overload]
        await watch.aclose()  # type: ignore[attr-defined]
        assert json.loads(event.payload_json)["data"]["bindingId"] == record.binding_id
        admin.delete(TenantKeys(TENANT).queue(endpoint.endpoint_id))  # delivered
        assert await log.replay(endpoint, 0, 2**62) == 2
    finally:
        admin.close()
        await binding_user.aclose()
        await events_user.aclose()
