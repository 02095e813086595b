"""Calls bound their work by the caller's deadline: with a real Redis paused (CLIENT PAUSE ALL) past the deadline,
a real binding service answers CreateBinding, GetBinding, UpdateBinding and DeleteBinding UNAVAILABLE before the
client's deadline, never DEADLINE_EXCEEDED; a failed update or delete leaves no lock behind, so the retry after
Redis is back succeeds at once (not ABORTED); a party B update whose first attempt reached allocation but not the
record is repeated idempotently (OK, allocation and routes holding the new party, not FAILED_PRECONDITION)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.common.v1 import common_pb2
from numprotect.core.clock import SystemClock
from numprotect.core.errors import Unavailable
from numprotect.core.pool_keys import number_hash_key
from numprotect.core.routes import caller_key
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.deadline import CallBudget
from numprotect.services.binding.reads import BindingReads
from numprotect.services.binding.store import mutation_lock_key
from numprotect.services.binding.update import BindingUpdater
from numprotect.services.binding.validation import UpdateSpec
from support.redis_server import RedisServer
from support.rpc import outcome

TENANT = "t1"
CITY = "010"
# The callers' deadline, and each Redis command's timeout in the services (as the chaos suite runs them): three
# Redis waits in a row already exceed the deadline.
DEADLINE_SECONDS = 1.5
SETTINGS = {"NUMPROTECT_REDIS_TIMEOUT": "0.5s"}
PAUSE_MS = 2500


@pytest.fixture
def pausable_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_env(pausable_redis: RedisServer) -> dict[str, str]:
    return {"NUMPROTECT_REDIS_URL": pausable_redis.url, "NUMPROTECT_REDIS_MODE": "standalone"}


@pytest.fixture
def redis_sync(pausable_redis: RedisServer) -> Iterator[redis.Redis]:
    client = pausable_redis.client()
    yield client
    client.close()


def pause(server: RedisServer, milliseconds: int) -> float:
    """CLIENT PAUSE ALL for `milliseconds`; returns when it ends (time.monotonic())."""
    client = server.client()
    try:
        client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")
    finally:
        client.close()
    return time.monotonic() + milliseconds / 1000


async def until(moment: float) -> None:
    await asyncio.sleep(max(moment - time.monotonic(), 0.0) + 0.05)


def create_request(order: str, i: int) -> pb.CreateBindingRequest:
    return pb.CreateBindingRequest(
        tenant_id=TENANT,
        out_order_id=order,
        mode=common_pb2.BINDING_MODE_AXB,
        party_a=f"138{i:08d}",
        party_b=f"139{i:08d}",
        city_code=CITY,
        user_consent=True,
    )


def update_request(binding_id: str, **fields: Any) -> pb.UpdateBindingRequest:
    from google.protobuf.field_mask_pb2 import FieldMask

    change = pb.Binding(binding_id=binding_id, tenant_id=TENANT, **fields)
    return pb.UpdateBindingRequest(binding=change, update_mask=FieldMask(paths=list(fields)))


async def timed(call: Any) -> tuple[grpc.StatusCode, float, str]:
    start = time.monotonic()
    code, message = await outcome(call)
    return code, time.monotonic() - start, message


@pytest.mark.parametrize("deadline", [0.4, DEADLINE_SECONDS], ids=["deadline-below-one-redis-wait", "deadline-1.5s"])
async def test_calls_answer_unavailable_before_their_deadline_while_redis_is_paused(
    services: Any, pausable_redis: RedisServer, redis_sync: Any, deadline: float
) -> None:
    async with services(**SETTINGS) as s:
        kept = [(await s.binding.CreateBinding(create_request(f"kept-{i}", i))).binding for i in range(4)]
        calls: list[tuple[str, Any, Any]] = [
            *(
                (f"CreateBinding {i}", s.binding.CreateBinding, create_request(f"paused-{i}", 100 + i))
                for i in range(4)
            ),
            ("GetBinding", s.binding.GetBinding, pb.GetBindingRequest(binding_id=kept[0].binding_id)),
            (
                "UpdateBinding recording",
                s.binding.UpdateBinding,
                update_request(kept[1].binding_id, recording_enabled=True),
            ),
            (
                "UpdateBinding party_b",
                s.binding.UpdateBinding,
                update_request(kept[2].binding_id, party_b="13700000042"),
            ),
            ("DeleteBinding", s.binding.DeleteBinding, pb.DeleteBindingRequest(binding_id=kept[3].binding_id)),
        ]
        resumed = pause(pausable_redis, PAUSE_MS)
        answers = await asyncio.gather(*(timed(rpc(request, timeout=deadline)) for _, rpc, request in calls))
        print(f"deadline {deadline:g} s, Redis paused (code, seconds):", summary(calls, answers))
        for (name, _, _), (code, seconds, message) in zip(calls, answers, strict=True):
            assert code == grpc.StatusCode.UNAVAILABLE, (name, code, message)
            assert seconds < deadline, (name, seconds)
        assert time.monotonic() < resumed, "Redis was paused for the whole of every call"
        # Redis is back: the same requests again at once, each succeeds (no lock or claim of the failed ones left).
        await until(resumed)
        retried = await asyncio.gather(*(timed(rpc(request, timeout=3)) for _, rpc, request in calls))
        print("the same requests after Redis is back:", summary(calls, retried))
        for (name, _, _), (code, _, message) in zip(calls, retried, strict=True):
            assert code == grpc.StatusCode.OK, (name, code, message)
        assert redis_sync.keys("np:b:{*}:lk") == []


def summary(calls: list[tuple[str, Any, Any]], answers: list[tuple[grpc.StatusCode, float, str]]) -> dict[str, Any]:
    return {
        name: (code.name, round(seconds, 3)) for (name, _, _), (code, seconds, _) in zip(calls, answers, strict=True)
    }


class PausingAllocation(AllocationClient):
    """The real allocation client; Redis is paused right after ReplaceParty reached allocation (mid-update)."""

    def __init__(self, real: AllocationClient, server: RedisServer) -> None:
        vars(self).update(vars(real))  # the real client's channel and settings, whatever they are
        self.server = server
        self.resumed = 0.0

    async def replace_party(self, reservation_id: str, old_party: str, new_party: str) -> str:
        result = await super().replace_party(reservation_id, old_party, new_party)
        self.resumed = pause(self.server, PAUSE_MS)
        return result


async def test_an_update_failed_midway_leaves_no_lock_and_its_retry_is_idempotent(
    services: Any, domain_parts: Any, pausable_redis: RedisServer, redis_sync: Any
) -> None:
    new_party = "13700000042"
    async with services(**SETTINGS) as s, domain_parts(s) as d:
        created = (await s.binding.CreateBinding(create_request("midway", 1))).binding
        old_party = created.party_b
        allocation = PausingAllocation(d.allocation(), pausable_redis)
        updater = BindingUpdater(d.store, BindingReads(d.store), allocation, d.settings, SystemClock())
        change = UpdateSpec(
            tenant_id=TENANT,
            binding_id=created.binding_id,
            paths=frozenset({"party_b"}),
            expire_ms=0,
            party_b=new_party,
            call_restriction=0,
            recording_enabled=False,
        )
        start = time.monotonic()
        with pytest.raises(Unavailable):
            await updater.update(change, CallBudget.within(1.0))
        # Failed at its budget's end, not a Redis timeout (0.5 s) or the pause (2.5 s) later; 0.4 s is the margin a
        # loaded 2-core host needs to run the failing waiter (0.1 s was overrun by 0.13 s in a loaded make test).
        assert time.monotonic() - start < 1.0 + 0.4
        assert allocation.resumed > time.monotonic(), "the update failed while Redis was still paused"
        # Redis is back: the caller's retry at once is not refused ABORTED, and it does not fail FAILED_PRECONDITION
        # although allocation already holds the new party (the first attempt's ReplaceParty landed).
        await until(allocation.resumed)
        reply = await s.binding.UpdateBinding(update_request(created.binding_id, party_b=new_party), timeout=2)
        assert reply.binding.party_b == new_party
        parties = redis_sync.hkeys(number_hash_key(TENANT, CITY, created.virtual_number))
        assert f"p:{new_party}".encode() in parties and f"p:{old_party}".encode() not in parties
        assert redis_sync.exists(caller_key(created.virtual_number, new_party)) == 1
        assert redis_sync.exists(caller_key(created.virtual_number, old_party)) == 0
        assert redis_sync.exists(mutation_lock_key(created.binding_id)) == 0
        # Repeated once more (the state it asks for holds already): OK with the same binding.
        again = await s.binding.UpdateBinding(update_request(created.binding_id, party_b=new_party), timeout=2)
        assert again.binding.party_b == new_party


async def test_an_update_waits_briefly_for_a_lock_whose_release_is_under_way(services: Any, redis_sync: Any) -> None:
    """After a Redis outage the background release of a failed attempt's lock can land just after the caller's
    retry: an update or delete waits for a lock up to a quarter of its budget (at most 0.3 s) instead of answering
    ABORTED at once; a lock held longer than that still answers ABORTED."""
    async with services(**SETTINGS) as s:
        first = (await s.binding.CreateBinding(create_request("lock-brief", 1))).binding
        second = (await s.binding.CreateBinding(create_request("lock-long", 2))).binding
        for created in (first, second):
            assert redis_sync.set(mutation_lock_key(created.binding_id), "another-call", px=10_000)

        async def release_after(binding_id: str, seconds: float) -> None:
            await asyncio.sleep(seconds)
            redis_sync.delete(mutation_lock_key(binding_id))

        release = asyncio.ensure_future(release_after(first.binding_id, 0.15))
        updated = await s.binding.UpdateBinding(update_request(first.binding_id, recording_enabled=True), timeout=2)
        await release
        assert updated.binding.recording_enabled
        code, message = await outcome(
            s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=second.binding_id), timeout=2)
        )
        assert code == grpc.StatusCode.ABORTED, (code, message)
        assert redis_sync.get(mutation_lock_key(second.binding_id)) == b"another-call"


class ConfirmFailingAllocation(AllocationClient):
    """The real allocation client whose next ConfirmReservation fails as if allocation were unreachable."""

    def __init__(self, real: AllocationClient) -> None:
        vars(self).update(vars(real))  # the real client's channel and settings, whatever they are

    async def confirm(self, reservation_id: str, binding_id: str, expire_ms: int) -> None:
        raise Unavailable("allocation ConfirmReservation: unreachable (test)")


async def test_a_retried_shortening_of_the_expiry_shortens_the_reservation_too(
    services: Any, domain_parts: Any
) -> None:
    """A shortening's last step confirms the reservation to the new expiry; when that step failed, the retry finds
    the record at the asked expiry already and must still confirm, or the reservation outlives its binding (the
    invariant checker's reservation_without_binding, seen by the chaos suite after a disk-full fault)."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from numprotect.core.doctor import Options, scan_with

    async with services() as s, domain_parts(s) as d:
        created = (await s.binding.CreateBinding(create_request("shorten", 1))).binding
        new_expiry_ms = created.create_time.ToMilliseconds() + 600_000
        assert new_expiry_ms < created.expire_time.ToMilliseconds()
        failing = ConfirmFailingAllocation(d.allocation())
        updater = BindingUpdater(d.store, BindingReads(d.store), failing, d.settings, SystemClock())
        change = UpdateSpec(
            tenant_id=TENANT,
            binding_id=created.binding_id,
            paths=frozenset({"expire_time"}),
            expire_ms=new_expiry_ms,
            party_b="",
            call_restriction=0,
            recording_enabled=False,
        )
        with pytest.raises(Unavailable):
            await updater.update(change, CallBudget.within(2.0))
        before = await scan_with(d.redis, Options(recheck_seconds=0))
        assert before.counts["reservation_without_binding"] == 1, before.to_text()
        expiry = Timestamp()
        expiry.FromMilliseconds(new_expiry_ms)
        reply = await s.binding.UpdateBinding(update_request(created.binding_id, expire_time=expiry), timeout=3)
        assert reply.binding.expire_time.ToMilliseconds() == new_expiry_ms
        after = await scan_with(d.redis, Options(recheck_seconds=0))
        assert after.clean, after.to_text()


async def test_a_create_whose_order_an_earlier_call_still_settles_answers_unavailable(
    services: Any, domain_parts: Any
) -> None:
    """A retry that arrives while an earlier call's create of the same order is unsettled (its claim pending, e.g.
    its roll-back waiting for Redis to take writes again) waits within its deadline, then answers UNAVAILABLE with
    reason ORDER_CREATE_IN_PROGRESS: the outcome is not known yet, as that earlier call was told (the chaos suite
    saw ABORTED here during a disk-full fault)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    async with services() as s, domain_parts(s) as d:
        now_ms = int(time.time() * 1000)
        claim = await d.store.orders.claim(
            TENANT, "unsettled", "b" + "0" * 22, "2" + "0" * 16, now_ms + 5_000, now_ms + 3_600_000
        )
        assert claim.outcome == "claimed"
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await s.binding.CreateBinding(create_request("unsettled", 1), timeout=1.0)
        assert time.monotonic() - started < 1.0
        error = raised.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        reasons = []
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reasons.append(info.reason)
        assert reasons == ["ORDER_CREATE_IN_PROGRESS"], (reasons, error.details())
