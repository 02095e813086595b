"""Webhook delivery end to end against real receivers on loopback and real Redis: signatures (verified with the
standardwebhooks library), retries on the schedule with one event id, Retry-After, pauses, 410 Gone, the
per-endpoint concurrency limit, batching, several dispatchers, leases taken over, and the delivery metrics."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from events.delivery_harness import TENANT, DeliveryRig, delivery_rig, metric
from standardwebhooks import Webhook

from numprotect.core.event_keys import TenantKeys
from numprotect.events.v1 import events_pb2
from numprotect.services.events.dispatcher import DRAIN_SECONDS
from numprotect.services.events.endpoints import ENABLED, GONE, StoredEndpoint
from numprotect.services.events.signing import message_id
from support.webhook_receiver import Received, Reply, webhook_receiver

T = TypeVar("T")
# Scheduling slack on a loaded 2-core host: a retry may come this much later than its delay (never earlier).
LATE_S = 0.4


async def eventually(check: Callable[[], Awaitable[T | None]], timeout_s: float = 10.0) -> T:
    """`check()`'s first truthy value, asked every 20 ms; fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def attempts_of(rig: DeliveryRig, endpoint: StoredEndpoint, event_id: str = "") -> list[events_pb2.Delivery]:
    deliveries, _ = await rig.deliveries.attempts(endpoint.tenant_id, endpoint.endpoint_id, event_id, 100, "")
    return deliveries


