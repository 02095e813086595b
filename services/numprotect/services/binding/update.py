"""Changes to an existing binding, one at a time per binding (a per-binding lock): UpdateBinding and DeleteBinding.

An update widens first (a new party at allocation, a later expiry: harmless if a later step fails), then writes the
record, then the routes, and narrows last (an earlier expiry); repeating it re-puts the routes from the record.
A delete stops calls first (routes), then marks the record, then gives the number back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from numprotect.core.binding_records import BindingEvent, BindingRecord, StoredBinding
from numprotect.core.clock import Clock
from numprotect.core.errors import DomainError, FailedPrecondition
from numprotect.core.phone import mask
from numprotect.core.routes import MODE_AXB, MODE_AXN, caller_key
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.concurrency import gather_all
from numprotect.services.binding.reads import BindingReads
from numprotect.services.binding.settings import BindingSettings
from numprotect.services.binding.store import BindingStore
from numprotect.services.binding.validation import UpdateSpec, Violations

log = logging.getLogger(__name__)


class BindingUpdater:
    """Runs UpdateBinding and DeleteBinding of a tenant's committed binding."""

    def __init__(
        self,
        store: BindingStore,
        reads: BindingReads,
        allocation: AllocationClient,
        settings: BindingSettings,
        clock: Clock,
    ) -> None:
        self.store = store
        self.reads = reads
        self.allocation = allocation
        self.settings = settings
        self.clock = clock

    async def update(self, spec: UpdateSpec) -> StoredBinding:
        """Applies the masked fields; FAILED_PRECONDITION for a deleted or expired binding."""
        await self.reads.load(spec.binding_id, spec.tenant_id)  # NOT_FOUND for another tenant before any lock
        async with self.store.locks.hold(spec.binding_id):
            stored = await self.reads.load(spec.binding_id, spec.tenant_id, locked=True)
            record = stored.record
            now = self.clock.now_ms()
            if record.delete_ms:
                raise FailedPrecondition(f"binding {record.binding_id} was deleted", subject=record.binding_id)
            if record.expire_ms <= now:
                raise FailedPrecondition(f"binding {record.binding_id} has expired", subject=record.binding_id)
            updated = self._apply(spec, record, now)
            await self._write(stored, updated, now)
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

    async def _write(self, stored: StoredBinding, new: BindingRecord, now: int) -> None:
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
        if party_changed and old.mode != MODE_AXN:
            # AXB/AXE: allocation keeps each real number once per X; it refuses a B already on this number.
            reservation_id = await self.allocation.replace_party(reservation_id, old.party_b, new.party_b)
            fields["rid"] = reservation_id
            replaced = True
        if new.expire_ms > old.expire_ms:
            await self.allocation.confirm(reservation_id, old.binding_id, new.expire_ms)
            await gather_all(
                (
                    store.records.add_to_history(old.virtual_number, old.binding_id, new.expire_ms),
                    # The order key lives as long as the record, so the order stays idempotent that long.
                    store.orders.extend(old.tenant_id, old.out_order_id, new.expire_ms + self.settings.retention_ms),
                )
            )
        try:
            event = BindingEvent("update", now, changes) if changes else None
            end_ms = new.expire_ms if "exp" in changes else None
            await store.records.update(old.binding_id, fields, event, end_ms=end_ms)
        except BaseException:
            if replaced:
                await asyncio.shield(self._replace_back(reservation_id, new.party_b, old.party_b))
            raise
        replaces = (caller_key(old.virtual_number, old.party_b),) if party_changed and old.mode == MODE_AXB else ()
        await store.put_routes(new, replaces)
        await store.replicated(new)  # NUMPROTECT_REDIS_WAIT_REPLICAS: acknowledged once replicas have it
        if new.expire_ms < old.expire_ms:
            await self.allocation.confirm(reservation_id, old.binding_id, new.expire_ms)
        log.info(
            "binding updated",
            extra={"binding_id": old.binding_id, "changed": sorted(changes), "party_b": mask(new.party_b)},
        )

    async def _replace_back(self, reservation_id: str, new_party: str, old_party: str) -> None:
        try:
            await self.allocation.replace_party(reservation_id, new_party, old_party)
        except DomainError as exc:
            log.error("could not undo ReplaceParty", extra={"error": exc.message})

    async def delete(self, binding_id: str, tenant_id: str) -> StoredBinding:
        """Unbinds at once (routes, then the record, then the reservation); a repeated delete finishes what a
        failed one may have left; an expired binding is returned as it is."""
        await self.reads.load(binding_id, tenant_id)  # NOT_FOUND for another tenant before any lock
        async with self.store.locks.hold(binding_id):
            stored = await self.reads.load(binding_id, tenant_id, locked=True)
            record = stored.record
            now = self.clock.now_ms()
            if not record.delete_ms and record.expire_ms <= now:
                # Expired already: nothing routes or holds the number any more; it stays EXPIRED.
                return stored
            if not record.delete_ms:
                # Calls stop first, then the record says so, then the number is given back.
                await self.store.remove_routes(record)
                await self.store.records.update(
                    binding_id, {"dms": str(now), "ums": str(now)}, BindingEvent("delete", now, {}), end_ms=now
                )
                record = replace(record, delete_ms=now, update_ms=now)
                log.info("binding deleted", extra={"binding_id": binding_id, "tenant_id": tenant_id})
            else:
                # A repeated delete finishes whatever a failed one may have left.
                await self.store.remove_routes(record)
            await self.store.replicated(record)  # NUMPROTECT_REDIS_WAIT_REPLICAS
            await self.allocation.cancel(stored.reservation_id, "binding deleted")
        return replace(stored, record=record)
