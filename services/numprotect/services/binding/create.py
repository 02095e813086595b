"""The create saga: an idempotent CreateBinding over keys in different slots and a number from allocation.

Write order of a create (each step's keys live in their own slot; see docs/binding.md for the failure analysis):
 1. claim the order key `np:ord:{tenant:order}` (pending, with a deadline = now + create lease)
 2. AllocateNumber over gRPC (its reservation lapses after the same lease unless confirmed)
 3. record (status pending) + per-number history + tenant index, concurrently
 4. route keys (PXAT expiry): translation can connect from here on
 5. ConfirmReservation (the reservation now lasts until the binding's expiry)
 6. record status committed (kept from now on for end + retention; a pending one lives a day at most)
 7. order key done (guarded: only while the claim is still ours) -- the commit point
A failure in 2-7 undoes everything written (routes, reservation, record, history, index, claim) and the error
is returned; a crash leaves a pending claim whose deadline passes, after which a repeated create cleans up what
the crashed one left and then takes the order over.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from numprotect.core.binding_records import BindingRecord
from numprotect.core.clock import Clock
from numprotect.core.errors import Aborted, AlreadyExists
from numprotect.core.phone import mask
from numprotect.core.telemetry import set_span_attributes
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.concurrency import gather_all
from numprotect.services.binding.settings import BindingSettings
from numprotect.services.binding.store import BindingStore, Claim, fingerprint, new_binding_id
from numprotect.services.binding.validation import MODES, CreateSpec

log = logging.getLogger(__name__)

# How long the record of an uncommitted create is kept: long enough for a retry to find and clean up what a
# crashed create left (routes, reservation), short enough that abandoned creates leave no lasting garbage.
PENDING_KEEP_MS = 86_400_000


@dataclass(frozen=True)
class Created:
    """The binding a create returns: the new one, or the one a repeated create of the order finds."""

    record: BindingRecord
    city_fallback: bool


@dataclass(frozen=True)
class _Attempt:
    """One create's identity in the saga: its binding id, the order's fingerprint and its claim's times."""

    spec: CreateSpec
    binding_id: str
    fp: str
    create_ms: int
    deadline_ms: int
    expire_ms: int