async def test_an_event_arrives_signed_with_its_id_and_one_success_is_recorded(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        endpoint = await rig.endpoint(receiver.url)
        published = await rig.publish([endpoint], "binding.created", bindingId="b-1")
        dispatcher = rig.dispatcher()
        [got] = await receiver.wait_for(1)
        verified = Webhook(endpoint.secret).verify(got.body, got.headers)
        assert verified["id"] == published.event_id and verified["type"] == "binding.created"
        assert verified["data"]["bindingId"] == "b-1"
        assert got.body == published.body  # the single event's body, as logged
        assert got.webhook_id == published.event_id
        assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 5
        assert got.headers["content-type"] == "application/json"
        assert got.headers["user-agent"] == "numprotect-webhooks/1"
        [attempt] = await eventually(lambda: attempts_of(rig, endpoint))
        assert (attempt.event_id, attempt.event_type, attempt.attempt) == (published.event_id, "binding.created", 1)
        assert (attempt.http_status, attempt.succeeded, attempt.error) == (200, True, "")
        assert attempt.latency.ToNanoseconds() > 0
        assert abs(attempt.attempt_time.ToMilliseconds() - time.time() * 1000) < 5000
        metrics = rig.metrics[0]
        assert metric(metrics, "numprotect_webhook_deliveries_total", {"outcome": "success"}) == 1
        assert metric(metrics, "numprotect_webhook_delivery_seconds_count") == 1
        # Nothing is left queued or in flight.
        assert await dispatcher.refresh_queue_depth() == 0
        assert metric(metrics, "numprotect_webhook_queue_depth") == 0
        await asyncio.sleep(0.3)
        assert len(receiver.received) == 1


async def test_retries_follow_the_schedule_with_one_event_id_until_a_2xx(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        receiver.script([Reply(500), Reply(500), Reply(500), Reply(200)])
        endpoint = await rig.endpoint(receiver.url)
        published = await rig.publish([endpoint])
        rig.dispatcher()
        got = await receiver.wait_for(4)
        assert {r.webhook_id for r in got} == {published.event_id}
        for r in got:
            assert Webhook(endpoint.secret).verify(r.body, r.headers)["id"] == published.event_id
        jitter = rig.settings.retry_jitter
        for delay, (before, after) in zip(rig.settings.retry_schedule, itertools.pairwise(got), strict=True):
            gap = after.at - before.at
            assert delay * (1 - jitter) <= gap <= delay * (1 + jitter) + LATE_S, (delay, gap)
        attempts = await eventually(
            lambda: _when(attempts_of(rig, endpoint, published.event_id), lambda a: len(a) == 4)
        )
        assert [a.attempt for a in attempts] == [4, 3, 2, 1]  # newest first
        assert [a.http_status for a in attempts] == [200, 500, 500, 500]
        assert [a.succeeded for a in attempts] == [True, False, False, False]
        assert [a.error for a in attempts] == ["", "HTTP 500", "HTTP 500", "HTTP 500"]
        metrics = rig.metrics[0]
        assert metric(metrics, "numprotect_webhook_deliveries_total", {"outcome": "success"}) == 1
        assert metric(metrics, "numprotect_webhook_deliveries_total", {"outcome": "failure"}) == 3
        assert metric(metrics, "numprotect_webhook_delivery_seconds_count") == 4
        # The success reset the endpoint's failure count; nothing queued is left.
        state = TenantKeys(TENANT).state(endpoint.endpoint_id)
        assert await rig.redis.hget(state, "fails") is None
        await asyncio.sleep(0.8)
        assert len(receiver.received) == 4


async def _when(values: Awaitable[T], condition: Callable[[T], bool]) -> T | None:
    value = await values
    return value if condition(value) else None


async def test_retry_after_is_honoured_and_pauses_the_endpoint(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        receiver.script([Reply(429, headers={"Retry-After": "1"}), Reply(200)])
        endpoint = await rig.endpoint(receiver.url)
        first = await rig.publish([endpoint])
        rig.dispatcher()
        [refused] = await receiver.wait_for(1)
        # A second event, due at once, waits for the pause too. It is published once the 429 is settled: before
        # that (the receiver records a request before it answers) the pause is not known yet and a claim may take it.
        state = TenantKeys(TENANT).state(endpoint.endpoint_id)
        await eventually(lambda: rig.redis.hget(state, "pause"))
        second = await rig.publish([endpoint])
        got = await receiver.wait_for(3)
        assert [r.webhook_id for r in got[:1]] == [first.event_id]
        assert {r.webhook_id for r in got[1:]} == {first.event_id, second.event_id}
        for later in got[1:]:
            assert 1.0 <= later.at - refused.at <= 1.0 + LATE_S + 1.0, later.at - refused.at
        [retry, attempt] = await eventually(
            lambda: _when(attempts_of(rig, endpoint, first.event_id), lambda a: len(a) == 2)
        )
        assert (attempt.http_status, attempt.error, retry.http_status) == (429, "HTTP 429", 200)


async def test_a_4xx_is_retried_without_pausing_the_endpoint(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env, NUMPROTECT_EVENTS_RETRY_JITTER="0") as rig:
        failing = await rig.endpoint(receiver.url.replace("/hook", "/failing"))
        receiver.respond = lambda r: Reply(400 if r.path == "/failing" else 200)
        first = await rig.publish([failing])
        rig.dispatcher()
        [refused] = await receiver.wait_for(1)
        second = await rig.publish([failing])
        got = await receiver.wait_for(3)
        # The second event went out at once (no pause), the first again after the schedule's first delay.
        by_id = {r.webhook_id: r.at for r in got[1:]}
        assert by_id[second.event_id] - refused.at < 0.2 + LATE_S
        assert by_id[first.event_id] - refused.at >= 0.2
        assert first.event_id != second.event_id


async def test_a_redirect_is_a_failed_attempt_that_pauses_the_endpoint_like_a_5xx(redis_env: dict[str, str]) -> None:
    # A receiver that redirects is misconfigured or moved: it gets the backoff an overloaded one gets, not a request
    # per due event (the review saw a redirecting receiver get 116 requests to an always-500 one's 70).
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        # The Location is the receiver's own /elsewhere: a redirect followed would show there.
        receiver.script([Reply(302, headers={"Location": receiver.url.replace("/hook", "/elsewhere")})])
        endpoint = await rig.endpoint(receiver.url)
        published = await rig.publish([endpoint])
        rig.dispatcher()
        [attempt] = await eventually(lambda: attempts_of(rig, endpoint))
        assert (attempt.event_id, attempt.http_status, attempt.succeeded) == (published.event_id, 302, False)
        state = TenantKeys(TENANT).state(endpoint.endpoint_id)
        assert int(await rig.redis.hget(state, "fails") or 0) == 1
        assert int(await rig.redis.hget(state, "pause") or 0) > 0
        # The redirect was not followed. (Not "one request": the pause is the schedule's first delay, 200 ms, and on a
        # loaded host the retry after it came before this line.)
        assert [r.path for r in receiver.received][:1] == ["/hook"]
        assert {r.path for r in receiver.received} == {"/hook"}


async def test_410_gone_disables_the_endpoint_and_keeps_its_queue(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        receiver.script([Reply(410), Reply(200)])
        endpoint = await rig.endpoint(receiver.url)
        first = await rig.publish([endpoint])
        rig.dispatcher()
        await receiver.wait_for(1)

        async def state() -> int:
            stored = await rig.endpoints.get_stored(TENANT, endpoint.endpoint_id)
            assert stored is not None
            return stored.endpoint.state

        await eventually(lambda: _when(state(), lambda s: s == GONE))
        stored = await rig.endpoints.get_stored(TENANT, endpoint.endpoint_id)
        assert stored is not None and "410" in stored.endpoint.state_reason
        assert metric(rig.metrics[0], "numprotect_webhook_endpoints_gone_total") == 1
        second = await rig.publish([endpoint])
        await asyncio.sleep(1.5)  # past the retry of the first and the endpoint cache
        assert len(receiver.received) == 1
        keys = TenantKeys(TENANT)
        queued = await rig.redis.zrange(keys.queue(endpoint.endpoint_id), 0, -1)
        assert {q.decode() for q in queued} == {first.log_id, second.log_id}
        # Enabled again (UpdateEndpoint's change): both are delivered.

        def enable(current: StoredEndpoint) -> tuple[StoredEndpoint, bool]:
            return current.changed(lambda e: setattr(e, "state", ENABLED), int(time.time() * 1000)), True

        await rig.endpoints.change(TENANT, endpoint.endpoint_id, enable)
        got = await receiver.wait_for(3)
        assert {r.webhook_id for r in got[1:]} == {first.event_id, second.event_id}


async def test_the_concurrency_limit_holds_across_dispatchers(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        slow_s = 0.3
        receiver.script([Reply(200, delay_s=slow_s)])
        endpoint = await rig.endpoint(receiver.url, max_concurrency=2)
        published = [await rig.publish([endpoint]) for _ in range(8)]
        rig.dispatcher()
        rig.dispatcher()
        got = await receiver.wait_for(8, timeout_s=15)
        arrivals = sorted(r.at for r in got)
        # A request ends no sooner than slow_s after it arrived, so the requests in flight when one arrives are at
        # most those that arrived less than slow_s before it.
        at_once = [sum(1 for a in arrivals if a <= t < a + slow_s) for t in arrivals]
        assert max(at_once) == 2, at_once
        assert {r.webhook_id for r in got} == {p.event_id for p in published}
        assert len(got) == 8


async def test_batches_carry_up_to_batch_size_events_as_a_json_array(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        endpoint = await rig.endpoint(receiver.url, batch_size=3, max_concurrency=1)
        published = [await rig.publish([endpoint]) for _ in range(7)]
        rig.dispatcher()
        got = await receiver.wait_for(3)
        bodies = [json.loads(r.body) for r in got]
        assert [len(b) for b in bodies] == [3, 3, 1]
        assert [e["id"] for b in bodies for e in b] == [p.event_id for p in published]  # in order, each once
        for r, b in zip(got, bodies, strict=True):
            assert r.webhook_id == message_id([e["id"] for e in b], batched=True)
            assert r.webhook_id.startswith("msg_")
            assert Webhook(endpoint.secret).verify(r.body, r.headers) == b
        assert r.body == b"[" + published[6].body + b"]"
        # One attempt per request, the batch's other events named.
        attempts = await eventually(lambda: _when(attempts_of(rig, endpoint), lambda a: len(a) == 3))
        assert attempts[-1].event_id == published[0].event_id
        assert list(attempts[-1].batched_event_ids) == [published[1].event_id, published[2].event_id]
        [one] = await attempts_of(rig, endpoint, published[1].event_id)
        assert one.event_id == published[1].event_id
        assert list(one.batched_event_ids) == [published[0].event_id, published[2].event_id]
        await asyncio.sleep(0.3)
        assert len(receiver.received) == 3


async def test_two_dispatchers_share_the_work_with_no_double_delivery(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        receiver.script([Reply(200, delay_s=0.01)])
        endpoints = [await rig.endpoint(receiver.url.replace("/hook", f"/hook{i}")) for i in range(3)]
        published = [await rig.publish([endpoints[i % 3]]) for i in range(90)]
        # Each may hold 3 requests of the endpoints' 12 at once: neither can take all the work.
        rig.dispatcher(requests_in_flight=3)
        rig.dispatcher(requests_in_flight=3)
        got = await receiver.wait_for(90, timeout_s=20)
        await asyncio.sleep(0.5)
        ids = [r.webhook_id for r in receiver.received]
        assert sorted(ids) == sorted(p.event_id for p in published)  # every event once
        shares = [metric(m, "numprotect_webhook_deliveries_total", {"outcome": "success"}) for m in rig.metrics]
        assert sum(shares) == 90 and min(shares) > 0, shares
        assert len(got) == 90


async def test_a_lost_dispatchers_claims_are_taken_over_after_the_lease(redis_env: dict[str, str]) -> None:
    async with (
        webhook_receiver() as receiver,
        delivery_rig(redis_env, NUMPROTECT_EVENTS_REQUEST_TIMEOUT="200ms") as rig,
    ):
        endpoint = await rig.endpoint(receiver.url)
        published = await rig.publish([endpoint])
        lost = rig.dispatcher(start=False)
        [request], _ = await lost.claim(10)  # claimed, never sent nor settled: as if its process died
        assert [e.event_id for e in request.events] == [published.event_id]
        started = time.monotonic()
        rig.dispatcher()
        [got] = await receiver.wait_for(1, timeout_s=rig.settings.lease_s + 5)
        assert got.webhook_id == published.event_id
        assert time.monotonic() - started >= rig.settings.lease_s - 0.5
        [attempt] = await eventually(lambda: attempts_of(rig, endpoint))
        assert (attempt.attempt, attempt.succeeded) == (2, True)  # the lost claim counted as an attempt
        # The lost dispatcher's late settle changes nothing (its lease was taken over); its attempt is recorded.
        settled = await lost.deliver(request)
        assert settled.settled == 0
        assert len(await attempts_of(rig, endpoint)) == 2


async def test_a_refused_address_fails_the_attempt_without_a_request(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env, NUMPROTECT_EVENTS_ALLOWED_NETWORKS="") as rig:
        endpoint = await rig.endpoint(receiver.url)
        published = await rig.publish([endpoint])
        rig.dispatcher()
        [attempt] = await eventually(lambda: attempts_of(rig, endpoint))
        assert attempt.event_id == published.event_id
        assert (attempt.http_status, attempt.succeeded) == (0, False)
        assert attempt.error.startswith("address not allowed: 127.0.0.1 (loopback")
        state = TenantKeys(TENANT).state(endpoint.endpoint_id)
        assert await rig.redis.hget(state, "pause") is None  # not the receiver's fault
        assert receiver.received == []


def _ids(received: list[Received]) -> list[str]:
    return [r.webhook_id for r in received]


async def test_close_is_bounded_with_a_request_in_flight_and_the_event_stays_claimed(
    redis_env: dict[str, str],
) -> None:
    async with (
        webhook_receiver() as receiver,
        delivery_rig(redis_env, NUMPROTECT_EVENTS_REQUEST_TIMEOUT="30s") as rig,
    ):
        receiver.script([Reply(200, delay_s=DRAIN_SECONDS + 1.5)])
        endpoint = await rig.endpoint(receiver.url)
        published = await rig.publish([endpoint])
        dispatcher = rig.dispatcher()
        await receiver.wait_for(1)
        started = time.monotonic()
        await rig.stop(dispatcher)
        assert time.monotonic() - started < DRAIN_SECONDS + 1.5
        # Cancelled mid-request: the event stays in flight under its lease, for another dispatcher after it.
        in_flight = await rig.redis.zrange(TenantKeys(TENANT).in_flight(endpoint.endpoint_id), 0, -1)
        assert [m.decode() for m in in_flight] == [published.log_id]
        assert await attempts_of(rig, endpoint) == []


async def test_every_tenants_endpoints_are_served_in_one_round(redis_env: dict[str, str]) -> None:
    async with webhook_receiver() as receiver, delivery_rig(redis_env) as rig:
        tenants = ["t-a", "t-b", "t-c"]
        endpoints = [await rig.endpoint(receiver.url.replace("/hook", f"/{t}"), tenant_id=t) for t in tenants]
        published = [await rig.publish([endpoint]) for endpoint in endpoints for _ in range(2)]
        assert await rig.tenants() == set(tenants)
        dispatcher = rig.dispatcher(start=False)
        requests, _ = await dispatcher.claim(10)  # one round: every tenant's claim (a pipeline; per node on a cluster)
        assert sorted(e.event_id for r in requests for e in r.events) == sorted(p.event_id for p in published)
        assert {r.endpoint.tenant_id for r in requests} == set(tenants)
        for request in requests:
            assert (await dispatcher.deliver(request)).settled == len(request.events)
        assert sorted(r.path for r in receiver.received) == sorted(f"/{t}" for t in tenants for _ in range(2))
        assert await dispatcher.refresh_queue_depth() == 0
