"""The create saga: an idempotent CreateBinding over keys in different slots and a number from allocation.

Write order of a create (each step's keys live in their own slots; the commands of one step are sent together, one
round trip; docs/binding.md has the failure analysis):
 1. claim: the order key `np:ord:{tenant:order}` claimed (pending, deadline D = now + create lease) and the create
    put on the pending-creates list (which must hold it before its record exists, not before its claim)
 2. AllocateNumber over gRPC: its reservation lapses at D unless confirmed
 3. write: record (pending, with the request), tenant index, and the number's route keys expiring at D with the
    binding's entry in the number's history (one script: the same slot); translation can connect from here on,
    until D at most
 4. ConfirmReservation until the binding's expiry
 5. commit: order key done (only while the claim is still this create's): THE COMMIT POINT
 6. complete: routes until the binding's expiry and the record committed (one round trip), then off the
    pending-creates list (once both landed)
Before 5 nothing lasts beyond D but a confirmed reservation (step 4), which the roll-back cancels. The one place
that decides a create that did not finish is its order key: the commit (p -> d) or an abort (p -> deleted, by
order_resolve.lua or a take-over in order_claim.lua), each atomic, so a create is rolled forward or back, never
both. A create that fails resolves itself (roll forward when the commit landed, else abort and roll back); what a
crash or an unreachable Redis leaves is resolved by the next create of the order or by the recovery of any binding
process (recover_overdue, from the pending-creates list) once D has passed.

A create works within its call's budget (the caller's deadline, deadline.py): D is at most that budget plus
DEADLINE_GRACE_MS after the claim, the steps run until a reserve before the budget ends, and a failure is resolved
within what is left; a resolution that cannot finish in time (Redis slow or down) goes on in the background and
the create answers UNAVAILABLE: its outcome is then decided by that resolution, a retry or the recovery.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from numprotect.core.binding_records import BindingRecord
from numprotect.core.clock import Clock
from numprotect.core.errors import Aborted, AlreadyExists, Unavailable
from numprotect.core.phone import mask
from numprotect.core.telemetry import set_span_attributes
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.counts import BindingCounts
from numprotect.services.binding.deadline import CallBudget
from numprotect.services.binding.settings import BindingSettings
from numprotect.services.binding.store import (
    BindingStore,
    Claim,
    legacy_fingerprint,
    new_binding_id,
    request_fingerprint,
)
from numprotect.services.binding.validation import MODES, CreateSpec

log = logging.getLogger(__name__)

# How long the record of an uncommitted create is kept: long enough for a retry or the recovery to find and roll
# back what a crashed create left (its reservation), short enough that abandoned creates leave no lasting garbage.
PENDING_KEEP_MS = 86_400_000
# Called with each step's name before it runs (settings.CREATE_STEPS, the rows of docs/binding.md's failure
# table): tests inject a failure at one step (NUMPROTECT_BINDING_FAILPOINT).
StepHook = Callable[[str], Awaitable[None]]
# The request fields a repeated create must repeat, in the order of the canonical request (the record's `rq`).
REQUEST_FIELDS = (
    "mode",
    "party_a",
    "party_b",
    "ttl",
    "city_code",
    "strict_city",
    "call_restriction",
    "recording_enabled",
    "allow_any_caller",
)
_PARTIES = ("party_a", "party_b")
# How long a repeated create or a read waits for the binding's lock to complete a committed create.
_COMPLETE_WAIT_SECONDS = 2.0
# D, the create's deadline, lies this long after its budget ends (at most the create lease after the claim): a
# duplicate or a retry takes the order over from a create that failed soon after it answered.
DEADLINE_GRACE_MS = 1000
# Of a create's budget, kept back to resolve a failed step before answering (at most 0.5 s; Redis down, it would
# not finish anyway).
_RESOLVE_SHARE = 0.25
_RESOLVE_RESERVE_MAX_SECONDS = 0.5


async def _no_hook(step: str) -> None:
    return None


def canonical_request(spec: CreateSpec) -> str:
    """The request fields a repeated create must repeat, as one string (REQUEST_FIELDS order)."""
    flag = {True: "1", False: "0"}
    return "|".join(
        (
            str(spec.mode),
            spec.party_a,
            spec.party_b,
            str(spec.ttl_ms),
            spec.city_code,
            flag[spec.strict_city],
            str(spec.call_restriction),
            flag[spec.recording_enabled],
            flag[spec.allow_any_caller],
        )
    )


def _shown(field: str, value: str) -> str:
    if field in _PARTIES:
        return mask(value)
    if field == "ttl":
        return f"{int(value) / 1000:g}s"
    return value


class OrderRequestMismatch(AlreadyExists):
    """ALREADY_EXISTS: the order id (the idempotency key) names a binding created from another request. Details:
    ResourceInfo (the binding), ErrorInfo reason ORDER_REQUEST_MISMATCH with metadata `fields` (comma-separated),
    and a BadRequest naming each differing field with the first request's value (parties masked)."""

    def __init__(self, out_order_id: str, binding_id: str, differing: list[tuple[str, str]]) -> None:
        names = [field for field, _ in differing]
        super().__init__(
            f"order {out_order_id} was created with other values (binding {binding_id}); differing: "
            + ", ".join(names),
            resource_type="binding",
            resource_name=binding_id,
        )
        self.differing = differing

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason="ORDER_REQUEST_MISMATCH",
            domain="numprotect",
            metadata={"fields": ",".join(field for field, _ in self.differing), "binding_id": self.resource_name},
        )
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in self.differing
            ]
        )
        packed = []
        for message in (info, bad):
            holder = any_pb2.Any()
            holder.Pack(message)
            packed.append(holder)
        return [*super().details(), *packed]


