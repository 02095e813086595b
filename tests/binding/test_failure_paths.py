"""The binding service's domain modules at failure paths an end-to-end call cannot reach: the create saga
(create.py) with a lost commit reply, an undo that cannot cancel, a clean-up that fails, a slow create overtaken
by its retry; UpdateBinding and DeleteBinding (update.py) failing midway.

Real Redis and the real allocation service; a fault is injected at one step by wrapping the real client or store
(a lost reply: the step reaches the real thing first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from google.protobuf import duration_pb2
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from numprotect.allocation.v1 import allocation_pb2
from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.common.v1 import common_pb2
from numprotect.core.binding_records import BindingEvent, BindingRecordStore, binding_key, order_key
from numprotect.core.clock import FixedClock, SystemClock
from numprotect.core.errors import Aborted, Unavailable
from numprotect.core.routes import MODE_AXB, RESTRICTION_NONE, Route, caller_key
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.create import BindingCreator
from numprotect.services.binding.reads import BindingReads
from numprotect.services.binding.settings import CREATE_STEPS
from numprotect.services.binding.store import (
    TENANT_SHARDS,
    OrderClaims,
    mutation_lock_key,
    pending_creates_key,
    tenant_shard,
)
from numprotect.services.binding.update import BindingUpdater
from numprotect.services.binding.validation import CreateSpec, UpdateSpec

A = "13800000001"
B = "13900000002"
B2 = "13700000003"


def spec(order: str) -> CreateSpec:
    return CreateSpec(
        tenant_id="t1",
        out_order_id=order,
        mode=MODE_AXB,
        party_a=A,
        party_b=B,
        ttl_ms=3_600_000,
        city_code="010",
        strict_city=False,
        call_restriction=RESTRICTION_NONE,
        recording_enabled=False,
        allow_any_caller=False,
    )


def create_request(order: str) -> pb.CreateBindingRequest:
    """The request of `spec(order)`, for the binding service under test."""
    return pb.CreateBindingRequest(
        tenant_id="t1",
        out_order_id=order,
        mode=common_pb2.BINDING_MODE_AXB,
        party_a=A,
        party_b=B,
        city_code="010",
        ttl=duration_pb2.Duration(seconds=3600),
        user_consent=True,
    )


class FaultyAllocation(AllocationClient):
    """The real client of the real allocation service, failing or held at chosen steps."""

    def __init__(
        self,
        real: AllocationClient,
        *,
        confirm_fails: bool = False,
        cancel_failures: int = 0,
        confirm_gate: asyncio.Event | None = None,
    ) -> None:
        vars(self).update(vars(real))  # the real client's channel and settings, whatever they are
        self.confirm_fails = confirm_fails
        self.cancel_failures = cancel_failures
        self.confirm_gate = confirm_gate
        self.confirm_entered = asyncio.Event()

    async def confirm(self, reservation_id: str, binding_id: str, expire_ms: int) -> None:
        self.confirm_entered.set()
        if self.confirm_gate is not None:
            await self.confirm_gate.wait()
        if self.confirm_fails:
            raise Unavailable("allocation ConfirmReservation: injected fault")
        await super().confirm(reservation_id, binding_id, expire_ms)

    async def cancel(self, reservation_id: str, reason: str) -> None:
        if self.cancel_failures > 0:
            self.cancel_failures -= 1
            raise Unavailable("allocation CancelReservation: injected fault")
        await super().cancel(reservation_id, reason)


class CommitReplyLost(OrderClaims):
    """The commit reaches Redis, its reply does not reach the create."""

    async def commit(
        self, tenant_id: str, out_order_id: str, binding_id: str, fp: str, deadline_ms: int, expire_at_ms: int
    ) -> bool:
        await super().commit(tenant_id, out_order_id, binding_id, fp, deadline_ms, expire_at_ms)
        raise RedisConnectionError("connection lost before the reply")


class RecordUpdateFails(BindingRecordStore):
    """Every write to an existing record fails (as with Redis gone between two steps)."""

    async def update(
        self,
        binding_id: str,
        fields: Any,
        event: BindingEvent | None,
        *,
        end_ms: int | None = None,
        release: tuple[str, str] | None = None,
    ) -> bool:
        raise RedisConnectionError("connection lost")


def keys_matching(redis_sync: Any, pattern: str) -> list[str]:
    return sorted(k.decode() for k in redis_sync.scan_iter(match=pattern, count=1000))


def non_empty(redis_sync: Any, pattern: str) -> list[str]:
    """Keys matching `pattern` that hold members (zsets emptied by an undo may linger until trimmed)."""
    return [k for k in keys_matching(redis_sync, pattern) if redis_sync.zcard(k)]


def order_state(redis_sync: Any, order: str) -> tuple[str, str]:
    """(state p/d, binding id) of the order key."""
    state, binding_id, *_ = redis_sync.get(order_key("t1", order)).decode().split("|")
    return state, binding_id


def routed_binding(redis_sync: Any, virtual_number: str, caller: str) -> str | None:
    raw = redis_sync.get(caller_key(virtual_number, caller))
    return None if raw is None else Route.decode(raw).binding_id


async def in_use(s: Any) -> int:
    stats = await s.allocation.GetPoolStats(allocation_pb2.GetPoolStatsRequest(tenant_id="t1"))
    return int(stats.in_use)


def record_ids(redis_sync: Any) -> Sequence[str]:
    return [k.removeprefix("np:b:{").removesuffix("}") for k in keys_matching(redis_sync, "np:b:{*}")]


def pending_ids(redis_sync: Any) -> list[str]:
    """Ids on the pending-creates list (creates not resolved yet)."""
    keys = keys_matching(redis_sync, "np:ord:pending:*")
    return sorted(member.decode() for key in keys for member in redis_sync.zrange(key, 0, -1))


def assert_route_lives_until_expiry(redis_sync: Any, record: Any) -> None:
    for party in (A, B):
        key = caller_key(record.virtual_number, party)
        assert routed_binding(redis_sync, record.virtual_number, party) == record.binding_id
        assert redis_sync.pexpiretime(key) == record.expire_ms


async def test_a_commit_whose_reply_is_lost_completes_the_binding(
    services: Any, domain_parts: Any, redis_sync: Any
) -> None:
    """The resolution finds the order done with this create's id: it completes the binding and answers OK."""
    async with services() as s, domain_parts(s) as d:
        store = replace(d.store, orders=CommitReplyLost(d.redis))
        creator = BindingCreator(store, d.allocation(), d.settings, SystemClock())
        created = await creator.create(spec("lost-1"))
        binding_id = created.record.binding_id
        assert order_state(redis_sync, "lost-1") == ("d", binding_id)
        assert redis_sync.hget(binding_key(binding_id), "st") == b"a"
        assert_route_lives_until_expiry(redis_sync, created.record)
        assert pending_ids(redis_sync) == []
        assert await in_use(s) == 1
        again = await s.binding.CreateBinding(create_request("lost-1"))
        assert again.binding.binding_id == binding_id


