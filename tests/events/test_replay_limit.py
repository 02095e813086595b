"""ReplayEvents' bound (NUMPROTECT_EVENTS_MAX_REPLAY_EVENTS): a range holding more events for the endpoint than the
setting is refused RESOURCE_EXHAUSTED naming it (google.rpc.QuotaFailure) with nothing queued; up to the limit,
every event of the range is queued, read from the log in chunks (ids only) however many chunks the range spans."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from events.conftest import TENANT, ServiceFactory
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from numprotect.core.clock import SystemClock
from numprotect.core.errors import ResourceExhausted
from numprotect.core.event_keys import TenantKeys
from numprotect.core.settings import Env, SettingsError
from numprotect.events.v1 import events_pb2 as pb
from numprotect.services.events.log import REPLAY_PAGE, EventLog
from numprotect.services.events.settings import EventsSettings
from support.event_routing import add_endpoint, events_settings, queued, router_parts
from support.rpc import fails

SETTING = "NUMPROTECT_EVENTS_MAX_REPLAY_EVENTS"


def write_log(redis_sync: Any, tenant_id: str, times: list[int], types: list[str]) -> None:
    """Log entries as route.lua writes them (id, ty, at, p), one per (time, type)."""
    pipe = redis_sync.pipeline(transaction=False)
    for i, (at, kind) in enumerate(zip(times, types, strict=True)):
        pipe.xadd(TenantKeys(tenant_id).log, {"id": f"evt_{i}", "ty": kind, "at": str(at), "p": "{}"})
    pipe.execute()


async def test_a_range_of_more_events_than_the_limit_queues_nothing_and_up_to_it_everything(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, store, _, _):
        locks = await add_endpoint(store, TENANT, ["number.locked"])
        now = SystemClock().now_ms()
        count = 2 * REPLAY_PAGE + 500  # three chunks
        times = [now - 60_000 + i for i in range(count)]
        write_log(redis_sync, TENANT, times, ["number.locked", "number.unlocked"] * (count // 2))
        wanted = count // 2  # the locks in the range

        tight = EventLog(redis, events_settings(**{SETTING: str(wanted - 1)}), SystemClock())
        with pytest.raises(ResourceExhausted) as refused:
            await tight.replay(locks, now - 120_000, now + 1)
        assert refused.value.subject == SETTING and SETTING in str(refused.value)
        assert queued(redis_sync, TENANT, locks.endpoint_id) == []

        enough = EventLog(redis, events_settings(**{SETTING: str(wanted)}), SystemClock())
        assert await enough.replay(locks, now - 120_000, now + 1) == wanted
        entries = redis_sync.xrange(TenantKeys(TENANT).log)
        locked = {e[0].decode() for e in entries if e[1][b"ty"] == b"number.locked"}
        assert set(queued(redis_sync, TENANT, locks.endpoint_id)) == locked
        # The range's bounds: [start, end) of the event times, across the chunks.
        redis_sync.delete(TenantKeys(TENANT).queue(locks.endpoint_id))
        # Locks are the even indexes 0 .. count - 2: [times[1], times[-2]) leaves out the first and the last.
        assert await enough.replay(locks, times[1], times[-2]) == wanted - 2


async def test_the_api_answers_resource_exhausted_naming_the_setting(
    events_service: ServiceFactory, redis_sync: Any
) -> None:
    async with events_service(background=False, **{SETTING: "2"}) as events:
        tenant = events.tenant()
        url = "http://127.0.0.1:9/hook"
        endpoint = (await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=url))).endpoint
        now = SystemClock().now_ms()
        write_log(redis_sync, TENANT, [now - 3000, now - 2000, now - 1000], ["number.locked"] * 3)

        def request(start_ms: int) -> pb.ReplayEventsRequest:
            start, end = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
            start.FromMilliseconds(start_ms)
            end.FromMilliseconds(now)
            return pb.ReplayEventsRequest(endpoint_id=endpoint.endpoint_id, start_time=start, end_time=end)

        error = await fails(grpc.StatusCode.RESOURCE_EXHAUSTED, tenant.ReplayEvents(request(now - 5000)))
        assert SETTING in (error.details() or "")
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        quota = error_details_pb2.QuotaFailure()
        assert any(d.Unpack(quota) for d in status.details)
        assert quota.violations[0].subject == SETTING
        assert queued(redis_sync, TENANT, endpoint.endpoint_id) == []
        assert (await tenant.ReplayEvents(request(now - 2500))).events_queued == 2


@pytest.mark.parametrize("value", ["0", "-1", "many", "10000001"])
def test_the_limit_is_validated_at_start_up(value: str) -> None:
    with pytest.raises(SettingsError, match=SETTING):
        EventsSettings.from_env(Env({SETTING: value}))
