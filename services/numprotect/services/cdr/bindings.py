"""The binding read model (numprotect.core.binding_records) as the enrichment's BindingLookup."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from numprotect.core.binding_records import BindingRecord, get_binding_records, trace_number
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.redis_client import RedisClient
from numprotect.services.cdr.enrich import MatchedBinding


def _matched(record: BindingRecord) -> MatchedBinding:
    return MatchedBinding(
        binding_id=record.binding_id,
        tenant_id=record.tenant_id,
        out_order_id=record.out_order_id,
        virtual_number=record.virtual_number,
        create_ms=record.create_ms,
    )


class RedisBindingLookup:
    """Reads committed binding records and the per-number binding history written by the binding service.

    What enrichment takes from a binding (tenant, order, virtual number, creation) never changes once the
    binding is committed, so found bindings are kept in a bounded LRU cache (cache_size entries, 0 = off);
    unknown ids are never cached (a binding may be committed a moment later). Each lookup holds one place of
    the process's Redis limit: enrichment runs many concurrently.
    """

    def __init__(self, redis: RedisClient, redis_limit: ConcurrencyLimit, *, cache_size: int = 0) -> None:
        self.redis = redis
        self.redis_limit = redis_limit
        self.cache_size = cache_size
        self._cache: OrderedDict[str, MatchedBinding] = OrderedDict()

    async def get(self, binding_ids: Sequence[str]) -> Mapping[str, MatchedBinding]:
        found: dict[str, MatchedBinding] = {}
        missing: list[str] = []
        for binding_id in binding_ids:
            cached = self._cache.get(binding_id)
            if cached is None:
                missing.append(binding_id)
            else:
                self._cache.move_to_end(binding_id)
                found[binding_id] = cached
        if missing:
            async with self.redis_limit:
                records = await get_binding_records(self.redis, missing)
            for binding_id, record in records.items():
                found[binding_id] = self._remember(_matched(record))
        return found

    def _remember(self, binding: MatchedBinding) -> MatchedBinding:
        if self.cache_size:
            self._cache[binding.binding_id] = binding
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return binding

    async def trace(self, virtual_number: str, at_ms: int, party: str, extension: str) -> Sequence[MatchedBinding]:
        async with self.redis_limit:
            records = await trace_number(self.redis, virtual_number, at_ms, party=party, extension=extension)
        return [_matched(record) for record in records]