async def test_a_roll_back_that_cannot_cancel_is_finished_by_the_recovery(
    services: Any, domain_parts: Any, redis_sync: Any
) -> None:
    """Confirm fails, then so does the roll-back's cancel: routes, index, history entries and claim go, the pending
    record stays (the way back to the reservation) with its pending-creates entry; the recovery finishes it."""
    async with services() as s, domain_parts(s) as d:
        faulty = FaultyAllocation(d.allocation(), confirm_fails=True, cancel_failures=1)
        creator = BindingCreator(d.store, faulty, d.settings, SystemClock())
        with pytest.raises(Unavailable, match="ConfirmReservation"):
            await creator.create(spec("undo-1"))
        assert keys_matching(redis_sync, "np:rt:*") == []
        assert keys_matching(redis_sync, "np:ord:{*") == []
        assert non_empty(redis_sync, "np:tl:*") == []
        assert non_empty(redis_sync, "np:nh:*") == []
        [binding_id] = record_ids(redis_sync)
        assert redis_sync.hget(binding_key(binding_id), "st") == b"p"
        assert pending_ids(redis_sync) == [binding_id]
        assert await in_use(s) == 1  # the reservation the failed cancel left
        # The recovery of any process (here: the deadline counted as passed) cancels it and removes the record.
        counts = await creator.recover_overdue(margin_ms=-d.settings.create_lease_ms - 60_000)
        assert counts == {"rolled back": 1}
        assert await in_use(s) == 0
        assert record_ids(redis_sync) == [] and pending_ids(redis_sync) == []
        created = await BindingCreator(d.store, d.allocation(), d.settings, SystemClock()).create(spec("undo-1"))
        assert order_state(redis_sync, "undo-1") == ("d", created.record.binding_id)


async def _abandon(s: Any, redis_sync: Any, order: str) -> str:
    """A create of `order` as a crash after its confirm but before its commit leaves it: the order pending past its
    deadline, the record pending, on the pending-creates list. Returns its binding id."""
    await s.binding.CreateBinding(create_request(order))
    key = order_key("t1", order)
    value: str = redis_sync.get(key).decode()
    _, binding_id, fp, _ = value.split("|")
    redis_sync.set(key, f"p|{binding_id}|{fp}|1", keepttl=True)  # deadline long past
    redis_sync.hset(binding_key(binding_id), "st", "p")
    redis_sync.zadd(pending_creates_key(tenant_shard(binding_id)), {binding_id: 1})
    return binding_id


