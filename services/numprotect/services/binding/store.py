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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from numprotect.core import event_outbox
from numprotect.core.binding_records import (
    BindingRecord,
    BindingRecordStore,
    StoredBinding,
    binding_key,
    decode_stored,
    get_stored_bindings,
    number_history_key,
    order_key,
)
from numprotect.core.errors import Aborted
from numprotect.core.redis_batch import Command, raise_first, send_together
from numprotect.core.redis_client import LuaScript, RedisClient, as_text
from numprotect.core.replica_wait import ReplicaWait
from numprotect.core.routes import NumberHistory, Route, RouteConflictError, RouteTable, axn_key
from numprotect.services.binding.deadline import CallBudget
from numprotect.services.binding.settings import BindingSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

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
        listed: bool = False,
    ) -> Claim:
        """Claims the order (`legacy_fp`: the fingerprint an order key of before version 2 would hold); `listed`: and
        puts the create on the pending-creates list in the same round trip (step 1 of a create: the entry must exist
        before the create's record, which a later step writes, not before its claim). A claim that is not the
        create's (done, busy, conflict) leaves an entry without record, which the caller removes (else the recovery
        does). When the entry cannot be written, a claim the create took is given up at once (the recovery would
        not find the create) and the entry's error raised."""
        commands = [
            Command.run(
                self._claim,
                [order_key(tenant_id, out_order_id)],
                [binding_id, fp, deadline_ms, expire_at_ms, legacy_fp],
            )
        ]
        if listed:
            commands.append(PendingCreates.add_command(binding_id, deadline_ms))
        reply, *entry = await send_together(self.redis, commands)
        if isinstance(reply, Exception):
            raise reply
        claim = Claim(as_text(reply[0]), as_text(reply[1]))
        if entry and isinstance(entry[0], Exception):
            if claim.outcome in ("claimed", "taken"):
                try:
                    await self.resolve(tenant_id, out_order_id, binding_id, own=True)
                except Exception as exc:  # the claim lapses at its deadline: a retry then takes the order over
                    log.warning("could not give up a claim without its pending entry", extra={"error": repr(exc)})
            raise entry[0]
        return claim

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

    def extend_command(self, tenant_id: str, out_order_id: str, expire_at_ms: int) -> Command:
        """Keeps the order key at least until `expire_at_ms` (the binding's record was kept longer)."""
        return Command.of("PEXPIREAT", order_key(tenant_id, out_order_id), expire_at_ms, "GT")

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
        raise_first(await send_together(self.redis, [self.add_command(binding_id, deadline_ms)]))

    async def remove(self, binding_id: str) -> None:
        raise_first(await send_together(self.redis, [self.remove_command(binding_id)]))

    @staticmethod
    def add_command(binding_id: str, deadline_ms: int) -> Command:
        return Command.of("ZADD", pending_creates_key(tenant_shard(binding_id)), deadline_ms, binding_id)

    @staticmethod
    def remove_command(binding_id: str) -> Command:
        return Command.of("ZREM", pending_creates_key(tenant_shard(binding_id)), binding_id)

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
        raise_first(await send_together(self.redis, self.add_commands(tenant_id, binding_id, now_ms)))

    def add_commands(self, tenant_id: str, binding_id: str, now_ms: int) -> list[Command]:
        """Indexes the binding: the commands, to send with the create's other writes."""
        key = tenant_index_key(tenant_id, tenant_shard(binding_id))
        commands = [Command.of("ZADD", key, 0, binding_id)]
        # Ids past life + retention are trimmed now and then (each add of a shard has a 1 in 64 chance), which
        # bounds the index without a sweeper and without a second command on most creates.
        if secrets.randbelow(64) == 0:
            commands.append(Command.of("ZREMRANGEBYLEX", key, "-", "(" + id_floor(now_ms - self.horizon_ms)))
        return commands

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