class BindingCreator:
    """Runs CreateBinding: claim, reserve, write, commit; undoes a failed create; cleans up abandoned ones."""

    def __init__(
        self,
        store: BindingStore,
        allocation: AllocationClient,
        settings: BindingSettings,
        clock: Clock,
    ) -> None:
        self.store = store
        self.allocation = allocation
        self.settings = settings
        self.clock = clock

    async def create(self, spec: CreateSpec) -> Created:
        fp = fingerprint(spec.mode, spec.party_a, spec.party_b)
        set_span_attributes(tenant=spec.tenant_id, mode=MODES[spec.mode], out_order_id=spec.out_order_id)
        orders = self.store.orders
        retention_ms = self.settings.retention_ms
        give_up = time.monotonic() + self.settings.create_lease_seconds + 1.0
        binding_id = new_binding_id(self.clock.now_ms())
        cleaned = ""
        while True:
            create_ms = self.clock.now_ms()
            attempt = _Attempt(
                spec=spec,
                binding_id=binding_id,
                fp=fp,
                create_ms=create_ms,
                deadline_ms=create_ms + self.settings.create_lease_ms,
                expire_ms=create_ms + spec.ttl_ms,
            )
            claim = await orders.claim(
                spec.tenant_id,
                spec.out_order_id,
                binding_id,
                fp,
                attempt.deadline_ms,
                attempt.expire_ms + retention_ms,
                cleaned=cleaned,
            )
            if claim.outcome in ("claimed", "taken"):
                break
            if claim.outcome == "stale":
                # A create of this order crashed or got stuck past its deadline: remove what it left (a failure
                # here leaves its claim as it was, so the next retry cleans again), then take the order over.
                log.warning("cleaning up an abandoned create", extra={"binding_id": claim.binding_id})
                await self._clean_abandoned(claim.binding_id)
                cleaned = claim.binding_id
                continue
            if claim.outcome == "done":
                existing = await self._existing(claim)
                if existing is None:
                    # The order's binding is past its retention: the order id is free to serve again.
                    await orders.forget(spec.tenant_id, spec.out_order_id, claim.binding_id, fp)
                    continue
                set_span_attributes(binding_id=claim.binding_id, idempotency="repeat")
                return existing
            if claim.outcome == "conflict":
                raise AlreadyExists(
                    f"order {spec.out_order_id} of tenant {spec.tenant_id} is bound to other parties",
                    resource_type="binding",
                    resource_name=claim.binding_id,
                )
            # busy: a concurrent create of the same order is running; wait for its outcome.
            if time.monotonic() > give_up:
                raise Aborted(f"order {spec.out_order_id} is being created by another call; retry")
            await asyncio.sleep(0.005 + random.random() * 0.02)
        set_span_attributes(binding_id=binding_id, idempotency=claim.outcome)
        return await self._write(attempt)

    async def _existing(self, claim: Claim) -> Created | None:
        """The binding a done order names, or None when its record is past retention."""
        stored = await self.store.get(claim.binding_id)
        if stored is None:
            return None
        if stored.pending:
            # Committed records are activated before the commit; this completes one written by an older version.
            await self.store.records.activate(claim.binding_id, stored.record.end_ms())
        return Created(stored.record, stored.city_fallback)

    async def _write(self, attempt: _Attempt) -> Created:
        """Steps 2-7 of the saga for a claimed order; on any failure, undoes what was written and re-raises."""
        spec, binding_id = attempt.spec, attempt.binding_id
        store = self.store
        parties = [spec.party_a, spec.party_b] if spec.party_b else [spec.party_a]
        reservation_id = ""
        record: BindingRecord | None = None
        try:
            allocation = await self.allocation.allocate(
                spec.tenant_id, spec.mode, parties, spec.city_code, spec.strict_city, self.settings.create_lease_ms
            )
            reservation_id = allocation.reservation_id
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
            created, *_ = await gather_all(
                (
                    store.records.create(
                        record,
                        reservation_id=reservation_id,
                        city_fallback=allocation.city_fallback,
                        keep_until_ms=attempt.deadline_ms + PENDING_KEEP_MS,
                    ),
                    store.records.add_to_history(record.virtual_number, binding_id, attempt.expire_ms),
                    store.tenants.add(spec.tenant_id, binding_id, attempt.create_ms),
                )
            )
            if not created:
                record = None  # not ours: the undo must not touch it
                raise Aborted(f"binding id {binding_id} exists already; retry")
            await store.put_routes(record)
            await self.allocation.confirm(reservation_id, binding_id, attempt.expire_ms)
            # The record first (committed, kept for end + retention), then the order: the commit point. A record
            # activated without a commit is undone below, or by the create that takes a stale claim over.
            await store.records.activate(binding_id, attempt.expire_ms)
            if not await store.orders.commit(
                spec.tenant_id,
                spec.out_order_id,
                binding_id,
                attempt.fp,
                attempt.deadline_ms,
                attempt.expire_ms + self.settings.retention_ms,
            ):
                raise Aborted(f"order {spec.out_order_id} took longer than its lease and was taken over; retry")
        except BaseException as exc:
            log.warning(
                "create failed midway, undoing it",
                extra={"binding_id": binding_id, "error": repr(exc), "tenant_id": spec.tenant_id},
            )
            await asyncio.shield(self._undo(attempt, reservation_id, record))
            raise
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
        return Created(record, allocation.city_fallback)

    async def _undo(self, attempt: _Attempt, reservation_id: str, record: BindingRecord | None) -> None:
        """Best effort, every step independent: nothing of a failed create may stay reserved or written."""
        spec, binding_id, store = attempt.spec, attempt.binding_id, self.store
        try:
            if await store.orders.committed_binding(spec.tenant_id, spec.out_order_id) == binding_id:
                return  # the commit reached Redis though its reply did not reach us: the binding exists
        except Exception as exc:
            log.warning("could not read the order key while undoing a create", extra={"error": repr(exc)})
        essential: list[Awaitable[Any]] = []
        if record is not None:
            essential.append(store.remove_routes(record))
        if reservation_id:
            essential.append(self.allocation.cancel(reservation_id, "binding create failed"))
        tidy: list[Awaitable[Any]] = []
        if record is not None:  # (None: nothing of this binding was written, or the id was another's)
            tidy.append(store.tenants.remove(spec.tenant_id, [binding_id]))
            tidy.append(store.records.remove_from_history(record.virtual_number, binding_id))
        results = await asyncio.gather(*essential, return_exceptions=True)
        # The record goes only once routes and reservation are gone: it names the reservation, the way back to
        # it if undoing failed now. Index and history entries without a record are ignored by every reader.
        if record is not None and not any(isinstance(r, BaseException) for r in results):
            tidy.append(store.records.discard(binding_id))
        tidy.append(
            store.orders.release(spec.tenant_id, spec.out_order_id, binding_id, attempt.fp, attempt.deadline_ms)
        )
        results += await asyncio.gather(*tidy, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("undoing a failed create left something behind", extra={"error": repr(result)})

    async def _clean_abandoned(self, binding_id: str) -> None:
        """Removes what a crashed or stuck create of the same order wrote (its claim is ours now)."""
        store = self.store
        stored = await store.get(binding_id)
        if stored is None:
            return
        record = stored.record
        await gather_all(
            (
                store.remove_routes(record),
                self.allocation.cancel(stored.reservation_id, "binding create abandoned"),
                store.records.remove_from_history(record.virtual_number, binding_id),
                store.tenants.remove(record.tenant_id, [binding_id]),
            )
        )
        await store.records.discard(binding_id)
