"""Enrichment: ties each valid record to its binding and fills tenant_id, out_order_id and binding_match.

Order (first that matches wins): the record's binding_id, then the binding named by its call_ref, then the
binding history (virtual number + party + call time, also for bindings long expired). A binding whose virtual
number is not the record's called_number is not a match. No match: binding_match NONE, the record goes to the
operator's "unmatched" bucket (tenant "" in storage terms). Lookup failures raise (the batch is retried), they
never turn a record into "unmatched".
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from numprotect.cdr.v1 import cdr_pb2
from numprotect.services.cdr.validation import ValidCdr


@dataclass(frozen=True, slots=True)
class MatchedBinding:
    """What enrichment needs of a binding."""

    binding_id: str
    tenant_id: str
    out_order_id: str
    virtual_number: str
    create_ms: int


class BindingLookup(Protocol):
    async def get(self, binding_ids: Sequence[str]) -> Mapping[str, MatchedBinding]: ...

    async def trace(self, virtual_number: str, at_ms: int, party: str, extension: str) -> Sequence[MatchedBinding]: ...


class NoBindings:
    """A lookup that knows no binding (used where the binding read model is not available)."""

    async def get(self, binding_ids: Sequence[str]) -> Mapping[str, MatchedBinding]:
        return {}

    async def trace(self, virtual_number: str, at_ms: int, party: str, extension: str) -> Sequence[MatchedBinding]:
        return []


class Enricher:
    def __init__(self, lookup: BindingLookup) -> None:
        # The lookup bounds its own Redis work (RedisBindingLookup holds the process's Redis limit per lookup).
        self.lookup = lookup

    async def enrich(self, records: Sequence[ValidCdr]) -> None:
        """Sets tenant_id, out_order_id, binding_id and binding_match on every record (in place)."""
        wanted = {r.record.binding_id for r in records if r.record.binding_id}
        wanted |= {r.call_ref.binding_id for r in records if r.call_ref is not None}
        found = await self.lookup.get(sorted(wanted)) if wanted else {}
        rest: list[ValidCdr] = []
        for valid in records:
            record = valid.record
            by_id = found.get(record.binding_id) if record.binding_id else None
            if by_id is not None and by_id.virtual_number == record.called_number:
                _apply(record, by_id, cdr_pb2.BINDING_MATCH_BINDING_ID)
                continue
            by_ref = found.get(valid.call_ref.binding_id) if valid.call_ref is not None else None
            if by_ref is not None and by_ref.virtual_number == record.called_number:
                _apply(record, by_ref, cdr_pb2.BINDING_MATCH_CALL_REF)
                continue
            rest.append(valid)
        if not rest:
            return

        async def from_history(valid: ValidCdr) -> None:
            binding = await self._trace(valid)
            if binding is None:
                valid.record.binding_match = cdr_pb2.BINDING_MATCH_NONE
            else:
                _apply(valid.record, binding, cdr_pb2.BINDING_MATCH_HISTORY)

        await asyncio.gather(*(from_history(valid) for valid in rest))

    async def _trace(self, valid: ValidCdr) -> MatchedBinding | None:
        record = valid.record
        # A dials X to reach its peer: the caller is A. The peer (or, AXN, anyone) dials X: the target is A.
        parties = [record.calling_number, record.target_number]
        if record.call_type == cdr_pb2.CALL_TYPE_A_TO_PEER:
            parties.reverse()
        for party in parties:
            if not party or party.startswith("+"):
                continue
            candidates = await self.lookup.trace(record.called_number, valid.call_ms, party, record.extension)
            matching = [c for c in candidates if c.virtual_number == record.called_number]
            if matching:
                # Deterministic for a call_id: the most recently created binding that served the call.
                return min(matching, key=lambda c: (-c.create_ms, c.binding_id))
        return None


def _apply(record: cdr_pb2.CallDetailRecord, binding: MatchedBinding, match: int) -> None:
    record.binding_id = binding.binding_id
    record.tenant_id = binding.tenant_id
    record.out_order_id = binding.out_order_id
    record.binding_match = match  # type: ignore[assignment]