@dataclass
class Lease:
    """A binding's lock held by one call: its key, the call's token, when its lease ends (monotonic) and whether a
    write released it already (a delete's record write does, in the same script)."""

    key: str
    token: str
    ends_at: float
    released: bool = False

    @property
    def holder(self) -> tuple[str, str]:
        """(key, token): what a write that releases the lock deletes, and the value it must still hold."""
        return self.key, self.token


@dataclass(frozen=True)
class LockedRead:
    """What lock_and_read.lua found: outcome "locked" (the call holds `lease`), "pending" (a create not committed:
    nothing locked) or "missing" (no record, or another tenant's: nothing locked), and the record's fields."""

    outcome: str
    fields: dict[str, str]
    lease: Lease | None


class MutationLocks:
    """One update or delete at a time per binding (a second one gets ABORTED and may retry).

    A lock lasts as long as the call that takes it may (its budget + LOCK_GRACE_MS, at most the create lease) and
    is released on every way out, also a failed one: when the release itself cannot reach Redis, it is tried again
    in the background until the lease ends, so a retry after Redis is back finds the binding free at once. Updates
    and deletes take it in the step that reads the record (`hold_record`: one script, the lock and the record share
    the slot of their tag {binding_id})."""

    _take = LuaScript.beside(__file__, "lock_and_read.lua")
    _release = LuaScript.beside(__file__, "compare_and_delete.lua")

    def __init__(self, redis: RedisClient, lease_ms: int) -> None:
        self.redis = redis
        self.lease_ms = lease_ms
        self._releasing: set[asyncio.Task[None]] = set()

    def lease_for(self, budget: CallBudget | None) -> int:
        if budget is None:
            return self.lease_ms
        return max(min(self.lease_ms, budget.remaining_ms() + LOCK_GRACE_MS), LOCK_GRACE_MS)

    def _lease(self, binding_id: str, lease_ms: int) -> Lease:
        return Lease(mutation_lock_key(binding_id), secrets.token_hex(8), time.monotonic() + lease_ms / 1000)

    @asynccontextmanager
    async def hold(
        self, binding_id: str, *, wait_seconds: float = 0.0, budget: CallBudget | None = None
    ) -> AsyncIterator[Lease]:
        """The binding's lock, waiting up to `wait_seconds` for it; ABORTED when another call keeps it longer.
        With a `budget`, the lease fits the call."""
        lease_ms = self.lease_for(budget)
        lease = self._lease(binding_id, lease_ms)

        async def take() -> bool | None:
            return True if await self.acquire(lease.key, lease.token, lease_ms) else None

        await self._taking(binding_id, lease, wait_seconds, take)
        try:
            yield lease
        finally:
            await self.release(lease, budget)

    @asynccontextmanager
    async def hold_record(
        self, binding_id: str, tenant_id: str, *, wait_seconds: float = 0.0, budget: CallBudget | None = None
    ) -> AsyncIterator[LockedRead]:
        """The tenant's binding record, read in the step that takes its lock: locked only when the record is the
        tenant's and committed (another tenant's binding is never locked). Waits up to `wait_seconds` while another
        call holds the lock, then ABORTED."""
        lease_ms = self.lease_for(budget)
        lease = self._lease(binding_id, lease_ms)
        keys = [binding_key(binding_id), lease.key]

        async def take() -> list[Any] | None:
            reply: list[Any] = await self._take(self.redis, keys, [tenant_id, lease.token, lease_ms])
            return None if as_text(reply[0]) == "busy" else reply

        reply = await self._taking(binding_id, lease, wait_seconds, take)
        outcome = as_text(reply[0])
        fields = {as_text(reply[i]): as_text(reply[i + 1]) for i in range(1, len(reply) - 1, 2)}
        if outcome != "locked":
            yield LockedRead(outcome, fields, None)
            return
        try:
            yield LockedRead(outcome, fields, lease)
        finally:
            await self.release(lease, budget)

    async def _taking(
        self, binding_id: str, lease: Lease, wait_seconds: float, take: Callable[[], Awaitable[T | None]]
    ) -> T:
        """What `take()` answers, tried every 10 ms while it answers None (another call holds the lock), at most
        `wait_seconds`, then ABORTED. A take that raised may have landed without its reply reaching us (Redis slow,
        the call's budget over): the lease is released in the background anyway."""
        give_up = time.monotonic() + wait_seconds
        try:
            while (taken := await take()) is None:
                if time.monotonic() >= give_up:
                    raise Aborted(f"binding {binding_id} is being changed by another call; retry")
                await asyncio.sleep(0.01)
        except Aborted:
            raise
        except BaseException:
            self._start_release(lease)
            raise
        return taken

    async def acquire(self, key: str, token: str, lease_ms: int) -> bool:
        """Takes the lock for `token`; True also when it holds the lock already: a cluster client re-sends a command
        whose reply it lost, and a plain SET NX would then find the key its first run set (docs/redis-schema.md,
        "Scripts run twice")."""
        before = await self.redis.set(key, token, nx=True, px=lease_ms, get=True)
        return before is None or (isinstance(before, str | bytes) and as_text(before) == token)

    async def release(self, lease: Lease, budget: CallBudget | None = None) -> None:
        """Deletes the lock if it is still the lease's (unless a write released it already), waiting at most what is
        left of `budget`. When Redis does not answer in time, the release goes on in the background until the lease
        ends; a cancellation is passed on, a failure is not (what the call did stands)."""
        if lease.released:
            return
        try:
            async with asyncio.timeout(None if budget is None else budget.remaining()):
                await self._release(self.redis, [lease.key], [lease.token])
        except BaseException as exc:
            self._start_release(lease)
            if not isinstance(exc, Exception):
                raise

    def _start_release(self, lease: Lease) -> None:
        release = asyncio.get_running_loop().create_task(self._release_until(lease))
        self._releasing.add(release)
        release.add_done_callback(self._releasing.discard)

    async def _release_until(self, lease: Lease) -> None:
        """Deletes the lock if it is still ours; tried again until the lease ends (then it lapses by itself)."""
        while True:
            try:
                await self._release(self.redis, [lease.key], [lease.token])
                return
            except Exception as exc:
                if time.monotonic() + RELEASE_RETRY_SECONDS >= lease.ends_at:
                    log.warning(
                        "could not release a binding's lock; it lapses with its lease", extra={"error": repr(exc)}
                    )
                    return
            await asyncio.sleep(RELEASE_RETRY_SECONDS)


