"""Binding's Redis state: its own keys (order claims, the per-tenant index, per-binding mutation locks) and
`BindingStore`, which holds them beside the shared records, history and route table over one client.

    np:ord:{<tenant>:<order>}   STRING  "<p|d>|<binding_id>|<fingerprint>|<deadline_ms>"  PXAT end + retention
    np:ord:pending:{<shard>}    ZSET    binding ids of creates not finished yet -> their deadline_ms; 16 shards
    np:tl:{<tenant>:<shard>}    ZSET    members binding ids (time-ordered), all scores 0, read BYLEX; 16 shards
    np:b:{<binding_id>}:lk      STRING  a random token while an update or delete runs                PX lease

The binding record, the per-number history and the order key's name (read by the invariant checker too) are the
shared schema in numprotect.core.binding_records.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from numprotect.core.binding_records import (
    BindingRecord,
    BindingRecordStore,
    StoredBinding,
    binding_key,
    get_stored_bindings,
    number_history_key,
    order_key,
)
from numprotect.core.errors import Aborted
from numprotect.core.redis_client import LuaScript, RedisClient, as_text
from numprotect.core.replica_wait import ReplicaWait
from numprotect.core.routes import Route, RouteConflictError, RouteTable, axn_key
from numprotect.services.binding.deadline import CallBudget
from numprotect.services.binding.settings import BindingSettings

log = logging.getLogger(__name__)

TENANT_SHARDS = 16
# The record's field naming the parties B allocation may hold instead of the record's `b` (an update's ReplaceParty
# whose record write did not land), comma-separated; only the binding service reads it.
HELD_PARTIES_FIELD = "pbh"
# A mutation lock outlives the call's budget by this much (clock skew, the answer's margin); also its shortest lease.
LOCK_GRACE_MS = 1000
# Pause between attempts to release a lock Redis did not answer for.
RELEASE_RETRY_SECONDS = 0.1


def new_binding_id(now_ms: int) -> str:
    """ "b" + 12 hex digits of the creation ms + 10 random hex digits: ids sort by creation time."""
    return f"b{now_ms:012x}{secrets.token_hex(5)}"


def id_floor(at_ms: int) -> str:
    """The smallest binding id created at or after `at_ms` (for BYLEX ranges)."""
    return f"b{max(at_ms, 0):012x}"


def tenant_index_key(tenant_id: str, shard: int) -> str:
    return f"np:tl:{{{tenant_id}:{shard}}}"


def pending_creates_key(shard: int) -> str:
    # Order keys are np:ord:{...}: the brace right after "np:ord:" keeps the two families apart.
    return f"np:ord:pending:{{{shard}}}"


def mutation_lock_key(binding_id: str) -> str:
    return f"np:b:{{{binding_id}}}:lk"


def tenant_shard(binding_id: str) -> int:
    return zlib.crc32(binding_id.encode()) % TENANT_SHARDS


def legacy_fingerprint(mode: int, party_a: str, party_b: str) -> str:
    """The fingerprint order keys written before version 2 hold (mode and parties only; 16 hex digits)."""
    return hashlib.blake2b(f"{mode}:{party_a}:{party_b}".encode(), digest_size=8).hexdigest()


def request_fingerprint(canonical_request: str) -> str:
    """What makes a repeated create the same request: every field of it ("2" + 16 hex digits of a hash)."""
    return "2" + hashlib.blake2b(canonical_request.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Claim:
    """The answer of a claim: outcome claimed/done/busy/conflict/taken and the binding id it concerns
    (taken: the previous holder, whose create missed its deadline and can no longer commit)."""

    outcome: str
    binding_id: str


class OrderClaims:
    """The idempotency key of (tenant_id, out_order_id): claimed by one create, marked done at its commit."""

    _claim = LuaScript.beside(__file__, "order_claim.lua")
    _commit = LuaScript.beside(__file__, "order_commit.lua")
    _resolve = LuaScript.beside(__file__, "order_resolve.lua")
    _release = LuaScript.beside(__file__, "compare_and_delete.lua")

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    @staticmethod
    def pending_value(binding_id: str, fp: str, deadline_ms: int) -> str:
        return f"p|{binding_id}|{fp}|{deadline_ms}"

    async def claim(
        self,
        tenant_id: str,
        out_order_id: str,
        binding_id: str,
        fp: str,
        deadline_ms: int,
        expire_at_ms: int,
        *,
        legacy_fp: str = "",
    ) -> Claim:
        """Claims the order (`legacy_fp`: the fingerprint an order key of before version 2 would hold)."""
        reply = await self._claim(
            self.redis, [order_key(tenant_id, out_order_id)], [binding_id, fp, deadline_ms, expire_at_ms, legacy_fp]
        )
        return Claim(as_text(reply[0]), as_text(reply[1]))

    async def commit(
        self, tenant_id: str, out_order_id: str, binding_id: str, fp: str, deadline_ms: int, expire_at_ms: int
    ) -> bool:
        pending = self.pending_value(binding_id, fp, deadline_ms)
        done = f"d|{binding_id}|{fp}|0"
        reply = await self._commit(self.redis, [order_key(tenant_id, out_order_id)], [pending, done, expire_at_ms])
        return int(reply) == 1

    async def resolve(self, tenant_id: str, out_order_id: str, binding_id: str, *, own: bool) -> str:
        """Decides a create of the order that did not finish: "done" (it committed: roll it forward), "aborted" (its
        claim is removed now, it can never commit: roll it back), "gone" (the claim is not its: roll back), or "busy"
        (its deadline has not passed; only when not `own`: the create itself may abort its claim at any time)."""
        reply = await self._resolve(self.redis, [order_key(tenant_id, out_order_id)], [binding_id, "1" if own else "0"])
        return as_text(reply)

    async def forget(self, tenant_id: str, out_order_id: str, binding_id: str, fps: Sequence[str]) -> None:
        """Frees a done order whose binding record is past its retention (the order id may serve again); `fps`: the
        fingerprints it may hold."""
        for fp in fps:
            await self._release(self.redis, [order_key(tenant_id, out_order_id)], [f"d|{binding_id}|{fp}|0"])

    async def extend(self, tenant_id: str, out_order_id: str, expire_at_ms: int) -> None:
        """Keeps the order key at least until `expire_at_ms` (the binding's record was kept longer)."""
        await self.redis.pexpireat(order_key(tenant_id, out_order_id), expire_at_ms, gt=True)

    async def committed_binding(self, tenant_id: str, out_order_id: str) -> str | None:
        """The binding id a done order points to, or None."""
        raw = await self.redis.get(order_key(tenant_id, out_order_id))
        if raw is None:
            return None
        state, binding_id, *_ = as_text(raw).split("|")
        return binding_id if state == "d" else None


class PendingCreates:
    """Creates that are not finished (committed and completed, or rolled back), by deadline: what the recovery of
    each binding process resolves once a deadline has passed, so a crashed create needs no retry to be resolved."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    async def add(self, binding_id: str, deadline_ms: int) -> None:
        await self.redis.zadd(pending_creates_key(tenant_shard(binding_id)), {binding_id: deadline_ms})

    async def remove(self, binding_id: str) -> None:
        await self.redis.zrem(pending_creates_key(tenant_shard(binding_id)), binding_id)

    async def overdue(self, before_ms: int, per_shard: int) -> list[str]:
        """Up to `per_shard` ids of each shard whose deadline is before `before_ms`."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(TENANT_SHARDS):
                pipe.zrangebyscore(pending_creates_key(shard), "-inf", f"({before_ms}", start=0, num=per_shard)
            replies = await pipe.execute()
        return [as_text(member) for reply in replies for member in reply]


class TenantIndex:
    """Every binding of a tenant, in creation order, spread over TENANT_SHARDS keys (no single hot key)."""

    def __init__(self, redis: RedisClient, retention_ms: int, max_life_ms: int) -> None:
        self.redis = redis
        # An id older than this cannot belong to a record any more (its life and retention are over).
        self.horizon_ms = retention_ms + max_life_ms

    async def add(self, tenant_id: str, binding_id: str, now_ms: int) -> None:
        key = tenant_index_key(tenant_id, tenant_shard(binding_id))
        await self.redis.zadd(key, {binding_id: 0})
        # Ids past life + retention are trimmed now and then (each add of a shard has a 1 in 64 chance), which
        # bounds the index without a sweeper and without a second command on most creates.
        if secrets.randbelow(64) == 0:
            await self.redis.zremrangebylex(key, "-", "(" + id_floor(now_ms - self.horizon_ms))

    async def remove(self, tenant_id: str, binding_ids: Sequence[str]) -> None:
        for binding_id in binding_ids:
            await self.redis.zrem(tenant_index_key(tenant_id, tenant_shard(binding_id)), binding_id)

    async def page(self, tenant_id: str, after: str, size: int) -> tuple[list[str], bool]:
        """Up to `size` ids after `after` in creation order, and whether more may follow."""
        low = "(" + after if after else "-"
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(TENANT_SHARDS):
                pipe.zrange(tenant_index_key(tenant_id, shard), low, "+", bylex=True, offset=0, num=size)
            replies = await pipe.execute()
        merged = sorted(as_text(member) for reply in replies for member in reply)
        more = len(merged) > size or any(len(reply) == size for reply in replies)
        return merged[:size], more


class MutationLocks:
    """One update or delete at a time per binding (a second one gets ABORTED and may retry).

    A lock lasts as long as the call that takes it may (its budget + LOCK_GRACE_MS, at most the create lease) and
    is released on every way out, also a failed one: when the release itself cannot reach Redis, it is tried again
    in the background until the lease ends, so a retry after Redis is back finds the binding free at once."""

    _release = LuaScript.beside(__file__, "compare_and_delete.lua")

    def __init__(self, redis: RedisClient, lease_ms: int) -> None:
        self.redis = redis
        self.lease_ms = lease_ms
        self._releasing: set[asyncio.Task[None]] = set()

    def lease_for(self, budget: CallBudget | None) -> int:
        if budget is None:
            return self.lease_ms
        return max(min(self.lease_ms, budget.remaining_ms() + LOCK_GRACE_MS), LOCK_GRACE_MS)

    @asynccontextmanager
    async def hold(
        self, binding_id: str, *, wait_seconds: float = 0.0, budget: CallBudget | None = None
    ) -> AsyncIterator[None]:
        """The binding's lock, waiting up to `wait_seconds` for it; ABORTED when another call keeps it longer.
        With a `budget`, the lease fits the call and the release waits no longer than the budget."""
        token = secrets.token_hex(8)
        key = mutation_lock_key(binding_id)
        lease_ms = self.lease_for(budget)
        give_up = time.monotonic() + wait_seconds
        lease_end = time.monotonic() + lease_ms / 1000
        try:
            while not await self.acquire(key, token, lease_ms):
                if time.monotonic() >= give_up:
                    raise Aborted(f"binding {binding_id} is being changed by another call; retry")
                await asyncio.sleep(0.01)
        except Aborted:
            raise
        except BaseException:
            # A SET without its reply (Redis slow, the call's budget over) may have landed: release it anyway.
            self._start_release(key, token, lease_end)
            raise
        try:
            yield
        finally:
            release = self._start_release(key, token, lease_end)
            # Not cancelled with the call: an unfinished release goes on in the background.
            await asyncio.wait({release}, timeout=None if budget is None else budget.remaining())

    async def acquire(self, key: str, token: str, lease_ms: int) -> bool:
        """Takes the lock for `token`; True also when it holds the lock already: a cluster client re-sends a command
        whose reply it lost, and a plain SET NX would then find the key its first run set (docs/redis-schema.md,
        "Scripts run twice")."""
        before = await self.redis.set(key, token, nx=True, px=lease_ms, get=True)
        return before is None or (isinstance(before, str | bytes) and as_text(before) == token)

    def _start_release(self, key: str, token: str, lease_end: float) -> asyncio.Task[None]:
        release = asyncio.get_running_loop().create_task(self._release_until(key, token, lease_end))
        self._releasing.add(release)
        release.add_done_callback(self._releasing.discard)
        return release

    async def _release_until(self, key: str, token: str, lease_end: float) -> None:
        """Deletes the lock if it is still ours; tried again until the lease ends (then it lapses by itself)."""
        while True:
            try:
                await self._release(self.redis, [key], [token])
                return
            except Exception as exc:
                if time.monotonic() + RELEASE_RETRY_SECONDS >= lease_end:
                    log.warning(
                        "could not release a binding's lock; it lapses with its lease", extra={"error": repr(exc)}
                    )
                    return
            await asyncio.sleep(RELEASE_RETRY_SECONDS)


def route_of(record: BindingRecord) -> Route:
    """The route translation reads for a binding (the record's fields a call decision needs)."""
    return Route(
        binding_id=record.binding_id,
        tenant_id=record.tenant_id,
        mode=record.mode,
        party_a=record.party_a,
        party_b=record.party_b,
        call_restriction=record.call_restriction,
        recording_enabled=record.recording_enabled,
        allow_any_caller=record.allow_any_caller,
        expire_ms=record.expire_ms,
    )


@dataclass(frozen=True)
class BindingStore:
    """Everything the binding service keeps in Redis, over one client: the records and per-number history
    (shared schema), the route table (shared schema), order claims, the tenant index and the mutation locks."""

    redis: RedisClient
    records: BindingRecordStore
    routes: RouteTable
    orders: OrderClaims
    pending: PendingCreates
    tenants: TenantIndex
    locks: MutationLocks
    # NUMPROTECT_REDIS_WAIT_REPLICAS: creates, updates and deletes are acknowledged once replicas have them.
    replicas: ReplicaWait | None = None

    @classmethod
    def over(cls, redis: RedisClient, settings: BindingSettings, replicas: ReplicaWait | None = None) -> BindingStore:
        return cls(
            replicas=replicas,
            redis=redis,
            records=BindingRecordStore(redis, settings.retention_ms),
            routes=RouteTable(redis),
            orders=OrderClaims(redis),
            pending=PendingCreates(redis),
            tenants=TenantIndex(redis, settings.retention_ms, settings.max_ttl_ms),
            locks=MutationLocks(redis, settings.create_lease_ms),
        )

    async def get(self, binding_id: str) -> StoredBinding | None:
        """The stored binding (pending or committed), or None when there is no record."""
        return (await get_stored_bindings(self.redis, [binding_id])).get(binding_id)

    async def request_of(self, binding_id: str) -> str | None:
        """The canonical request a create wrote into its record (field `rq`), or None (a record of before version 2,
        or none)."""
        raw = await self.redis.hget(binding_key(binding_id), "rq")
        return None if raw is None else as_text(raw)

    async def held_parties(self, binding_id: str) -> list[str]:
        """The parties B allocation may hold for the binding instead of its record's (HELD_PARTIES_FIELD: written
        before a ReplaceParty, cleared with the record's party), oldest first."""
        raw = await self.redis.hget(binding_key(binding_id), HELD_PARTIES_FIELD)
        return [party for party in as_text(raw).split(",") if party] if raw is not None else []

    async def complete(self, record: BindingRecord) -> None:
        """Rolls a committed create forward: its routes until the binding's end (they were written to lapse at the
        create's deadline), then the record committed, then off the pending list. Repeatable. The caller is the
        create that committed, or holds the binding's lock (so no update or delete runs meanwhile)."""
        if not record.delete_ms:
            await self.put_routes(record)  # an expired binding's keys are deleted by the script, not set
        await self.records.activate(record.binding_id, record.end_ms())
        await self.pending.remove(record.binding_id)
        await self.replicated(record)

    async def replicated(self, record: BindingRecord) -> None:
        """Returns once NUMPROTECT_REDIS_WAIT_REPLICAS replicas have every write of the binding so far (its record,
        history, order, tenant index and routes: one wait per master), else raises Unavailable: the caller is not
        told OK, and the request's retry (idempotent) waits again. Nothing to do when the setting is off."""
        if self.replicas is None:
            return
        shard = tenant_shard(record.binding_id)
        await self.replicas.after(
            [
                binding_key(record.binding_id),
                number_history_key(record.virtual_number),
                order_key(record.tenant_id, record.out_order_id),
                tenant_index_key(record.tenant_id, shard),
                pending_creates_key(shard),
                axn_key(record.virtual_number),  # every route key of the number shares its hash tag
            ]
        )

    async def get_many(self, binding_ids: Sequence[str]) -> dict[str, StoredBinding]:
        return await get_stored_bindings(self.redis, binding_ids)

    async def put_routes(
        self, record: BindingRecord, replaces: Sequence[str] = (), *, until_ms: int | None = None
    ) -> None:
        """Routes calls for the binding (until `until_ms` when given, else its expiry); ABORTED (retry) while another
        binding still holds one of its keys."""
        route = route_of(record)
        try:
            await self.routes.put(record.virtual_number, route, record.extension, replaces=replaces, until_ms=until_ms)
        except RouteConflictError as exc:
            raise Aborted(f"number {record.virtual_number} is still routed for binding {exc.holder}; retry") from None

    async def remove_routes(self, record: BindingRecord) -> None:
        """Stops calls for the binding (only keys still holding it are removed)."""
        await self.routes.remove(record.virtual_number, route_of(record), record.extension)
