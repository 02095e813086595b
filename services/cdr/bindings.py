"""The binding read model (numprotect_core.binding_records) as the enrichment's BindingLookup."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cdr.enrich import MatchedBinding
from numprotect_core.binding_records import BindingRecord, get_binding_records, trace_number
from numprotect_core.redis_client import RedisClient


def _matched(record: BindingRecord) -> MatchedBinding:
    return MatchedBinding(
        binding_id=record.binding_id,
        tenant_id=record.tenant_id,
        out_order_id=record.out_order_id,
        virtual_number=record.virtual_number,
        create_ms=record.create_ms,
    )


class RedisBindingLookup:
    """Reads committed binding records and the per-number binding history written by the binding service."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    async def get(self, binding_ids: Sequence[str]) -> Mapping[str, MatchedBinding]:
        records = await get_binding_records(self.redis, binding_ids)
        return {binding_id: _matched(record) for binding_id, record in records.items()}

    async def trace(self, virtual_number: str, at_ms: int, party: str, extension: str) -> Sequence[MatchedBinding]:
        records = await trace_number(self.redis, virtual_number, at_ms, party=party, extension=extension)
        return [_matched(record) for record in records]