def differing_fields(first: str, repeat: str) -> list[tuple[str, str]]:
    """(field, description) for each field in which two canonical requests differ."""
    return [
        (field, f"differs from the order's first request ({_shown(field, old)})")
        for field, old, new in zip(REQUEST_FIELDS, first.split("|"), repeat.split("|"), strict=True)
        if old != new
    ]


@dataclass(frozen=True)
class Created:
    """The binding a create returns: the new one, or the one a repeated create of the order finds."""

    record: BindingRecord
    city_fallback: bool


@dataclass(frozen=True)
class _Attempt:
    """One create's identity in the saga: its binding id, the request's fingerprint and its claim's times."""

    spec: CreateSpec
    request: str
    binding_id: str
    fp: str
    create_ms: int
    deadline_ms: int
    expire_ms: int


class BindingCreator:
    """Runs CreateBinding: claim, reserve, write, commit, complete; resolves creates that did not finish."""

    def __init__(
        self,
        store: BindingStore,
        allocation: AllocationClient,
        settings: BindingSettings,
        clock: Clock,
        step_hook: StepHook | None = None,
        *,
        counts: BindingCounts | None = None,
    ) -> None:
        self.store = store
        self.allocation = allocation
        self.settings = settings
        self.clock = clock
        self.step = step_hook or _no_hook
        # numprotect_bindings_created: counted where a create completes (pending -> committed), once per binding.
        self.counts = counts or BindingCounts.uncounted()
        # Resolutions of failed creates that outlived their call (held so they are not garbage-collected).
        self._resolving: set[asyncio.Task[bool]] = set()

    async def create(self, spec: CreateSpec, budget: CallBudget | None = None) -> Created:
        """The binding of the order (new or existing); UNAVAILABLE past the `budget` (default: the create lease)."""
        budget = budget or CallBudget.within(self.settings.create_lease_seconds)
        reserve = min(_RESOLVE_RESERVE_MAX_SECONDS, budget.remaining() * _RESOLVE_SHARE)
        async with budget.bound("CreateBinding", reserve=reserve):
            attempt = await self._claim(spec, budget, reserve)
        if isinstance(attempt, Created):
            return attempt
        return await self._write(attempt, budget, reserve)

    async def _claim(self, spec: CreateSpec, budget: CallBudget, reserve: float) -> _Attempt | Created:
        """Steps 1: the order claimed for a new attempt, or the binding a repeated create of the order finds."""
        request = canonical_request(spec)
        fp = request_fingerprint(request)
        legacy_fp = legacy_fingerprint(spec.mode, spec.party_a, spec.party_b)
        set_span_attributes(tenant=spec.tenant_id, mode=MODES[spec.mode], out_order_id=spec.out_order_id)
        orders = self.store.orders
        # Gives up a little before the call's bound would cut it, so the answer names why (ORDER_CREATE_IN_PROGRESS).
        give_up = time.monotonic() + min(self.settings.create_lease_seconds + 1.0, budget.remaining() - reserve - 0.05)
        binding_id = new_binding_id(self.clock.now_ms())
        while True:
            create_ms = self.clock.now_ms()
            attempt = _Attempt(
                spec=spec,
                request=request,
                binding_id=binding_id,
                fp=fp,
                create_ms=create_ms,
                deadline_ms=create_ms + min(self.settings.create_lease_ms, budget.remaining_ms() + DEADLINE_GRACE_MS),
                expire_ms=create_ms + spec.ttl_ms,
            )
            await self.step("claim")
            claim = await orders.claim(
                spec.tenant_id,
                spec.out_order_id,
                binding_id,
                fp,
                attempt.deadline_ms,
                attempt.expire_ms + self.settings.retention_ms,
                legacy_fp=legacy_fp,
                listed=True,  # on the pending-creates list, in the same round trip
            )
            if claim.outcome == "claimed":
                break
            if claim.outcome == "taken":
                # A create of this order crashed or got stuck past its deadline; the claim script took the order
                # from it, so it can no longer commit: roll it back (on failure the recovery does, from its entry in
                # the pending-creates list; nothing of it outlives its deadline but a confirmed reservation).
                log.warning("rolling back an abandoned create", extra={"binding_id": claim.binding_id})
                await self._roll_back_abandoned(claim.binding_id)
                break
            if claim.outcome in ("done", "conflict"):
                # (The pending-creates entry the claim step added for this create goes in the lookup's round trip.)
                existing = await self._existing(claim, attempt, budget)
                if existing is None and claim.outcome == "conflict":
                    # The record went a moment before its order key (both expire at end + retention).
                    raise AlreadyExists(
                        f"order {spec.out_order_id} was created with other values; its record has just expired",
                        resource_type="binding",
                        resource_name=claim.binding_id,
                    )
                if existing is None:
                    # The order's binding is past its retention: the order id is free to serve again.
                    await orders.forget(spec.tenant_id, spec.out_order_id, claim.binding_id, (fp, legacy_fp))
                    continue
                set_span_attributes(binding_id=claim.binding_id, idempotency="repeat")
                return existing
            # busy: a create of the same order runs; wait for its outcome (then done, conflict, or ours to take).
            if time.monotonic() > give_up:
                # (The entry the claim step added for this create is left to the recovery: no record, it goes.)
                # The earlier call's outcome is not known yet (e.g. its roll-back waits for Redis to take writes
                # again): the same answer as that call got, so a careful client just retries the same request.
                raise Unavailable(
                    f"order {spec.out_order_id} is being created by an earlier call whose outcome is not known yet; "
                    "retry the same request",
                    reason="ORDER_CREATE_IN_PROGRESS",
                )
            await asyncio.sleep(0.005 + random.random() * 0.02)
        set_span_attributes(binding_id=binding_id, idempotency=claim.outcome)
        return attempt

    async def _existing(self, claim: Claim, attempt: _Attempt, budget: CallBudget) -> Created | None:
        """The binding a done order names (completed if its create did not finish), None when its record is past
        retention; ALREADY_EXISTS naming the differing fields when the order was created from another request."""
        spec = attempt.spec
        stored, first = await self.store.order_and_request(claim.binding_id, attempt.binding_id)
        if stored is None:
            return None
        if claim.outcome == "conflict":
            if first is not None:
                differing = differing_fields(first, attempt.request)
            else:  # a record of before version 2, whose order compared mode and parties only
                record = stored.record
                first_values = (str(record.mode), record.party_a, stored.party_b_at(record.create_ms))
                repeat_values = (str(spec.mode), spec.party_a, spec.party_b)
                differing = [
                    (field, f"differs from the order's first request ({_shown(field, old)})")
                    for field, old, new in zip(REQUEST_FIELDS[:3], first_values, repeat_values, strict=True)
                    if old != new
                ]
            raise OrderRequestMismatch(spec.out_order_id, claim.binding_id, differing)
        if stored.pending:
            # Committed, but its create did not complete (crashed, or Redis failed after the commit): complete it.
            async with self.store.locks.hold(claim.binding_id, wait_seconds=_COMPLETE_WAIT_SECONDS, budget=budget):
                stored = await self.store.get(claim.binding_id) or stored
                if stored.pending:
                    await self.store.complete(stored.record)
                    self.counts.created[stored.record.mode].inc()  # its own create failed after the commit
        return Created(stored.record, stored.city_fallback)

    async def _write(self, attempt: _Attempt, budget: CallBudget, reserve: float) -> Created:
        """Steps 2-7 of the saga for a claimed order, until `reserve` before the budget ends; on a failure, resolves
        the create within the budget and re-raises (or returns the binding when the commit turns out to have landed
        and the create could be completed)."""
        spec, binding_id = attempt.spec, attempt.binding_id
        store = self.store
        parties = [spec.party_a, spec.party_b] if spec.party_b else [spec.party_a]
        reservation_id = ""
        record: BindingRecord | None = None
        record_ours = True
        city_fallback = False
        try:
            async with budget.bound("CreateBinding", reserve=reserve):
                await self.step("allocate")
                # The reservation lapses when the create's deadline passes (its routes do too), never later.
                lease_ms = attempt.deadline_ms - self.clock.now_ms()
                if lease_ms < 100:
                    raise Aborted(
                        f"order {spec.out_order_id}: the create lease passed before a number was reserved; retry"
                    )
                allocation = await self.allocation.allocate(
                    spec.tenant_id, spec.mode, parties, spec.city_code, spec.strict_city, lease_ms
                )
                reservation_id = allocation.reservation_id
                city_fallback = allocation.city_fallback
                record = BindingRecord(
                    binding_id=binding_id,
                    tenant_id=spec.tenant_id,
                    out_order_id=spec.out_order_id,
                    mode=spec.mode,
                    party_a=spec.party_a,
                    party_b=spec.party_b,
                    virtual_number=allocation.virtual_number,
                    extension=allocation.extension,
                    city_code=allocation.city_code,
                    call_restriction=spec.call_restriction,
                    recording_enabled=spec.recording_enabled,
                    allow_any_caller=spec.allow_any_caller,
                    user_consent=True,
                    create_ms=attempt.create_ms,
                    expire_ms=attempt.expire_ms,
                    update_ms=attempt.create_ms,
                    delete_ms=0,
                )
                await self.step("write")
                # The record, its routes (lapsing at D) with its number history, and the tenant index in one round
                # trip: its pending-creates entry, written with the claim, leads the recovery to all of them.
                if not await store.write_pending(
                    record,
                    reservation_id=reservation_id,
                    city_fallback=allocation.city_fallback,
                    keep_until_ms=attempt.deadline_ms + PENDING_KEEP_MS,
                    request=attempt.request,
                    routes_until_ms=min(attempt.deadline_ms, allocation.lease_expire_ms),
                ):
                    record_ours = False  # the roll-back removes what this create wrote beside it, not the record
                    raise Aborted(f"binding id {binding_id} exists already; retry")
                await self.step("confirm")
                await self.allocation.confirm(reservation_id, binding_id, attempt.expire_ms)
                await self.step("commit")
                if not await store.orders.commit(
                    spec.tenant_id,
                    spec.out_order_id,
                    binding_id,
                    attempt.fp,
                    attempt.deadline_ms,
                    attempt.expire_ms + self.settings.retention_ms,
                ):
                    raise Aborted(f"order {spec.out_order_id} took longer than its lease and was taken over; retry")
                await self.step("complete")
                await store.complete(record)
        except BaseException as exc:
            log.warning(
                "create failed midway, resolving it",
                extra={"binding_id": binding_id, "error": repr(exc), "tenant_id": spec.tenant_id},
            )
            completed = await self._resolve_within(
                budget, self._resolve_own(attempt, reservation_id, record, record_ours=record_ours)
            )
            if not completed or record is None or not isinstance(exc, Exception):
                raise
        self.counts.created[spec.mode].inc()
        log.info(
            "binding created",
            extra={
                "binding_id": binding_id,
                "tenant_id": spec.tenant_id,
                "virtual_number": record.virtual_number,
                "party_a": mask(spec.party_a),
                "party_b": mask(spec.party_b),
            },
        )
        return Created(record, city_fallback)

    async def _resolve_within(self, budget: CallBudget, resolution: Awaitable[bool]) -> bool:
        """The resolution's answer if it finishes within the budget; else False, and it goes on in the background
        (not cancelled with the call either)."""
        task = asyncio.ensure_future(resolution)
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)
        done, _ = await asyncio.wait({task}, timeout=budget.remaining())
        if not done:
            log.warning("a failed create is still being resolved when its call ends; it goes on in the background")
            return False
        return task.result()

    async def _resolve_own(
        self, attempt: _Attempt, reservation_id: str, record: BindingRecord | None, *, record_ours: bool = True
    ) -> bool:
        """After a failure: True when the create committed and is now complete; otherwise it is rolled back, or,
        when its order key cannot be read, left as it is (its routes and an unconfirmed reservation lapse at the
        deadline; the recovery or a retry resolves the rest). `record`: the record the create wrote, or was writing;
        `record_ours` False when a record of its id existed (another's: left alone). Never raises."""
        spec, binding_id = attempt.spec, attempt.binding_id
        try:
            outcome = await self.store.orders.resolve(spec.tenant_id, spec.out_order_id, binding_id, own=True)
        except Exception as exc:
            log.warning("outcome of a failed create unknown, left to recovery", extra={"error": repr(exc)})
            return False
        if outcome == "done":
            if record is None or not record_ours:
                return False
            try:
                await self.store.complete(record)
            except Exception as exc:
                log.warning("a committed create could not be completed, left to recovery", extra={"error": repr(exc)})
                return False
            return True
        await self._roll_back(binding_id, record, reservation_id, record_ours=record_ours)
        return False

    async def _roll_back(
        self, binding_id: str, record: BindingRecord | None, reservation_id: str, *, record_ours: bool = True
    ) -> None:
        """Removes what an aborted create wrote (its order is no longer its own, so it never commits). Best effort,
        the routes and the reservation side by side; the pending-creates entry goes only when nothing is left, so
        recovery retries. `record` None: nothing was written but the claim and the entry; `record_ours` False: a
        record of the id existed (another's): what this create wrote beside it goes, the record and index stay."""
        store = self.store
        undo: list[Awaitable[object]] = []
        if record is not None:
            undo.append(store.remove_written(record, indexed=record_ours))
        if reservation_id:
            undo.append(self.allocation.cancel(reservation_id, "binding create failed"))
        failed: list[BaseException] = []
        left: list[BaseException] = []  # entries without a record, which every reader ignores: no need to retry
        for result in await asyncio.gather(*undo, return_exceptions=True):
            if isinstance(result, BaseException):
                failed.append(result)
            elif isinstance(result, list):
                left.extend(result)
        if not failed:
            # The record goes last: it names the reservation, the way back to it while undoing may still fail.
            try:
                if record is not None and record_ours:
                    await store.records.discard(binding_id)
                await store.pending.remove(binding_id)
            except Exception as exc:
                failed.append(exc)
        for result in failed + left:
            log.error("rolling back a create left something behind", extra={"error": repr(result)})

    async def _roll_back_abandoned(self, binding_id: str) -> None:
        """Rolls back a create whose claim was taken from it (pending record: routes, reservation, entries)."""
        try:
            stored = await self.store.get(binding_id)
        except Exception as exc:
            log.warning("could not read an abandoned create, left to recovery", extra={"error": repr(exc)})
            return
        if stored is None:
            await self._roll_back(binding_id, None, "")
        elif stored.pending:
            await self._roll_back(binding_id, stored.record, stored.reservation_id)

    async def resolve_abandoned(self, binding_id: str) -> str:
        """Resolves a create on the pending-creates list whose deadline has passed: "completed", "rolled back",
        "busy" (its order says it may still run, or another call holds the binding), or "gone" (nothing left)."""
        store = self.store
        stored = await store.get(binding_id)
        if stored is None:
            # No record: rolled back but for this entry, never written, or a claim that was not this create's.
            await store.pending.remove(binding_id)
            return "gone"
        record = stored.record
        if stored.pending:
            outcome = await store.orders.resolve(record.tenant_id, record.out_order_id, binding_id, own=False)
            if outcome == "busy":
                return "busy"
            if outcome != "done":
                await self._roll_back(binding_id, record, stored.reservation_id)
                return "rolled back"
        # Committed. Marked so, yet on the list: the completion's routes, written beside that mark, may not have
        # landed (or only its removal from the list failed): complete it again, routes included.
        try:
            async with store.locks.hold(binding_id):
                current = await store.get(binding_id)
                if current is None:
                    await store.pending.remove(binding_id)
                    return "gone"
                await store.complete(current.record)
                if current.pending:  # committed, never completed: its create call failed, so it was not counted
                    self.counts.created[current.record.mode].inc()
        except Aborted:
            return "busy"
        return "completed"

    async def recover_overdue(self, margin_ms: int, per_shard: int = 64) -> dict[str, int]:
        """Resolves the pending creates whose deadline passed more than `margin_ms` ago; counts by outcome."""
        counts: dict[str, int] = {}
        for binding_id in await self.store.pending.overdue(self.clock.now_ms() - margin_ms, per_shard):
            try:
                outcome = await self.resolve_abandoned(binding_id)
            except Exception as exc:
                log.warning(
                    "could not resolve an abandoned create", extra={"binding_id": binding_id, "error": repr(exc)}
                )
                outcome = "failed"
            counts[outcome] = counts.get(outcome, 0) + 1
        if counts.get("completed") or counts.get("rolled back"):
            log.warning("resolved abandoned creates", extra=counts)
        return counts