def parties_held(fields: Mapping[str, str]) -> list[str]:
    """The parties B allocation may hold for the binding instead of its record's (HELD_PARTIES_FIELD of the record's
    fields: written before a ReplaceParty, cleared with the record's party), oldest first."""
    return [party for party in fields.get(HELD_PARTIES_FIELD, "").split(",") if party]


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

    async def write_pending(
        self,
        record: BindingRecord,
        *,
        reservation_id: str,
        city_fallback: bool,
        keep_until_ms: int,
        request: str,
        routes_until_ms: int,
    ) -> bool:
        """Step 3 of a create, in one round trip: the pending record (with the create's request), the number's
        routes until `routes_until_ms` (the create's deadline: they lapse then unless the create completes) with
        the binding's entry in the number's history (one script: the same slot), and the tenant index. None needs
        another's reply; the pending-creates entry, written with the claim, already leads the recovery to each.
        False when a record of the id exists already (not this create's); ABORTED, routes and history unwritten,
        when another binding holds one of the route keys; the first error when a command failed."""
        commands = [
            self.records.create_command(
                record,
                reservation_id=reservation_id,
                city_fallback=city_fallback,
                keep_until_ms=keep_until_ms,
                extra={"rq": request},
            ),
            self._routes_command(
                record, until_ms=routes_until_ms, history=self.records.history(record.virtual_number, record.expire_ms)
            ),
            *self.tenants.add_commands(record.tenant_id, record.binding_id, record.create_ms),
        ]
        replies = await send_together(self.redis, commands)
        if not isinstance(replies[0], Exception) and not self.records.created(replies[0]):
            return False
        raise_first(replies)
        self._check_routes(record, replies[1])
        return True

    async def order_and_request(self, binding_id: str, unused_entry: str) -> tuple[StoredBinding | None, str | None]:
        """The binding a done order names and the request it was created from (its record's `rq`; None for a record
        of before version 2), read in the round trip that removes `unused_entry` from the pending-creates list (the
        entry a create added with a claim that turned out not to be its own)."""
        raw, _ = await send_together(
            self.redis,
            [Command.of("HGETALL", binding_key(binding_id)), self.pending.remove_command(unused_entry)],
        )
        if isinstance(raw, Exception):
            raise raw
        request = raw.get(b"rq", raw.get("rq"))
        return decode_stored(binding_id, raw), None if request is None else as_text(request)

    async def complete(self, record: BindingRecord) -> None:
        """Rolls a committed create forward: its routes until the binding's end (they were written to lapse at the
        create's deadline) and the record marked committed, in one round trip; then off the pending-creates list,
        only once both landed (the entry is how the recovery finds a completion that failed: it completes a
        committed record on the list again, routes included). Repeatable. The caller is the create that committed,
        or holds the binding's lock (so no update or delete runs meanwhile)."""
        # The commit mark records binding.created in the record's slot (its hints for the events service, the slot
        # in a ring and the binding's expiry in an expiry ring, go in the same round trip).
        commands = self.records.activate_commands(record.binding_id, record.end_ms(), expire_ms=record.expire_ms)
        activated = len(commands)
        if not record.delete_ms:  # an expired binding's keys are deleted by the script, not set
            commands.append(self._routes_command(record))
        replies = await send_together(self.redis, commands)
        event_outbox.first_reply(replies[:activated])
        raise_first(replies[activated:])
        if not record.delete_ms:
            self._check_routes(record, replies[activated])
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

    async def put_routes(self, record: BindingRecord, replaces: Sequence[str] = ()) -> None:
        """Routes calls for the binding until its expiry; ABORTED (retry) while another binding still holds one of
        its keys."""
        reply = raise_first(await send_together(self.redis, [self._routes_command(record, replaces)]))[0]
        self._check_routes(record, reply)

    async def remove_routes(self, record: BindingRecord) -> None:
        """Stops calls for the binding (only keys still holding it are removed)."""
        raise_first(await send_together(self.redis, [self._remove_routes_command(record)]))

    async def remove_written(self, record: BindingRecord, *, indexed: bool) -> list[Exception]:
        """Removes what a create that failed wrote beside its record, in one round trip: its routes (only keys still
        holding it), its entry in the number's history and, when `indexed`, in the tenant index. Raises the routes'
        error; returns the entries' (readers ignore entries without a record: worth a log line, not a retry)."""
        commands = [
            self._remove_routes_command(record),
            Command.of("ZREM", number_history_key(record.virtual_number), record.binding_id),
        ]
        if indexed:
            shard = tenant_shard(record.binding_id)
            commands.append(Command.of("ZREM", tenant_index_key(record.tenant_id, shard), record.binding_id))
        routes, *entries = await send_together(self.redis, commands)
        if isinstance(routes, Exception):
            raise routes
        return [reply for reply in entries if isinstance(reply, Exception)]

    def _routes_command(
        self,
        record: BindingRecord,
        replaces: Sequence[str] = (),
        *,
        until_ms: int | None = None,
        history: NumberHistory | None = None,
    ) -> Command:
        return self.routes.put_command(
            record.virtual_number,
            route_of(record),
            record.extension,
            replaces=replaces,
            until_ms=until_ms,
            history=history,
        )

    def _remove_routes_command(self, record: BindingRecord) -> Command:
        return self.routes.remove_command(record.virtual_number, route_of(record), record.extension)

    @staticmethod
    def _check_routes(record: BindingRecord, reply: Any) -> None:
        try:
            RouteTable.check(reply)
        except RouteConflictError as exc:
            raise Aborted(f"number {record.virtual_number} is still routed for binding {exc.holder}; retry") from None
