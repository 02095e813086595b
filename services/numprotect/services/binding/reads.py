"""Reading bindings: one of a tenant's (committed only), a tenant's in creation order, a number's at a moment; and
one read with the binding's lock taken in the same step, for an update or a delete."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from numprotect.core.binding_records import (
    STATUS_ACTIVE,
    BindingRecord,
    StoredBinding,
    decode_stored,
    trace_number,
)
from numprotect.core.errors import NotFound
from numprotect.core.telemetry import set_span_attributes
from numprotect.services.binding.deadline import CallBudget
from numprotect.services.binding.store import BindingStore, Lease, parties_held

# How long a read waits for the binding's lock to complete a committed create.
_COMPLETE_WAIT_SECONDS = 2.0


def _everyone(tenant_id: str) -> bool:
    return True


def _not_found(binding_id: str) -> NotFound:
    return NotFound(f"binding {binding_id} not found", resource_type="binding", resource_name=binding_id)


@dataclass(frozen=True)
class Locked:
    """A committed binding read with its lock held: the stored binding, the lease (a write may release it), and the
    parties B allocation may hold for it instead of the record's (store.parties_held)."""

    stored: StoredBinding
    lease: Lease
    held_parties: list[str]


class BindingReads:
    def __init__(self, store: BindingStore) -> None:
        self.store = store

    async def load(self, binding_id: str, tenant_id: str, *, budget: CallBudget | None = None) -> StoredBinding:
        """The tenant's committed binding, or NOT_FOUND (also for another tenant's binding). `budget`: the call's
        (the lease of the lock it may take to complete the binding's create)."""
        set_span_attributes(tenant=tenant_id, binding_id=binding_id)
        stored = await self.store.get(binding_id)
        if stored is None or stored.record.tenant_id != tenant_id:
            raise _not_found(binding_id)
        if stored.pending:
            stored = await self._complete_committed(stored, budget)
        return stored

    async def _complete_committed(self, stored: StoredBinding, budget: CallBudget | None) -> StoredBinding:
        """A pending record whose order names it (committed, but its create did not complete: crashed, or Redis
        failed after the commit), completed now under the binding's lock so that no update or delete runs meanwhile;
        NOT_FOUND when the order does not name it (a create in flight or undone)."""
        record = stored.record
        if await self.store.orders.committed_binding(record.tenant_id, record.out_order_id) != record.binding_id:
            raise _not_found(record.binding_id)
        async with self.store.locks.hold(record.binding_id, wait_seconds=_COMPLETE_WAIT_SECONDS, budget=budget):
            stored = await self.store.get(record.binding_id) or stored
            if stored.pending:
                await self.store.complete(stored.record)
        return replace(stored, status=STATUS_ACTIVE)

    @asynccontextmanager
    async def locked(
        self, binding_id: str, tenant_id: str, *, wait_seconds: float, budget: CallBudget | None = None
    ) -> AsyncIterator[Locked]:
        """The tenant's committed binding with its lock held, read in the step that takes the lock (one script):
        NOT_FOUND, another tenant's binding included, before anything is locked; ABORTED when another call keeps
        the lock longer than `wait_seconds`. A committed binding whose create did not complete is completed first.
        The lock is released on the way out unless a write released it (`Lease.released`)."""
        set_span_attributes(tenant=tenant_id, binding_id=binding_id)
        while True:
            async with self.store.locks.hold_record(
                binding_id, tenant_id, wait_seconds=wait_seconds, budget=budget
            ) as read:
                stored = decode_stored(binding_id, read.fields)
                if stored is None or stored.record.tenant_id != tenant_id:
                    raise _not_found(binding_id)
                if read.lease is not None:
                    yield Locked(stored, read.lease, parties_held(read.fields))
                    return
            await self._complete_committed(stored, budget)  # then read and lock it again

    async def by_order(self, tenant_id: str, out_order_id: str) -> StoredBinding | None:
        """The binding a committed order of the tenant names, or None."""
        binding_id = await self.store.orders.committed_binding(tenant_id, out_order_id)
        if binding_id is None:
            return None
        try:
            return await self.load(binding_id, tenant_id)
        except NotFound:
            return None

    async def page(self, tenant_id: str, after: str, size: int) -> tuple[list[StoredBinding], str]:
        """Up to `size` of the tenant's committed bindings created after the id `after`, and the id the next page
        continues after ("" when this is the last page)."""
        page_ids, more = await self.store.tenants.page(tenant_id, after, size)
        stored_by_id = await self.store.get_many(page_ids)
        bindings = []
        for binding_id in page_ids:
            found = stored_by_id.get(binding_id)
            if found is None or found.pending or found.record.tenant_id != tenant_id:
                continue  # purged after retention, or a create in flight or undone
            bindings.append(found)
        return bindings, page_ids[-1] if more and page_ids else ""

    async def trace(
        self,
        virtual_number: str,
        at_ms: int,
        *,
        party: str,
        extension: str,
        visible: Callable[[str], bool] = _everyone,
    ) -> list[BindingRecord]:
        """The bindings live on the number at `at_ms` as they were then, of the tenants `visible` admits (a tenant
        caller: its own), or NOT_FOUND: the same answer whether there were none or only other tenants' ones."""
        found = await trace_number(self.store.redis, virtual_number, at_ms, party=party, extension=extension)
        found = [record for record in found if visible(record.tenant_id)]
        if not found:
            raise NotFound(f"number {virtual_number} served no binding at that moment")
        return found
