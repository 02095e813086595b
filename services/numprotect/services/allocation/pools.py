"""Number pools on Redis: import, allocation, reservations, locks, cooling, stats and history.

No gRPC here: the servicer validates requests and converts to and from protobuf; this class owns the
Redis layout (numprotect.core.pool_keys) and calls one Lua script per operation on a pool.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, ParamSpec, TypeVar

from numprotect.core import pool_keys
from numprotect.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from numprotect.core.identity.directory import CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.phone import mask
from numprotect.core.redis_client import RedisClient
from numprotect.core.routes import lock_key
from numprotect.services.allocation import keys
from numprotect.services.allocation.scripts import Scripts
from numprotect.services.allocation.settings import AllocationSettings

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

MODES = ("AXB", "AXN", "AXE")
# Lapsed numbers one pool_stats script may tidy up before counting, and how many such calls one
# GetPoolStats makes per pool at most.
_STATS_SWEEP_BUDGET = 2_048
_STATS_SWEEP_CALLS = 50


# Whether the caller may see a record of this tenant (layer.Callers.may_see_tenant); everyone by default.
TenantFilter = Callable[[str], bool]


def _everyone(tenant: str) -> bool:
    return True


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class NumberInfo:
    number: str
    tenant: str
    city: str
    state: str  # AVAILABLE | IN_USE | LOCKED | COOLING
    live: int
    mode: str  # AXB | AXN | AXE | "" (the mode it serves while it has live reservations)
    lock_reason: str
    cooling_until_ms: int


@dataclass(frozen=True)
class Allocation:
    number: str
    extension: str
    city: str
    city_fallback: bool
    reservation_id: str
    expire_ms: int


@dataclass(frozen=True)
class PoolStats:
    total: int = 0
    available: int = 0
    in_use: int = 0
    locked: int = 0
    cooling: int = 0

    def __add__(self, other: PoolStats) -> PoolStats:
        return PoolStats(
            self.total + other.total,
            self.available + other.available,
            self.in_use + other.in_use,
            self.locked + other.locked,
            self.cooling + other.cooling,
        )


@dataclass(frozen=True)
class Event:
    time_ms: int
    kind: str
    actor: str
    reason: str
    tenant: str
    binding_id: str
    detail: str


def _info(number: str, tenant: str, city: str, reply: Sequence[Any]) -> NumberInfo:
    # reply: status, state, live, mode, lock_reason, cooling_until_ms
    return NumberInfo(
        number=number,
        tenant=tenant,
        city=city,
        state=_text(reply[1]),
        live=int(reply[2]),
        mode=_text(reply[3]),
        lock_reason=_text(reply[4]),
        cooling_until_ms=int(reply[5]),
    )


def _one_connection(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Runs the operation holding one place of the process's Redis limit (it uses one connection at a time)."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        pools = args[0]
        assert isinstance(pools, NumberPools)
        async with pools.redis_limit:
            return await method(*args, **kwargs)

    return wrapper


class NumberPools:
    """All pools of all tenants in one Redis (standalone or cluster)."""

    def __init__(
        self, redis: RedisClient, settings: AllocationSettings, scripts: Scripts, *, redis_limit: ConcurrencyLimit
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.scripts = scripts
        # The process's bound on Redis operations (numprotect.core.limits); every operation here holds one place.
        self.redis_limit = redis_limit

    def _head(self, tenant: str, city: str) -> list[str | int]:
        """The arguments every pool script starts with (pool_lib.lua): tenant, city, history retention."""
        return [tenant, city, round(self.settings.history_retention_seconds * 1000)]

    # ---- import ---------------------------------------------------------------------------------------

    @_one_connection
    async def import_block(self, block: str, tenant: str, city: str, carrier: str, actor: str) -> int:
        """Numbers added (10000, or 0 when the block already was this tenant's in this city)."""
        owner_key = pool_keys.block_owner_key(block)
        claim = await self.scripts.claim_block(
            self.redis, [owner_key, pool_keys.block_history_key(block)], [tenant, city, actor, carrier]
        )
        outcome = _text(claim[0])
        if outcome == "other_tenant":
            # Which tenant holds it is not the caller's business: the message names only the block.
            raise FailedPrecondition(
                f"block {block} is assigned to another tenant", type_="BLOCK_OWNER", subject=f"blocks/{block}"
            )
        if outcome == "other_city":
            raise FailedPrecondition(
                f"block {block} is already in this tenant's pool for city {_text(claim[1])}",
                type_="BLOCK_CITY",
                subject=f"blocks/{block}",
            )
        # The carrier after the claim (another tenant's block never gets this carrier) and before the numbers:
        # a block another carrier routes gets no numbers. A retry with the right carrier completes the import.
        holder = _text(
            await self.scripts.record_block_carrier(
                self.redis, [CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY], [block, carrier]
            )
        )
        if holder != carrier:
            raise FailedPrecondition(
                f"block {block} is routed by carrier {holder}; carrier_id must be {holder}",
                type_="BLOCK_CARRIER",
                subject=f"blocks/{block}",
            )
        await self.redis.hset(owner_key, "carrier", carrier)
        # Cities first, then the numbers: a crash in between leaves an empty city (harmless), never
        # numbers no fallback can find. A retry completes the import (the pool script is idempotent).
        await self.redis.sadd(pool_keys.tenant_cities_key(tenant), city)
        added = await self.scripts.import_block(
            self.redis, [pool_keys.pool_key(tenant, city)], [*self._head(tenant, city), block]
        )
        log.info(
            "block imported",
            extra={"block": block, "tenant": tenant, "city": city, "carrier": carrier, "added": int(added)},
        )
        return int(added)

    # ---- allocation -----------------------------------------------------------------------------------

    @_one_connection
    async def allocate(
        self, tenant: str, mode: str, parties: Sequence[str], city: str, strict_city: bool, lease_seconds: float
    ) -> Allocation:
        party_a = parties[0]
        party_b = parties[1] if len(parties) > 1 else ""
        lease_ms = max(1, round(lease_seconds * 1000))
        rid = keys.new_rid()
        reply = await self._allocate_in(tenant, city, mode, party_a, party_b, lease_ms, rid)
        chosen_city = city
        if reply is None and not strict_city:
            cities = await self._cities(tenant)
            others = [c for c in cities if c != city]
            random.shuffle(others)
            for other in others:
                reply = await self._allocate_in(tenant, other, mode, party_a, party_b, lease_ms, rid)
                if reply is not None:
                    chosen_city = other
                    break
        if reply is None:
            where = f"city {city}" if strict_city else f"city {city} nor any other city of the tenant"
            raise ResourceExhausted(
                f"no {mode} number left for tenant {tenant} in {where}",
                subject=f"tenants/{tenant}/cities/{city}",
            )
        number = _text(reply[1])
        handle = pool_keys.Handle(tenant, chosen_city, number, rid)
        log.debug(
            "allocated",
            extra={"tenant": tenant, "city": chosen_city, "mode": mode, "number": number, "party_a": mask(party_a)},
        )
        return Allocation(
            number=number,
            extension=_text(reply[2]),
            city=chosen_city,
            city_fallback=chosen_city != city,
            reservation_id=handle.encode(),
            expire_ms=int(reply[3]),
        )

    async def _allocate_in(
        self, tenant: str, city: str, mode: str, party_a: str, party_b: str, lease_ms: int, rid: str
    ) -> list[Any] | None:
        s = self.settings
        reply = await self.scripts.allocate(
            self.redis,
            [pool_keys.pool_key(tenant, city)],
            [
                *self._head(tenant, city),
                mode,
                party_a,
                party_b,
                lease_ms,
                s.max_bindings_per_number,
                s.target_bindings_per_number,
                rid,
                random.randrange(10_000),
                s.candidates,
                s.sweep_batch,
            ],
        )
        return list(reply) if _text(reply[0]) == "ok" else None

    # ---- reservations ---------------------------------------------------------------------------------

    @_one_connection
    async def confirm(self, handle: pool_keys.Handle, binding_id: str, expire_ms: int) -> None:
        reply = await self.scripts.confirm(
            self.redis,
            [pool_keys.pool_key(handle.tenant, handle.city)],
            [*self._head(handle.tenant, handle.city), handle.number, handle.rid, binding_id, expire_ms],
        )
        outcome = _text(reply[0])
        if outcome == "missing":
            raise NotFound(
                "reservation not found: never issued, cancelled, or its lease or expire_time has passed",
                resource_type="reservation",
                resource_name=handle.encode(),
            )
        if outcome == "past":
            raise InvalidArgument.field("expire_time", "must be in the future")
        if outcome == "other_binding":
            raise FailedPrecondition(
                f"reservation is confirmed for binding {_text(reply[1])}",
                type_="RESERVATION_BINDING",
                subject=handle.encode(),
            )

    @_one_connection
    async def cancel(self, handle: pool_keys.Handle, reason: str) -> bool:
        """True when a live reservation was freed; False when there was none (idempotent)."""
        reply = await self.scripts.cancel(
            self.redis,
            [pool_keys.pool_key(handle.tenant, handle.city)],
            [*self._head(handle.tenant, handle.city), handle.number, handle.rid, reason],
        )
        return _text(reply[0]) == "ok"

    @_one_connection
    async def replace(self, handle: pool_keys.Handle, old_party: str, new_party: str) -> pool_keys.Handle:
        reply = await self.scripts.replace(
            self.redis,
            [pool_keys.pool_key(handle.tenant, handle.city)],
            [*self._head(handle.tenant, handle.city), handle.number, handle.rid, old_party, new_party],
        )
        outcome = _text(reply[0])
        if outcome == "missing":
            raise NotFound(
                "reservation not found: never issued, cancelled, or lapsed",
                resource_type="reservation",
                resource_name=handle.encode(),
            )
        if outcome == "not_party":
            raise FailedPrecondition(
                f"{mask(old_party)} is not a party of this reservation", type_="PARTY", subject="old_party"
            )
        if outcome == "conflict":
            raise FailedPrecondition(
                f"{mask(new_party)} already holds a binding on {handle.number}",
                type_="PARTY_CONFLICT",
                subject=f"numbers/{handle.number}/parties/{mask(new_party)}",
            )
        # The same handle stays valid: a caller that crashes before storing the answer keeps a working one.
        return handle

    # ---- numbers --------------------------------------------------------------------------------------

    async def owner(self, number: str, visible: TenantFilter = _everyone) -> tuple[str, str]:
        """(tenant, city) of the block holding the number, or NotFound, also when `visible(tenant)` is False:
        a number of another tenant answers exactly as one in no block (no oracle)."""
        block = number[:11]
        tenant, city = await self.redis.hmget(pool_keys.block_owner_key(block), ["tenant", "city"])
        if tenant is None or not visible(_text(tenant)):
            raise NotFound(f"{number} is in no imported block", resource_type="virtual_number", resource_name=number)
        return _text(tenant), _text(city)

    async def _number_script(
        self, script_name: str, number: str, *args: str | int, visible: TenantFilter = _everyone
    ) -> NumberInfo:
        tenant, city = await self.owner(number, visible)
        script = getattr(self.scripts, script_name)
        reply = await script(self.redis, [pool_keys.pool_key(tenant, city)], [*self._head(tenant, city), number, *args])
        outcome = _text(reply[0])
        if outcome == "unknown":
            raise NotFound(
                f"{number}: its block import did not complete; import it again",
                resource_type="virtual_number",
                resource_name=number,
            )
        if outcome == "locked":
            raise FailedPrecondition(f"{number} is locked; unlock it first", type_="LOCKED", subject=number)
        if outcome == "in_use":
            raise FailedPrecondition(
                f"{number} still carries {int(reply[1])} live binding(s); delete them first",
                type_="IN_USE",
                subject=number,
            )
        return _info(number, tenant, city, reply)

    @_one_connection
    async def get(self, number: str, visible: TenantFilter = _everyone) -> NumberInfo:
        return await self._number_script("number_info", number, visible=visible)

    @_one_connection
    async def release(self, number: str, actor: str, reason: str) -> NumberInfo:
        cooldown_ms = round(self.settings.cooldown_seconds * 1000)
        return await self._number_script("release", number, actor, reason, cooldown_ms)

    @_one_connection
    async def lock(self, number: str, reason: str, actor: str) -> NumberInfo:
        await self.owner(number)  # unknown numbers get no flag
        # Flag first: at every moment "locked in the pool" implies "calls rejected by translation".
        # A failure after the flag leaves a number that rejects calls but may still be handed out
        # (fail closed on the call path); retrying LockNumber completes it.
        await self.redis.set(lock_key(number), reason)
        return await self._number_script("lock", number, reason, actor)

    @_one_connection
    async def unlock(self, number: str, actor: str) -> NumberInfo:
        # Pool first, flag last (the mirror of lock): a failure in between leaves calls rejected, and a
        # retry (idempotent) removes the flag.
        info = await self._number_script("unlock", number, actor)
        await self.redis.delete(lock_key(number))
        return info

    # ---- stats ----------------------------------------------------------------------------------------

    @_one_connection
    async def stats(self, tenant: str, city: str | None) -> PoolStats:
        cities = [city] if city else await self._cities(tenant)
        total = PoolStats()
        for c in cities:
            total += await self._city_stats(tenant, c)
        return total

    async def _cities(self, tenant: str) -> list[str]:
        return sorted(_text(c) for c in await self.redis.smembers(pool_keys.tenant_cities_key(tenant)))

    async def _city_stats(self, tenant: str, city: str) -> PoolStats:
        # Each call sweeps a bounded batch before counting (Redis is never blocked long); repeated until
        # nothing lapsed is left, so the counts are exact unless the backlog exceeds the cap.
        for _ in range(_STATS_SWEEP_CALLS):
            reply = await self.scripts.pool_stats(
                self.redis, [pool_keys.pool_key(tenant, city)], [*self._head(tenant, city), _STATS_SWEEP_BUDGET]
            )
            total, available, in_use, locked, cooling, settled = (int(v) for v in reply)
            if settled:
                break
        return PoolStats(total, available, in_use, locked, cooling)

    # ---- history --------------------------------------------------------------------------------------

    @_one_connection
    async def history(
        self, number: str, page_size: int, after: HistoryCursor | None, visible: TenantFilter = _everyone
    ) -> tuple[list[Event], HistoryCursor | None]:
        """Events of the number oldest first: its block's (import) merged with its own, paged. Returns the
        page and where the next one starts (None at the end)."""
        tenant, city = await self.owner(number, visible)
        block_after, number_after = after or HistoryCursor("", "")
        block_key = pool_keys.block_history_key(number[:11])
        number_key = pool_keys.number_history_key(tenant, city, number)
        block_entries = await self.redis.xrange(block_key, min=_after(block_after), count=page_size + 1)
        number_entries = await self.redis.xrange(number_key, min=_after(number_after), count=page_size + 1)
        merged: list[tuple[tuple[int, int], str, Any, Any]] = sorted(
            [(_stream_order(i), "b", i, f) for i, f in block_entries or []]
            + [(_stream_order(i), "n", i, f) for i, f in number_entries or []]
        )
        page = merged[:page_size]
        for _, source, entry_id, _ in page:
            if source == "b":
                block_after = _text(entry_id)
            else:
                number_after = _text(entry_id)
        events = [_event(entry_id, fields, tenant) for _, _, entry_id, fields in page]
        more = len(merged) > page_size
        return events, HistoryCursor(block_after, number_after) if more else None


class HistoryCursor(NamedTuple):
    """Where a history page ends: the last stream id read from the block's and from the number's history."""

    block_after: str
    number_after: str


def _after(entry_id: str) -> str:
    return f"({entry_id}" if entry_id else "-"


def _stream_order(entry_id: Any) -> tuple[int, int]:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq)


def _event(entry_id: Any, raw: dict[Any, Any] | None, tenant: str) -> Event:
    fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
    at = fields.get("at") or _text(entry_id).partition("-")[0]
    return Event(
        time_ms=int(at),
        kind=fields.get("kind", ""),
        actor=fields.get("actor", ""),
        reason=fields.get("reason", ""),
        tenant=fields.get("tenant", tenant),
        binding_id=fields.get("binding", ""),
        detail=fields.get("detail", ""),
    )