async def test_a_take_over_whose_roll_back_fails_leaves_the_abandoned_create_to_the_recovery(
    services: Any, domain_parts: Any, redis_sync: Any
) -> None:
    async with services() as s, domain_parts(s) as d:
        abandoned = await _abandon(s, redis_sync, "stale-1")
        creator = BindingCreator(
            d.store, FaultyAllocation(d.allocation(), cancel_failures=1), d.settings, SystemClock()
        )
        created = await creator.create(spec("stale-1"))
        new_id = created.record.binding_id
        assert new_id != abandoned
        assert order_state(redis_sync, "stale-1") == ("d", new_id)
        assert_route_lives_until_expiry(redis_sync, created.record)
        # The abandoned create's reservation could not be cancelled: it stays on the list, with its record.
        assert pending_ids(redis_sync) == [abandoned]
        assert await in_use(s) == 2
        assert await creator.recover_overdue(margin_ms=0) == {"rolled back": 1}
        assert redis_sync.exists(binding_key(abandoned)) == 0
        assert pending_ids(redis_sync) == []
        assert await in_use(s) == 1
        assert_route_lives_until_expiry(redis_sync, created.record)


async def test_a_slow_create_overtaken_by_its_retry_rolls_itself_back(
    services: Any, domain_parts: Any, redis_sync: Any
) -> None:
    """A create stuck past its deadline (its clock says its lease is over) before ConfirmReservation: its routes
    lapsed at the deadline; the retry takes the order over and rolls it back; once it wakes, its confirm fails and
    it rolls back again without touching the retry's binding."""
    async with services() as s, domain_parts(s) as d:
        gate = asyncio.Event()
        stuck = FaultyAllocation(d.allocation(), confirm_gate=gate)
        behind = FixedClock(SystemClock().now_ms() - d.settings.create_lease_ms - 1000)
        slow = asyncio.create_task(BindingCreator(d.store, stuck, d.settings, behind).create(spec("slow-1")))
        async with asyncio.timeout(10):
            await stuck.confirm_entered.wait()
        state, slow_id = order_state(redis_sync, "slow-1")
        assert state == "p"
        assert redis_sync.exists(binding_key(slow_id)) == 1
        assert keys_matching(redis_sync, "np:rt:*") == []  # routes never outlive the create's deadline

        retry = await BindingCreator(d.store, d.allocation(), d.settings, SystemClock()).create(spec("slow-1"))
        retry_id = retry.record.binding_id
        assert retry_id != slow_id
        assert redis_sync.exists(binding_key(slow_id)) == 0

        gate.set()
        with pytest.raises(Aborted, match="retry"):
            await slow
        assert order_state(redis_sync, "slow-1") == ("d", retry_id)
        assert record_ids(redis_sync) == [retry_id]
        assert_route_lives_until_expiry(redis_sync, retry.record)
        assert await in_use(s) == 1
        assert pending_ids(redis_sync) == []
        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=retry_id, tenant_id="t1"))
        assert got.binding.state == common_pb2.BINDING_STATE_ACTIVE


@pytest.mark.parametrize("step", CREATE_STEPS)
async def test_a_failure_at_each_step_leaves_the_binding_or_nothing(
    step: str, services: Any, domain_parts: Any, redis_sync: Any
) -> None:
    """An error before step `step` (the saga's StepHook): before the commit, nothing of the create is left and the
    number is free; at "complete" (after the commit) the create completes itself and answers OK."""

    async def fail_at(name: str) -> None:
        if name == step:
            raise Unavailable(f"injected before {name}")

    async with services() as s, domain_parts(s) as d:
        creator = BindingCreator(d.store, d.allocation(), d.settings, SystemClock(), fail_at)
        if step == "complete":
            created = await creator.create(spec("step-1"))
            assert order_state(redis_sync, "step-1") == ("d", created.record.binding_id)
            assert_route_lives_until_expiry(redis_sync, created.record)
            assert await in_use(s) == 1
        else:
            with pytest.raises(Unavailable, match="injected"):
                await creator.create(spec("step-1"))
            assert keys_matching(redis_sync, "np:rt:*") == []
            assert keys_matching(redis_sync, "np:ord:*") == []
            assert record_ids(redis_sync) == []
            assert non_empty(redis_sync, "np:tl:*") == [] and non_empty(redis_sync, "np:nh:*") == []
            assert await in_use(s) == 0
        assert pending_ids(redis_sync) == []


