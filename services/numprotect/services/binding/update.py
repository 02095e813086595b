"""Changes to an existing binding, one at a time per binding (a per-binding lock): UpdateBinding and DeleteBinding.

An update widens first (a new party at allocation, a later expiry: harmless if a later step fails), then writes the
record, then the routes, and narrows last (an earlier expiry); repeating it re-puts the routes from the record.
A delete stops calls first (routes), then marks the record, then gives the number back.

Each call works within its budget (the caller's deadline, deadline.py): past it, it answers UNAVAILABLE and
releases the binding's lock (in the background if Redis does not answer), so its retry is not refused ABORTED.
A retried update is idempotent: a party B that allocation took in a failed attempt (noted in the record's `pbh`
before ReplaceParty) is found again, so the retry answers OK instead of FAILED_PRECONDITION.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from numprotect.core.binding_records import BindingEvent, BindingRecord, StoredBinding
from numprotect.core.clock import Clock
from numprotect.core.errors import FailedPrecondition
from numprotect.core.phone import mask
from numprotect.core.redis_batch import raise_first, send_together
from numprotect.core.routes import MODE_AXB, MODE_AXN, caller_key
from numprotect.services.binding.allocation_client import AllocationClient, PartyNotHeld
from numprotect.services.binding.counts import BindingCounts
from numprotect.services.binding.deadline import CallBudget
from numprotect.services.binding.reads import BindingReads, Locked
from numprotect.services.binding.settings import BindingSettings
from numprotect.services.binding.store import HELD_PARTIES_FIELD, BindingStore
from numprotect.services.binding.validation import UpdateSpec, Violations

log = logging.getLogger(__name__)

# Of a call's budget, kept back for releasing the binding's lock after a step ran out of time (at most 0.3 s).
_RELEASE_SHARE = 0.2
_RELEASE_RESERVE_MAX_SECONDS = 0.3
# How long an update or delete waits for a lock another call holds (at most a quarter of its budget): the release
# of a failed attempt's lock runs in the background and, after a Redis outage, can land just after the caller's
# retry arrives; waiting briefly turns that race into an OK instead of ABORTED.
_LOCK_WAIT_SHARE = 0.25
_LOCK_WAIT_MAX_SECONDS = 0.3


class BindingUpdater:
    """Runs UpdateBinding and DeleteBinding of a tenant's committed binding."""

    def __init__(
        self,
        store: BindingStore,
        reads: BindingReads,
        allocation: AllocationClient,
        settings: BindingSettings,
        clock: Clock,
        *,
        counts: BindingCounts | None = None,
    ) -> None:
        self.store = store
        self.reads = reads
        self.allocation = allocation
        self.settings = settings
        self.clock = clock
        self.counts = counts or BindingCounts.uncounted()  # numprotect_bindings_updated, _deleted

    def _budget(self, budget: CallBudget | None) -> CallBudget:
        return budget or CallBudget.within(self.settings.create_lease_seconds)

    @staticmethod
    def _reserve(budget: CallBudget) -> float:
        return min(_RELEASE_RESERVE_MAX_SECONDS, budget.remaining() * _RELEASE_SHARE)

    @staticmethod
    def _lock_wait(budget: CallBudget) -> float:
        return min(_LOCK_WAIT_MAX_SECONDS, budget.remaining() * _LOCK_WAIT_SHARE)

    async def update(self, spec: UpdateSpec, budget: CallBudget | None = None) -> StoredBinding:
        """Applies the masked fields; FAILED_PRECONDITION for a deleted or expired binding. UNAVAILABLE past the
        `budget` (default: the create lease), with the binding's lock released."""
        budget = self._budget(budget)
        # NOT_FOUND for another tenant before any lock, in the step that takes the lock.
        async with (
            budget.bound("UpdateBinding", reserve=self._reserve(budget) / 2),
            self.reads.locked(
                spec.binding_id, spec.tenant_id, wait_seconds=self._lock_wait(budget), budget=budget
            ) as held,
            budget.bound("UpdateBinding", reserve=self._reserve(budget)),
        ):
            stored = held.stored
            record = stored.record
            now = self.clock.now_ms()
            if record.delete_ms:
                raise FailedPrecondition(f"binding {record.binding_id} was deleted", subject=record.binding_id)
            if record.expire_ms <= now:
                raise FailedPrecondition(f"binding {record.binding_id} has expired", subject=record.binding_id)
            updated = self._apply(spec, record, now)
            await self._write(held, updated, now, expiry_asked="expire_time" in spec.paths)
        return replace(stored, record=updated)

    def _apply(self, spec: UpdateSpec, record: BindingRecord, now: int) -> BindingRecord:
        """The record with the masked fields set, or INVALID_ARGUMENT for values the record rules out."""
        v = Violations()
        updated = record
        if "expire_time" in spec.paths:
            latest = record.create_ms + self.settings.max_ttl_ms
            if spec.expire_ms <= now:
                v.add("binding.expire_time", "must be in the future (delete the binding to end it now)")
            elif spec.expire_ms > latest:
                v.add(
                    "binding.expire_time",
                    f"must be at most {self.settings.max_ttl_seconds:g}s after the binding's create_time",
                )
            updated = replace(updated, expire_ms=spec.expire_ms)
        if "party_b" in spec.paths:
            if not spec.party_b and record.mode != MODE_AXN:
                v.add("binding.party_b", "is required")
            elif spec.party_b == record.party_a:
                v.add("binding.party_b", "must differ from party_a")
            updated = replace(updated, party_b=spec.party_b)
        if "call_restriction" in spec.paths:
            updated = replace(updated, call_restriction=spec.call_restriction)
        if "recording_enabled" in spec.paths:
            updated = replace(updated, recording_enabled=spec.recording_enabled)
        v.raise_if_any()
        return replace(updated, update_ms=now)

    async def _write(self, held: Locked, new: BindingRecord, now: int, *, expiry_asked: bool = False) -> None:
        stored = held.stored
        old = stored.record
        store = self.store
        reservation_id = stored.reservation_id
        changes: dict[str, str] = {}
        fields: dict[str, str] = {"ums": str(now)}
        party_changed = new.party_b != old.party_b
        if party_changed:
            changes["b"] = fields["b"] = new.party_b
        if new.expire_ms != old.expire_ms:
            changes["exp"] = fields["ems"] = str(new.expire_ms)
        if new.call_restriction != old.call_restriction:
            changes["r"] = fields["r"] = str(new.call_restriction)
        if new.recording_enabled != old.recording_enabled:
            changes["rec"] = fields["rec"] = "1" if new.recording_enabled else "0"
        replaced = False
        # Widening steps first (harmless if a later step fails), the record, the routes, narrowing steps last.
        if old.mode != MODE_AXN:
            # AXB/AXE: allocation keeps each real number once per X; it refuses a B already on this number.
            replaced = await self._replace_party(stored, new.party_b, held.held_parties)
            if replaced:
                fields[HELD_PARTIES_FIELD] = ""
        if new.expire_ms > old.expire_ms:
            await self.allocation.confirm(reservation_id, old.binding_id, new.expire_ms)
            commands = [
                store.records.history_command(old.virtual_number, old.binding_id, new.expire_ms),
                # The order key lives as long as the record, so the order stays idempotent that long.
                store.orders.extend_command(
                    old.tenant_id, old.out_order_id, new.expire_ms + self.settings.retention_ms
                ),
            ]
            raise_first(await send_together(store.redis, commands))
        try:
            event = BindingEvent("update", now, changes) if changes else None
            end_ms = new.expire_ms if "exp" in changes else None
            await store.records.update(old.binding_id, fields, event, end_ms=end_ms)
        except BaseException:
            if replaced and party_changed:
                # Within the call only (not shielded): once its lock is released, a retry reconciles from `pbh`.
                await self._replace_back(old.binding_id, reservation_id, new.party_b, old.party_b)
            raise
        replaces: tuple[str, ...] = ()
        if old.mode == MODE_AXB:
            # Every earlier party B's key, not only the last one's: a retried update whose first attempt wrote the
            # record but not the routes still takes the replaced party's route away (only keys holding this binding
            # are removed).
            earlier = {event.changes["b"] for event in stored.events if "b" in event.changes} | {old.party_b}
            replaces = tuple(caller_key(old.virtual_number, party) for party in sorted(earlier - {new.party_b}))
        await store.put_routes(new, replaces)
        await store.replicated(new)  # NUMPROTECT_REDIS_WAIT_REPLICAS: acknowledged once replicas have it
        if new.expire_ms < old.expire_ms or (expiry_asked and new.expire_ms == old.expire_ms):
            # Narrowing last; also when the record holds the asked expiry already: a retry whose first attempt
            # wrote the record but not this confirm would otherwise leave the reservation outliving its binding.
            await self.allocation.confirm(reservation_id, old.binding_id, new.expire_ms)
        self.counts.updated.inc()
        log.info(
            "binding updated",
            extra={"binding_id": old.binding_id, "changed": sorted(changes), "party_b": mask(new.party_b)},
        )

    async def _replace_party(self, stored: StoredBinding, new_party: str, held: list[str]) -> bool:
        """Makes allocation hold `new_party` as the binding's B; True when allocation's party changed (or may have:
        the record then says which parties allocation may hold instead, cleared by the record's write). `held`: the
        parties the record says allocation may hold instead of its B. A party a failed attempt left at allocation
        is found again, so a retried update repeats nothing."""
        old = stored.record
        store = self.store
        if new_party == old.party_b and not held:
            return False
        # Before allocation changes: a retry (or the next update) must know which party allocation may hold.
        await store.records.update(
            old.binding_id, {HELD_PARTIES_FIELD: ",".join(dict.fromkeys([*held, new_party]))}, None
        )
        not_held: PartyNotHeld | None = None
        for party in dict.fromkeys([old.party_b, *held]):
            if party == new_party:
                continue
            try:
                await self.allocation.replace_party(stored.reservation_id, party, new_party)
                return True
            except PartyNotHeld as exc:  # allocation holds another candidate, or the new party already
                not_held = exc
        if new_party in held or new_party == old.party_b:
            return True  # a failed attempt gave allocation the new party already
        assert not_held is not None
        raise not_held

    async def _replace_back(self, binding_id: str, reservation_id: str, new_party: str, old_party: str) -> None:
        """After a failed record write: gives allocation the old party back if the record still names it (a write
        whose reply was lost may have landed; unreadable, it is left to a retry, which finds both in `pbh`)."""
        try:
            current = await self.store.get(binding_id)
            if current is None or current.record.party_b != old_party:
                return
            await self.allocation.replace_party(reservation_id, new_party, old_party)
        except Exception as exc:
            log.error("could not undo ReplaceParty, left to the retry", extra={"error": repr(exc)})

    async def delete(self, binding_id: str, tenant_id: str, budget: CallBudget | None = None) -> StoredBinding:
        """Unbinds at once (routes, then the record, then the reservation); a repeated delete finishes what a
        failed one may have left; an expired binding is returned as it is. UNAVAILABLE past the `budget`."""
        budget = self._budget(budget)
        # NOT_FOUND for another tenant before any lock, in the step that takes the lock.
        async with (
            budget.bound("DeleteBinding", reserve=self._reserve(budget) / 2),
            self.reads.locked(binding_id, tenant_id, wait_seconds=self._lock_wait(budget), budget=budget) as held,
            budget.bound("DeleteBinding", reserve=self._reserve(budget)),
        ):
            return await self._delete(held)

    async def _delete(self, held: Locked) -> StoredBinding:
        stored = held.stored
        record = stored.record
        binding_id = record.binding_id
        now = self.clock.now_ms()
        if not record.delete_ms and record.expire_ms <= now:
            # Expired already: nothing routes or holds the number any more; it stays EXPIRED.
            return stored
        if not record.delete_ms:
            # Calls stop first, then the record says so (its last write: the lock goes with it, nothing after it
            # changes what another call could), then the number is given back.
            await self.store.remove_routes(record)
            held.lease.released = await self.store.records.update(
                binding_id,
                {"dms": str(now), "ums": str(now)},
                BindingEvent("delete", now, {}),
                end_ms=now,
                release=held.lease.holder,
            )
            record = replace(record, delete_ms=now, update_ms=now)
            self.counts.deleted.inc()  # once: a repeated delete finds the mark and takes the branch below
            log.info("binding deleted", extra={"binding_id": binding_id, "tenant_id": record.tenant_id})
        else:
            # A repeated delete finishes whatever a failed one may have left.
            await self.store.remove_routes(record)
        await self.store.replicated(record)  # NUMPROTECT_REDIS_WAIT_REPLICAS
        await self.allocation.cancel(stored.reservation_id, "binding deleted")
        return replace(stored, record=record)
