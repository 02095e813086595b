"""Number pools on Redis: import, allocation, reservations, locks, cooling, stats and history.

No gRPC here: the servicer validates requests and converts to and from protobuf; this class owns the
Redis layout (numprotect.core.pool_keys) and calls one Lua script per operation on a sub-pool.

A pool is N sub-pools (docs/allocation.md, "Sub-pools"), each in its own slot; a number lives in one of them, so
everything about one number (reservations, the AXB rule, history) is one script on one slot. An allocation tries
the sub-pools in turn from a rotating start: one round trip unless that sub-pool has nothing that fits.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, ParamSpec, TypeVar

from numprotect.core import event_keys, event_outbox, pool_keys
from numprotect.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from numprotect.core.identity.directory import CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.phone import mask
from numprotect.core.redis_batch import Command
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
# Pools whose layout a process keeps (sub-pool keys: computing one costs ~2N CRC16s); beyond it, it starts over.
_LAYOUTS_KEPT = 100_000


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
    # Allocation's net take from the free set over the rate window (pool_keys.rate_window_ms at `now_ms`, Redis
    # server time): numbers allocations took from it minus numbers back in it when their last reservation ended.
    net_taken: int = 0
    now_ms: int = 0

    def __add__(self, other: PoolStats) -> PoolStats:
        return PoolStats(
            self.total + other.total,
            self.available + other.available,
            self.in_use + other.in_use,
            self.locked + other.locked,
            self.cooling + other.cooling,
            self.net_taken + other.net_taken,
            max(self.now_ms, other.now_ms),
        )

    @property
    def rate_window_ms(self) -> int:
        return pool_keys.rate_window_ms(self.now_ms) if self.now_ms else 0

    @property
    def net_taken_per_day(self) -> float:
        """The current allocation rate: the net take over the rate window, per day of it."""
        window = self.rate_window_ms
        return self.net_taken * pool_keys.DAY_MS / window if window else 0.0


def summed(per_city: Sequence[tuple[str, PoolStats]]) -> PoolStats:
    return sum((stats for _, stats in per_city), PoolStats())


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


@dataclass(frozen=True)
class _SubPools:
    """A pool's layout, and where its next allocation starts: the start rotates, so each sub-pool is first for every
    N-th allocation of the process (per pool: two pools used in turn do not always start at the same sub-pool)."""

    layout: pool_keys.PoolLayout
    turns: Iterator[int]

    def in_turn(self) -> tuple[str, ...]:
        keys = self.layout.keys
        if len(keys) == 1:
            return keys
        start = next(self.turns) % len(keys)
        return keys[start:] + keys[:start]


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
        # Each pool's sub-pool count as its record says (fixed once the pool exists: read once per process), and
        # the layouts of (tenant, city, count) in use.
        self._counts: dict[tuple[str, str], int] = {}
        self._layouts: dict[tuple[str, str, int], _SubPools] = {}

    def _head(self, tenant: str, city: str) -> list[str | int]:
        """The arguments every pool script starts with (pool_lib.lua): tenant, city, history retention."""
        return [tenant, city, round(self.settings.history_retention_seconds * 1000)]

    def _layout_of(self, tenant: str, city: str, subpools: int) -> pool_keys.PoolLayout:
        return self._subpools_of(tenant, city, subpools).layout

    def _subpools_of(self, tenant: str, city: str, subpools: int) -> _SubPools:
        key = (tenant, city, subpools)
        found = self._layouts.get(key)
        if found is None:
            if len(self._layouts) >= _LAYOUTS_KEPT:
                self._layouts.clear()
            layout = pool_keys.PoolLayout.of(tenant, city, subpools)
            found = self._layouts[key] = _SubPools(layout, itertools.count(random.randrange(subpools)))
        return found

    async def _layout(self, tenant: str, city: str) -> pool_keys.PoolLayout:
        return (await self._pool(tenant, city)).layout

    async def _pool(self, tenant: str, city: str) -> _SubPools:
        """The pool's sub-pools, as its record (sub-pool 0's hash) fixed them at its first import. A pool with no
        record yet is answered as one sub-pool and not remembered (its import may be under way)."""
        count = self._counts.get((tenant, city))
        if count is None:
            subpools, total = await self.redis.hmget(pool_keys.pool_key(tenant, city), ["subpools", "total"])
            if subpools is None and total is None:
                return self._subpools_of(tenant, city, 1)
            # A pool made before sub-pools has no `subpools` field: it is one sub-pool.
            count = int(subpools) if subpools is not None else 1
            if len(self._counts) >= _LAYOUTS_KEPT:
                self._counts.clear()
            self._counts[(tenant, city)] = count
        return self._subpools_of(tenant, city, count)

    def _handle_pool(self, handle: pool_keys.Handle) -> str:
        """The base key of the sub-pool holding a reservation: from the handle alone, no round trip."""
        return self._layout_of(handle.tenant, handle.city, handle.subpools).key_of(handle.number)

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
        # Sub-pool 0 first: its script fixes the pool's sub-pool count (a new pool takes the setting), then the
        # others. A crash in between leaves the block in some sub-pools only; its numbers in the others answer
        # "import it again" (number scripts) and are not handed out; a retry adds what is missing.
        head = [*self._head(tenant, city), block]
        first = await self.scripts.import_block(
            self.redis, [pool_keys.pool_key(tenant, city)], [*head, 0, self.settings.subpools]
        )
        added, count = int(first[0]), int(first[1])
        self._counts[(tenant, city)] = count
        layout = self._layout_of(tenant, city, count)
        for index in range(1, count):
            reply = await self.scripts.import_block(self.redis, [layout.keys[index]], [*head, index, count])
            added += int(reply[0])
        log.info(
            "block imported",
            extra={
                "block": block,
                "tenant": tenant,
                "city": city,
                "carrier": carrier,
                "added": added,
                "subpools": count,
            },
        )
        return added

    # ---- allocation -----------------------------------------------------------------------------------

    @_one_connection
    async def allocate(
        self, tenant: str, mode: str, parties: Sequence[str], city: str, strict_city: bool, lease_seconds: float
    ) -> Allocation:
        party_a = parties[0]
        party_b = parties[1] if len(parties) > 1 else ""
        lease_ms = max(1, round(lease_seconds * 1000))
        rid = keys.new_rid()
        pool = await self._pool(tenant, city)
        reply = await self._allocate_in(pool, mode, party_a, party_b, lease_ms, rid)
        if reply is None and not strict_city:
            cities = await self._cities(tenant)
            others = [c for c in cities if c != city]
            random.shuffle(others)
            for other in others:
                pool = await self._pool(tenant, other)
                reply = await self._allocate_in(pool, mode, party_a, party_b, lease_ms, rid)
                if reply is not None:
                    break
        if reply is None:
            where = f"city {city}" if strict_city else f"city {city} nor any other city of the tenant"
            raise ResourceExhausted(
                f"no {mode} number left for tenant {tenant} in {where}",
                subject=f"tenants/{tenant}/cities/{city}",
            )
        number = _text(reply[1])
        chosen_city = pool.layout.city
        handle = pool_keys.Handle(tenant, chosen_city, number, rid, pool.layout.subpools)
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
        self, pool: _SubPools, mode: str, party_a: str, party_b: str, lease_ms: int, rid: str
    ) -> list[Any] | None:
        """One pool: its sub-pools from the next start in turn, until one has a number that fits (the AXB rule is
        per number, so each sub-pool checks it alone); None when none has. Every try uses the same reservation id
        (a sub-pool keeps its answer under it: "Scripts run twice")."""
        s = self.settings
        args = [
            *self._head(pool.layout.tenant, pool.layout.city),
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
        ]
        for key in pool.in_turn():
            reply = await self.scripts.allocate(self.redis, [key], args)
            if _text(reply[0]) == "ok":
                return list(reply)
        return None

    # ---- reservations ---------------------------------------------------------------------------------

    @_one_connection
    async def confirm(self, handle: pool_keys.Handle, binding_id: str, expire_ms: int) -> None:
        reply = await self.scripts.confirm(
            self.redis,
            [self._handle_pool(handle)],
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
            [self._handle_pool(handle)],
            [*self._head(handle.tenant, handle.city), handle.number, handle.rid, reason],
        )
        return _text(reply[0]) == "ok"

    @_one_connection
    async def replace(self, handle: pool_keys.Handle, old_party: str, new_party: str) -> pool_keys.Handle:
        reply = await self.scripts.replace(
            self.redis,
            [self._handle_pool(handle)],
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
        self,
        script_name: str,
        number: str,
        *args: str | int,
        visible: TenantFilter = _everyone,
        events: bool = False,
    ) -> NumberInfo:
        """`events`: the script records events in the outbox of the sub-pool's slot (its KEYS[2]); the slot's hint for
        the events service goes in the same round trip."""
        tenant, city = await self.owner(number, visible)
        layout = await self._layout(tenant, city)
        script = getattr(self.scripts, script_name)
        key = layout.key_of(number)
        script_args = [*self._head(tenant, city), number, *args]
        if events:
            command = Command.run(script, [key, event_keys.outbox_key_beside(key)], script_args)
            reply = await event_outbox.run_with_hints(self.redis, command, [event_outbox.ring_hint(key)])
        else:
            reply = await script(self.redis, [key], script_args)
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
        return await self._number_script("lock", number, reason, actor, events=True)  # number.locked

    @_one_connection
    async def unlock(self, number: str, actor: str) -> NumberInfo:
        # Pool first, flag last (the mirror of lock): a failure in between leaves calls rejected, and a
        # retry (idempotent) removes the flag.
        info = await self._number_script("unlock", number, actor, events=True)  # number.unlocked
        await self.redis.delete(lock_key(number))
        return info

    # ---- stats ----------------------------------------------------------------------------------------

    async def stats(self, tenant: str, city: str | None) -> PoolStats:
        return summed(await self.city_stats(tenant, city))

    @_one_connection
    async def city_stats(self, tenant: str, city: str | None) -> list[tuple[str, PoolStats]]:
        """Each city's stats (the one asked, or every city of the tenant, in order)."""
        cities = [city] if city else await self._cities(tenant)
        found = []
        for c in cities:
            layout = await self._layout(tenant, c)
            total = PoolStats()
            for key in layout.keys:
                total += await self._subpool_stats(key, tenant, c)
            found.append((c, total))
        return found

    @_one_connection
    async def take_expired(self, tenant: str, city: str) -> int:
        """Bindings whose number this pool reclaimed at their end since the last take (by any process): each is
        handed to exactly one taker (GETDEL), so the processes' counts add up to every expiry once."""
        taken = 0
        for key in (await self._layout(tenant, city)).keys:
            taken += int(await self.redis.getdel(pool_keys.expired_key_in(key)) or 0)
        return taken

    async def _cities(self, tenant: str) -> list[str]:
        return sorted(_text(c) for c in await self.redis.smembers(pool_keys.tenant_cities_key(tenant)))

    async def _subpool_stats(self, key: str, tenant: str, city: str) -> PoolStats:
        # Each call sweeps a bounded batch before counting (Redis is never blocked long); repeated until
        # nothing lapsed is left, so the counts are exact unless the backlog exceeds the cap.
        for _ in range(_STATS_SWEEP_CALLS):
            reply = await self.scripts.pool_stats(self.redis, [key], [*self._head(tenant, city), _STATS_SWEEP_BUDGET])
            total, available, in_use, locked, cooling, settled, net_taken, now_ms = (int(v) for v in reply)
            if settled:
                break
        return PoolStats(total, available, in_use, locked, cooling, net_taken, now_ms)

    # ---- history --------------------------------------------------------------------------------------

    @_one_connection
    async def history(
        self, number: str, page_size: int, after: HistoryCursor | None, visible: TenantFilter = _everyone
    ) -> tuple[list[Event], HistoryCursor | None]:
        """Events of the number oldest first: its block's (import) merged with its own, paged. Returns the
        page and where the next one starts (None at the end)."""
        tenant, city = await self.owner(number, visible)
        layout = await self._layout(tenant, city)
        block_after, number_after = after or HistoryCursor("", "")
        block_key = pool_keys.block_history_key(number[:11])
        number_key = layout.history_key(number)
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