async def test_a_claim_whose_pending_entry_cannot_be_written_gives_the_order_up_at_once(
    services: Any, domain_parts: Any, redis_sync: Any
) -> None:
    """The claim and the pending-creates entry go in one round trip; the entry fails for real (a WRONGTYPE key
    planted at every shard): the create claimed the order, but the recovery could not find it, so it gives the order
    up before answering; nothing reserved, and the same order creates once the keys are fixed."""
    async with services() as s, domain_parts(s) as d:
        planted = [pending_creates_key(shard) for shard in range(TENANT_SHARDS)]
        for key in planted:
            redis_sync.set(key, "not a zset")
        creator = BindingCreator(d.store, d.allocation(), d.settings, SystemClock())
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await creator.create(spec("entry-1"))
        assert keys_matching(redis_sync, "np:ord:{*") == []
        assert record_ids(redis_sync) == [] and await in_use(s) == 0
        redis_sync.delete(*planted)
        created = await creator.create(spec("entry-1"))
        assert order_state(redis_sync, "entry-1") == ("d", created.record.binding_id)


async def test_a_completion_whose_routes_did_not_land_is_completed_by_the_recovery(
    services: Any, domain_parts: Any, redis_sync: Any
) -> None:
    """The complete step writes the routes (until the expiry) and the record's commit mark in one round trip, and
    takes the create off the pending-creates list only after both landed. When the mark landed but the routes did
    not (they still lapse at the create's deadline), the entry leads the recovery to it: it writes them again."""
    async with services() as s, domain_parts(s) as d:
        creator = BindingCreator(d.store, d.allocation(), d.settings, SystemClock())
        created = (await creator.create(spec("half-1"))).record
        deadline = SystemClock().now_ms() + 500
        for party in (A, B):  # the routes as the write step left them: lapsing at the create's deadline
            redis_sync.pexpireat(caller_key(created.virtual_number, party), deadline)
        redis_sync.zadd(pending_creates_key(tenant_shard(created.binding_id)), {created.binding_id: deadline})
        assert redis_sync.hget(binding_key(created.binding_id), "st") == b"a"
        assert await creator.recover_overdue(margin_ms=-60_000) == {"completed": 1}
        assert_route_lives_until_expiry(redis_sync, created)
        assert pending_ids(redis_sync) == []


def updater(d: Any, *, store: Any = None, allocation: AllocationClient | None = None) -> BindingUpdater:
    return BindingUpdater(
        store or d.store, BindingReads(d.store), allocation or d.allocation(), d.settings, SystemClock()
    )


async def test_a_failed_record_write_gives_the_new_party_back_at_allocation(
    services: Any, domain_parts: Any, redis_sync: Any
) -> None:
    """ReplaceParty ran before the record write failed: it is reversed, so record, routes and allocation still
    agree on the old party B, and the same change succeeds later."""
    async with services() as s, domain_parts(s) as d:
        created = (await s.binding.CreateBinding(create_request("upd-1"))).binding
        x, binding_id = created.virtual_number, created.binding_id
        failing = updater(d, store=replace(d.store, records=RecordUpdateFails(d.redis, d.settings.retention_ms)))
        change = UpdateSpec(binding_id, "t1", frozenset({"party_b"}), 0, B2, RESTRICTION_NONE, False)
        with pytest.raises(RedisConnectionError):
            await failing.update(change)
        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=binding_id, tenant_id="t1"))
        assert got.binding.party_b == B
        assert routed_binding(redis_sync, x, B) == binding_id and routed_binding(redis_sync, x, B2) is None
        assert redis_sync.exists(mutation_lock_key(binding_id)) == 0
        # Allocation holds B on the reservation again: ReplaceParty(B -> B2) would be refused otherwise.
        stored = await updater(d).update(change)
        assert stored.record.party_b == B2
        assert routed_binding(redis_sync, x, B2) == binding_id and routed_binding(redis_sync, x, B) is None


async def test_a_delete_whose_cancel_fails_is_finished_by_a_repeated_delete(
    services: Any, domain_parts: Any, redis_sync: Any
) -> None:
    """Routes go and the record says deleted before CancelReservation fails; a repeated delete gives the number
    back and returns the binding as the first delete left it."""
    async with services() as s, domain_parts(s) as d:
        created = (await s.binding.CreateBinding(create_request("del-1"))).binding
        x, binding_id = created.virtual_number, created.binding_id
        deleting = updater(d, allocation=FaultyAllocation(d.allocation(), cancel_failures=1))
        with pytest.raises(Unavailable, match="CancelReservation"):
            await deleting.delete(binding_id, "t1")
        assert routed_binding(redis_sync, x, A) is None and routed_binding(redis_sync, x, B) is None
        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=binding_id, tenant_id="t1"))
        assert got.binding.state == common_pb2.BINDING_STATE_DELETED
        assert await in_use(s) == 1

        again = await deleting.delete(binding_id, "t1")
        assert again.record.delete_ms == got.binding.delete_time.ToMilliseconds()
        assert await in_use(s) == 0
