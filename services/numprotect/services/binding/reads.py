"""Reading bindings: one of a tenant's (committed only), a tenant's in creation order, a number's at a moment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from numprotect.core.binding_records import STATUS_ACTIVE, BindingRecord, StoredBinding, trace_number
from numprotect.core.errors import NotFound
from numprotect.core.telemetry import set_span_attributes
from numprotect.services.binding.deadline import CallBudget
from numprotect.services.binding.store import BindingStore

# How long a read waits for the binding's lock to complete a committed create.
_COMPLETE_WAIT_SECONDS = 2.0


def _everyone(tenant_id: str) -> bool:
    return True


class BindingReads:
    def __init__(self, store: BindingStore) -> None:
        self.store = store

    async def load(
        self, binding_id: str, tenant_id: str, *, locked: bool = False, budget: CallBudget | None = None
    ) -> StoredBinding:
        """The tenant's committed binding, or NOT_FOUND (also for another tenant's binding). `locked`: the caller
        holds the binding's lock (an update or delete); `budget`: the call's (the lease of the lock it may take)."""
        set_span_attributes(tenant=tenant_id, binding_id=binding_id)
        stored = await self.store.get(binding_id)
        if stored is None or stored.record.tenant_id != tenant_id:
            raise NotFound(f"binding {binding_id} not found", resource_type="binding", resource_name=binding_id)
        if stored.pending:
            # Committed (its order names it) but its create did not complete (crashed, or Redis failed after the
            # commit): complete it now, under the binding's lock so that no update or delete runs meanwhile.
            committed = await self.store.orders.committed_binding(tenant_id, stored.record.out_order_id)
            if committed != binding_id:
                raise NotFound(f"binding {binding_id} not found", resource_type="binding", resource_name=binding_id)
            if locked:
                await self.store.complete(stored.record)
            else:
                async with self.store.locks.hold(binding_id, wait_seconds=_COMPLETE_WAIT_SECONDS, budget=budget):
                    stored = await self.store.get(binding_id) or stored
                    if stored.pending:
                        await self.store.complete(stored.record)
            stored = replace(stored, status=STATUS_ACTIVE)
        return stored

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
