"""The checks, one per key family the walk meets, each over a batch of keys with pipelined reads.

Every check returns `Finding`s: a violation and, when the state it judged can change under live traffic (a route
and its binding are in different slots, so no read sees both at once), the key to check again after a pause. The
key layouts come from the shared schemas (numprotect.core.routes, binding_records, pool_keys, cdr_keys); the
patterns below only recognise their names.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.binding_records import (
    BindingRecord,
    OrderState,
    StoredBinding,
    decode_stored,
    get_stored_bindings,
    number_history_key,
    order_key,
)
from numprotect.core.cdr_keys import MAX_BUCKETS, Bucket, Buckets, bucket_index, count_key
from numprotect.core.doctor.keyspace import Pace
from numprotect.core.doctor.report import (
    BINDING_HISTORY_GAP,
    BINDING_WITHOUT_ROUTES,
    CDR_WRONG_BUCKET,
    DUPLICATE_CDR,
    NUMBER_IN_TWO_POOLS,
    POOL_COUNTERS,
    RESERVATION_WITHOUT_BINDING,
    ROUTE_WITHOUT_BINDING,
    Report,
    Violation,
)
from numprotect.core.errors import InvalidArgument
from numprotect.core.phone import mask
from numprotect.core.pool_keys import (
    BLOCK_SIZE,
    MAX_SUBPOOLS,
    Handle,
    block_owner_key,
    hash_key_in,
    pool_key,
    subpool_key,
    subpool_of,
    subpool_share,
)
from numprotect.core.redis_client import LuaScript, RedisClient, as_text
from numprotect.core.routes import Route

# A binding record about to be purged (end + retention) may already have left its number's history.
_PURGE_MARGIN_MS = 60_000

_ROUTE = re.compile(r"np:rt:\{(?P<x>[^}]*)\}:(?:c:(?P<caller>.+)|n|e:.+)")
_BINDING = re.compile(r"np:b:\{(?P<id>[^}]*)\}")
# A sub-pool's base key: sub-pool 0 np:alloc:{pool:<tenant>:<city>}, sub-pool k np:alloc:{pool:<t>:<c>:s<k>.<salt>}.
_SUBPOOL = r"np:alloc:\{pool:(?P<tenant>[^:}]+):(?P<city>[^:}]+)(?::s(?P<index>\d+)\.\d+)?\}"
_POOL = re.compile(_SUBPOOL)
_RESERVATIONS = re.compile(rf"(?P<pool>{_SUBPOOL}):r:(?P<number>\d+)")
_OWNER = re.compile(r"np:alloc:\{blk:(?P<block>\d+)\}:owner")
_CDR_STREAM = re.compile(r"np:cdr:\{(?P<tag>[^}]*)\}:s")
_EVENT_FIELD = re.compile(r"h(\d+)")


@dataclass(frozen=True, slots=True)
class Finding:
    violation: Violation
    recheck: str | None  # the key to check again before reporting (None: the finding cannot be a passing state)


@dataclass
class Judge:
    """What every check needs: the time (Redis's clock), binding's create lease and recovery interval, and where to
    count what it read."""

    now_ms: Callable[[], int]
    create_lease_ms: int
    recovery_ms: int
    grace_ms: int
    report: Report

    def deadline(self, create_ms: int) -> int:
        """A create's deadline D when its order key no longer says: its start plus the lease."""
        return create_ms + self.create_lease_ms

    def in_flight(self, deadline_ms: int) -> bool:
        """A create may still be running or waiting for recovery (docs/binding.md, "Create"): binding resolves one
        that did not finish within about 1 s after its deadline plus one recovery round."""
        return self.now_ms() < deadline_ms + 1_000 + self.recovery_ms + self.grace_ms


@dataclass(frozen=True, slots=True)
class Found:
    """A binding record as the checks judge it. committed: its status says so, or its order key names it done (the
    commit point; completing the record and routes may still be under way). deadline_ms: its create's deadline."""

    stored: StoredBinding
    committed: bool
    deadline_ms: int

    @property
    def incomplete(self) -> bool:
        return self.stored.pending


def masked_key(key: str) -> str:
    """A key as shown to operators: a party's number in a route key is masked, as in every log."""
    match = _ROUTE.fullmatch(key)
    if match and match["caller"]:
        return key[: match.start("caller")] + mask(match["caller"])
    return key


def own_route_keys(record: BindingRecord) -> list[str]:
    """The route keys a binding occupies (routes.Route.keys, the one definition; it reads mode and parties only)."""
    route = Route(record.binding_id, record.tenant_id, record.mode, record.party_a, record.party_b, 0, False, False, 0)
    try:
        return route.keys(record.virtual_number, record.extension)
    except ValueError:
        return []


async def _pipelined(redis: RedisClient, calls: Iterable[tuple[str, Sequence[Any]]]) -> list[Any]:
    """Runs the commands in one pipeline; a command's error (e.g. WRONGTYPE) comes back in its place."""
    commands = list(calls)
    if not commands:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for name, args in commands:
            getattr(pipe, name)(*args)
        return list(await pipe.execute(raise_on_error=False))


# What _record_problem says besides a problem: judge the binding further, or skip it (a create in flight).
_FURTHER = None
_IN_FLIGHT = ""


def _record_problem(found: Found | None, judge: Judge, binding_id: str) -> str | None:
    """Why the binding cannot back a route or a reservation: a text; _FURTHER when it can as far as its record
    says (the caller checks the rest); _IN_FLIGHT when its create may still be running or recovered (counted)."""
    if found is None:
        return f"binding {binding_id} has no record"
    if found.incomplete:
        if judge.in_flight(found.deadline_ms):
            judge.report.in_flight += 1
            return _IN_FLIGHT
        if not found.committed:
            return f"binding {binding_id} is a create that never committed, past its deadline and recovery"
    if found.stored.record.delete_ms:
        return f"binding {binding_id} was deleted"
    return _FURTHER


class Checks:
    """The checks over one Redis; `pools` collects what the cross-pool checks need (a few bytes per block)."""

    _pool_counts = LuaScript.beside(__file__, "pool_counts.lua")

    def __init__(self, redis: RedisClient, judge: Judge, pace: Pace) -> None:
        self.redis = redis
        self.judge = judge
        # Reads inside one key (a pool's sets, a CDR stream, a number's reservations) keep the walk's pace too.
        self.pace = pace
        self.batch = pace.batch
        self.pools = PoolRegistry()
        # CDR owners met: their buckets, or what is wrong with their count key (a few bytes per owner).
        self.cdr_owners: dict[str, tuple[Buckets | None, str | None]] = {}

    async def run(self, keys: Sequence[str]) -> list[Finding]:
        """Checks the keys of one SCAN batch (keys of families no invariant concerns are skipped)."""
        routes, bindings, pools, reservations, owners, streams = [], [], [], [], [], []
        for key in keys:
            if match := _ROUTE.fullmatch(key):
                routes.append((key, match["x"]))
            elif match := _BINDING.fullmatch(key):
                bindings.append((key, match["id"]))
            elif match := _POOL.fullmatch(key):
                pools.append((key, match["tenant"], match["city"]))
            elif match := _RESERVATIONS.fullmatch(key):
                reservations.append((key, match["pool"], match["number"]))
            elif (match := _OWNER.fullmatch(key)) and block_owner_key(match["block"]) == key:
                owners.append(match["block"])
            elif (match := _CDR_STREAM.fullmatch(key)) and (bucket := Bucket.from_tag(match["tag"])) is not None:
                streams.append((key, bucket))
        findings: list[Finding] = []
        findings += await self.routes(routes)
        findings += await self.bindings(bindings)
        findings += await self.reservations(reservations)
        for key, tenant, city in pools:
            findings += await self.pool(key, tenant, city)
        await self.owners(owners)
        for key, bucket in streams:
            findings += await self.cdr_stream(key, bucket)
        return findings

    async def lookup(self, binding_ids: Iterable[str]) -> dict[str, Found]:
        """The records of `binding_ids` with, for uncommitted ones, what their order key says (one pipeline each)."""
        stored = await get_stored_bindings(self.redis, list(binding_ids))
        return {found.stored.record.binding_id: found for found in await self._with_orders(stored.values())}

    async def _with_orders(self, stored: Iterable[StoredBinding]) -> list[Found]:
        records = list(stored)
        pending = [s for s in records if s.pending]
        replies = await _pipelined(
            self.redis, (("get", (order_key(s.record.tenant_id, s.record.out_order_id),)) for s in pending)
        )
        orders = {
            s.record.binding_id: OrderState.decode(reply)
            for s, reply in zip(pending, replies, strict=True)
            if reply is not None and not isinstance(reply, Exception)
        }
        found = []
        for s in records:
            binding_id = s.record.binding_id
            order = orders.get(binding_id)
            holds = order is not None and order.state == "p" and order.binding_id == binding_id
            # The order key states D while this create holds it; else D is derived (with some grace: the lease the
            # checker knows may differ from the one the create ran with).
            derived = self.judge.deadline(s.record.create_ms) + self.judge.grace_ms
            deadline = order.deadline_ms if order is not None and holds else derived
            committed = not s.pending or (order is not None and order.commits(binding_id))
            found.append(Found(s, committed, deadline))
        return found

    # ---- route table ------------------------------------------------------------------------------------------

    async def routes(self, routes: Sequence[tuple[str, str]]) -> list[Finding]:
        if not routes:
            return []
        replies = await _pipelined(
            self.redis, (call for key, _ in routes for call in (("get", (key,)), ("pexpiretime", (key,))))
        )
        values, expiries = replies[::2], replies[1::2]
        expiry = {key: e for (key, _), e in zip(routes, expiries, strict=True) if isinstance(e, int)}
        decoded: list[tuple[str, str, Route | None]] = []
        for (key, number), value in zip(routes, values, strict=True):
            if isinstance(value, Exception):
                self.judge.report.note_unchecked("keys of an unexpected type")
                continue
            if value is None:
                continue  # expired or removed since the SCAN
            self.judge.report.count("route keys")
            try:
                decoded.append((key, number, Route.decode(value)))
            except ValueError:
                decoded.append((key, number, None))
        found = await self.lookup(r.binding_id for _, _, r in decoded if r is not None)
        findings = []
        for key, number, route in decoded:
            problem: str | None
            if route is None:
                problem, binding_id = "holds no route value", ""
            else:
                binding_id = route.binding_id
                problem = self._route_problem(key, number, found.get(binding_id), binding_id, expiry.get(key, -1))
            if problem:
                findings.append(Finding(Violation(ROUTE_WITHOUT_BINDING, masked_key(key), problem, binding_id), key))
        return findings

    def _route_problem(
        self, key: str, number: str, found: Found | None, binding_id: str, expires_at_ms: int
    ) -> str | None:
        if found is not None and not found.committed and expires_at_ms > found.deadline_ms:
            # Before its commit a create's routes expire at its deadline: one that lasts longer would outlive a
            # create that fails (the defect of issue 16), in flight or not.
            return f"binding {binding_id} is not committed, its route lasts until {expires_at_ms} past its deadline"
        problem = _record_problem(found, self.judge, binding_id)
        if problem != _FURTHER or found is None:
            return problem or None
        record = found.stored.record
        if record.end_ms() <= self.judge.now_ms():
            return f"binding {binding_id} ended at {record.end_ms()} ms"
        if record.virtual_number != number:
            return f"binding {binding_id} is on number {record.virtual_number}"
        if key not in own_route_keys(record):
            return f"binding {binding_id} does not hold this key (its party or extension differs)"
        return None

    # ---- binding records --------------------------------------------------------------------------------------

    async def bindings(self, bindings: Sequence[tuple[str, str]]) -> list[Finding]:
        if not bindings:
            return []
        replies = await _pipelined(
            self.redis, (call for key, _ in bindings for call in (("hgetall", (key,)), ("pttl", (key,))))
        )
        findings: list[Finding] = []
        read: list[tuple[str, StoredBinding, dict[str, str], int]] = []
        committed: list[tuple[str, StoredBinding, int]] = []
        for index, (key, binding_id) in enumerate(bindings):
            raw, ttl = replies[2 * index], replies[2 * index + 1]
            if isinstance(raw, Exception):
                self.judge.report.note_unchecked("keys of an unexpected type")
                continue
            if not raw:
                continue
            fields = {as_text(k): as_text(v) for k, v in raw.items()}
            try:
                stored = decode_stored(binding_id, raw)
            except ValueError as exc:
                problem = f"unreadable record: {exc}"
                findings.append(Finding(Violation(BINDING_HISTORY_GAP, key, problem, binding_id), key))
                continue
            if stored is None:
                continue
            self.judge.report.count("binding records")
            read.append((key, stored, fields, ttl if isinstance(ttl, int) else -1))
        judged = await self._with_orders(s for _, s, _, _ in read)
        for (key, stored, fields, ttl), found in zip(read, judged, strict=True):
            if not found.committed:
                continue  # what an uncommitted create left is judged from its routes and its reservation
            if found.incomplete and self.judge.in_flight(found.deadline_ms):
                self.judge.report.in_flight += 1  # committed; its completion may still be under way
                continue
            binding_id = stored.record.binding_id
            gaps = _event_gaps(fields, stored)
            findings += [Finding(Violation(BINDING_HISTORY_GAP, key, gap, binding_id), key) for gap in gaps]
            committed.append((key, stored, ttl))
        findings += await self._number_history(committed)
        findings += await self._routes_of(committed)
        return findings

    async def _number_history(self, committed: Sequence[tuple[str, StoredBinding, int]]) -> list[Finding]:
        """A committed binding is indexed on its number with a score at or after its end (TraceNumber reads it)."""
        judged = [(key, s) for key, s, ttl in committed if ttl < 0 or ttl > _PURGE_MARGIN_MS]
        scores = await _pipelined(
            self.redis,
            (("zscore", (number_history_key(s.record.virtual_number), s.record.binding_id)) for _, s in judged),
        )
        findings = []
        for (key, stored), score in zip(judged, scores, strict=True):
            if isinstance(score, Exception):
                continue
            record = stored.record
            if score is None:
                problem = f"missing from the history of number {record.virtual_number} (TraceNumber cannot find it)"
            elif float(score) < record.end_ms():
                until = int(float(score))
                problem = f"indexed on number {record.virtual_number} until {until}, ends at {record.end_ms()}"
            else:
                continue
            findings.append(Finding(Violation(BINDING_HISTORY_GAP, key, problem, record.binding_id), key))
        return findings

    async def _routes_of(self, committed: Sequence[tuple[str, StoredBinding, int]]) -> list[Finding]:
        """An active binding (committed, neither deleted nor expired) holds every one of its route keys."""
        now = self.judge.now_ms()
        active: list[tuple[str, BindingRecord, str]] = []
        for key, stored, _ in committed:
            record = stored.record
            if record.delete_ms or record.expire_ms <= now + self.judge.grace_ms:
                continue
            if self.judge.in_flight(self.judge.deadline(record.create_ms)):
                self.judge.report.in_flight += 1  # committed moments ago: its routes may be being rewritten
                continue
            active.extend((key, record, route_key) for route_key in own_route_keys(record))
        values = await _pipelined(self.redis, (("get", (route_key,)) for _, _, route_key in active))
        findings = []
        for (key, record, route_key), value in zip(active, values, strict=True):
            if isinstance(value, Exception):
                continue
            if value is None:
                problem = f"route {masked_key(route_key)} is missing"
            elif not as_text(value).startswith(record.binding_id + "|"):
                holder = as_text(value).split("|", 1)[0]
                problem = f"route {masked_key(route_key)} is held by binding {holder}"
            else:
                continue
            findings.append(Finding(Violation(BINDING_WITHOUT_ROUTES, key, problem, record.binding_id), key))
        return findings

    # ---- reservations -----------------------------------------------------------------------------------------

    async def reservations(self, keys: Sequence[tuple[str, str, str]]) -> list[Finding]:
        """(reservations key, its sub-pool's base key, number) of each number's reservations zset."""
        findings: list[Finding] = []
        for key, subpool, number in keys:
            start = 0
            while True:
                live: Any = await self.redis.zrangebyscore(
                    key, f"({self.judge.now_ms()}", "+inf", start=start, num=self.batch, withscores=True
                )
                if not live:
                    break
                findings += await self._reservation_batch(key, subpool, number, live)
                await self.pace.took(len(live))
                if len(live) < self.batch:
                    break
                start += self.batch
        return findings

    async def _reservation_batch(
        self, key: str, subpool: str, number: str, live: Sequence[tuple[Any, float]]
    ) -> list[Finding]:
        rids = [as_text(rid) for rid, _ in live]
        records = await self.redis.hmget(hash_key_in(subpool, number), [f"r:{rid}" for rid in rids])
        lease_end = self.judge.now_ms() + self.judge.create_lease_ms + self.judge.grace_ms  # D is now + lease at most
        confirmed: list[tuple[str, int, str]] = []
        findings = []
        for (rid, expiry), record in zip(zip(rids, (int(s) for _, s in live), strict=True), records, strict=True):
            self.judge.report.count("reservations")
            binding_id = as_text(record).split("|")[4] if record is not None and as_text(record).count("|") >= 4 else ""
            if record is None:
                problem = f"reservation {rid} has no record"
            elif binding_id:
                confirmed.append((rid, expiry, binding_id))
                continue
            elif expiry > lease_end:
                problem = f"reservation {rid} has no binding and lasts until {expiry}, beyond a create's lease"
            else:
                self.judge.report.in_flight += 1  # reserved for a create still within its lease
                continue
            findings.append(Finding(Violation(RESERVATION_WITHOUT_BINDING, key, problem), key))
        found = await self.lookup(b for _, _, b in confirmed)
        for rid, expiry, binding_id in confirmed:
            trouble = self._reservation_problem(number, rid, expiry, found.get(binding_id), binding_id)
            if trouble:
                findings.append(Finding(Violation(RESERVATION_WITHOUT_BINDING, key, trouble, binding_id), key))
        return findings

    def _reservation_problem(
        self, number: str, rid: str, expiry: int, found: Found | None, binding_id: str
    ) -> str | None:
        problem = _record_problem(found, self.judge, binding_id)
        if problem != _FURTHER or found is None:
            return problem or None
        stored = found.stored
        record = stored.record
        if record.virtual_number != number:
            return f"binding {binding_id} is on number {record.virtual_number}"
        try:
            held = Handle.decode("rid", stored.reservation_id).rid
        except InvalidArgument:
            held = ""
        if held != rid:
            return f"binding {binding_id} holds another reservation"
        if expiry > record.end_ms() + self.judge.grace_ms:
            return f"reservation {rid} lasts until {expiry}, its binding ends at {record.end_ms()}"
        return None

    # ---- pools ------------------------------------------------------------------------------------------------

    async def pool(self, key: str, tenant: str, city: str) -> list[Finding]:
        """One sub-pool (a pool made before sub-pools is sub-pool 0 of 1): its counters agree with its sets, its
        record with its key, its sets hold only numbers of its share (pool_keys.subpool_of)."""
        try:
            counts = [int(n) for n in await self._pool_counts(self.redis, [key])]
        except ResponseError:  # WRONGTYPE: a key of the pool's name that is not one of its parts
            self.judge.report.note_unchecked("keys of an unexpected type")
            return []
        total, blocks_n, avail, axb, axe, axn, locked, cooling, index, subpools = counts
        if index < 0 and subpools < 0 and key == pool_key(tenant, city):
            index, subpools = 0, 1
        if not (0 <= index < subpools <= MAX_SUBPOOLS and key == subpool_key(tenant, city, index, subpools)):
            # No record saying which sub-pool it is, or one its name does not match (a block's numbers are then
            # in a slot no allocation reads): nothing more can be judged.
            problem = f"a pool key without a record of its place (subpool {index} of {subpools}) that matches its name"
            return [Finding(Violation(POOL_COUNTERS, key, problem), key)]
        blocks = {as_text(b) for b in await self.redis.smembers(f"{key}:blocks")}
        self.judge.report.count("sub-pools")
        if index == 0:
            self.judge.report.count("pools")
        self.pools.add_pool(key, tenant, city, blocks, index, subpools)
        findings = []
        share = subpool_share(index, subpools)
        if total != blocks_n * share:
            whose = f"{share:,} numbers of each" if subpools > 1 else f"{BLOCK_SIZE:,} numbers"
            problem = f"total {total}, but {blocks_n} block(s) of {whose}"
            if subpools > 1:
                problem += f" (sub-pool {index} of {subpools})"
            findings.append(Finding(Violation(POOL_COUNTERS, key, problem), key))
        states = avail + axb + axe + axn + locked + cooling
        if states != total:
            problem = (
                f"available {avail} + in use {axb + axe + axn} + locked {locked} + cooling {cooling} = {states}, "
                f"total {total}"
            )
            findings.append(Finding(Violation(POOL_COUNTERS, key, problem), key))
        findings += await self._pool_members(key, blocks, index, subpools)
        return findings

    async def _pool_members(self, key: str, blocks: set[str], index: int, subpools: int) -> list[Finding]:
        """Every number of the sub-pool's state sets is in one of its blocks and its share, and in one state only."""
        # (suffix, type); each set is compared with the ones after it, the largest (avail) last.
        sets = [
            ("axb", "zset"),
            ("axe", "zset"),
            ("axn", "zset"),
            ("cooling", "zset"),
            ("locked", "hash"),
            ("avail", "set"),
        ]
        overlaps: dict[tuple[str, str], Overlap] = defaultdict(Overlap)
        misplaced = Overlap()
        for position, (name, kind) in enumerate(sets):
            async for members in self._members(f"{key}:{name}", kind):
                for number in members:
                    if number[:11] not in blocks:
                        self.pools.add_foreign(key, number[:11])
                misplaced.add([n for n in members if n.isdigit() and subpool_of(n, subpools) != index])
                for other, other_kind in sets[position + 1 :]:
                    overlaps[(name, other)].add(await self._present(f"{key}:{other}", other_kind, members))
        findings = []
        if misplaced.count:
            shown = ", ".join(misplaced.examples)
            problem = f"{misplaced.count} number(s) of another sub-pool of the pool (e.g. {shown})"
            findings.append(Finding(Violation(POOL_COUNTERS, key, problem), key))
        for (name, other), overlap in overlaps.items():
            if overlap.count:
                shown = ", ".join(overlap.examples)
                problem = f"{overlap.count} number(s) both {name} and {other} (e.g. {shown})"
                findings.append(Finding(Violation(POOL_COUNTERS, key, problem), key))
        return findings

    async def _members(self, key: str, kind: str) -> Any:
        cursor = 0
        while True:
            raw: list[Any]
            if kind == "set":
                cursor, raw = await self.redis.sscan(key, cursor, count=self.batch)
            elif kind == "zset":
                cursor, pairs = await self.redis.zscan(key, cursor, count=self.batch)
                raw = [member for member, _ in pairs]
            else:
                cursor, mapping = await self.redis.hscan(key, cursor, count=self.batch)
                raw = list(mapping)
            if raw:
                yield [as_text(m) for m in raw]
                await self.pace.took(len(raw))
            if int(cursor) == 0:
                return

    async def _present(self, key: str, kind: str, members: Sequence[str]) -> list[str]:
        if kind == "set":
            found = await self.redis.smismember(key, list(members))
            return [m for m, hit in zip(members, found, strict=True) if hit]
        if kind == "zset":
            scores = await self.redis.zmscore(key, list(members))
            return [m for m, score in zip(members, scores, strict=True) if score is not None]
        values = await self.redis.hmget(key, list(members))
        return [m for m, value in zip(members, values, strict=True) if value is not None]

    async def pool_findings(self) -> list[Finding]:
        """After the walk: numbers in two pools, and blocks missing from some sub-pools of their pool. A missing block
        is read again now (the walk met the sub-pools at different moments: an import may have gone on since)."""
        found = self.pools.findings()
        for key, index, count, blocks in self.pools.import_gaps():
            present = await self.redis.smismember(f"{key}:blocks", list(blocks))
            still = [block for block, hit in zip(blocks, present, strict=True) if not hit]
            if still:
                shown = ", ".join(still[:3]) + (f" and {len(still) - 3} more" if len(still) > 3 else "")
                problem = (
                    f"block(s) {shown} of the pool are not in sub-pool {index} of {count}: an import that did not "
                    "complete (their numbers of this sub-pool are never handed out); import them again"
                )
                found.append(Finding(Violation(POOL_COUNTERS, f"{key}:blocks", problem), None))
        return found

    async def owners(self, blocks: Sequence[str]) -> None:
        replies = await _pipelined(self.redis, (("hmget", (block_owner_key(b), ["tenant", "city"])) for b in blocks))
        for block, reply in zip(blocks, replies, strict=True):
            if isinstance(reply, Exception) or reply[0] is None:
                continue
            self.judge.report.count("block owners")
            self.pools.owners[block] = (as_text(reply[0]), as_text(reply[1] or b""))

    # ---- CDRs -------------------------------------------------------------------------------------------------

    async def cdr_stream(self, key: str, bucket: Bucket) -> list[Finding]:
        """Each record of one bucket's stream: the one its dedup key names, and in the bucket of its virtual number
        (of the owner's count; no count stored: one bucket)."""
        buckets, problem = await self._cdr_buckets(bucket.tenant_id)
        if buckets is not None and bucket not in buckets.all:
            problem = f"bucket {bucket.index} is not one of the owner's {buckets.count} bucket(s)"
        if problem is not None:
            self.judge.report.count("CDRs", await self.redis.xlen(key))
            return [Finding(Violation(CDR_WRONG_BUCKET, key, problem), None)]
        assert buckets is not None
        findings: list[Finding] = []
        start = "-"
        while True:
            entries = await self.redis.xrange(key, min=start, max="+", count=self.batch)
            if not entries:
                return findings
            records = [_stored_cdr((fields or {}).get(b"p")) for _, fields in entries]
            dedup_keys = [bucket.dedup(r.carrier_id, r.call_id) if r is not None else None for r in records]
            stored_as = await _pipelined(self.redis, (("get", (k,)) for k in dedup_keys if k is not None))
            replies = iter(stored_as)
            for (entry_id, _), record, dedup in zip(entries, records, dedup_keys, strict=True):
                self.judge.report.count("CDRs")
                if record is None or dedup is None:
                    self.judge.report.note_unchecked("CDRs without a readable call_id")
                    continue
                expected = bucket_index(record.called_number, buckets.count)
                if expected != bucket.index:
                    problem = (
                        f"call {record.call_id} on {record.called_number} is in bucket {bucket.index}; its number's "
                        f"bucket is {expected} of {buckets.count}"
                    )
                    findings.append(Finding(Violation(CDR_WRONG_BUCKET, key, problem), None))
                holder = next(replies)
                if holder is None or isinstance(holder, Exception):
                    self.judge.report.note_unchecked("CDRs whose dedup key has lapsed")
                elif as_text(holder) != as_text(entry_id or b""):
                    problem = f"call stored again as {as_text(entry_id or b'')}, first as {as_text(holder)} (in {key})"
                    findings.append(Finding(Violation(DUPLICATE_CDR, dedup, problem), None))
            await self.pace.took(len(entries))
            if len(entries) < self.batch:
                return findings
            start = "(" + as_text(entries[-1][0] or b"")

    async def _cdr_buckets(self, tenant_id: str) -> tuple[Buckets | None, str | None]:
        """The owner's buckets (no count stored: one), or a problem with its count key; read once per owner."""
        if tenant_id not in self.cdr_owners:
            stored = await self.redis.get(count_key(tenant_id))
            text = "1" if stored is None else as_text(stored)
            if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_BUCKETS:
                self.cdr_owners[tenant_id] = (Buckets.of(tenant_id, int(text)), None)
            else:
                problem = f"the owner's bucket count {count_key(tenant_id)} holds {text!r}, not 1 to {MAX_BUCKETS}"
                self.cdr_owners[tenant_id] = (None, problem)
        return self.cdr_owners[tenant_id]


def _stored_cdr(payload: Any) -> cdr_pb2.CallDetailRecord | None:
    """A stored CDR with its call_id, None when the payload does not parse or has none."""
    try:
        record = cdr_pb2.CallDetailRecord.FromString(payload if isinstance(payload, bytes) else b"")
    except Exception:
        return None
    return record if record.call_id else None


def _event_gaps(fields: dict[str, str], stored: StoredBinding) -> list[str]:
    """What is missing from a committed record's event list (h1..hN, N = n): holes, extras, no create, no delete."""
    count = int(fields.get("n", "0") or "0")
    gaps = []
    missing = [i for i in range(1, count + 1) if f"h{i}" not in fields]
    if missing:
        gaps.append(f"event(s) {', '.join(f'h{i}' for i in missing[:5])} of {count} missing")
    beyond = sorted(int(m[1]) for name in fields if (m := _EVENT_FIELD.fullmatch(name)) and int(m[1]) > count)
    if beyond:
        gaps.append(f"event h{beyond[0]} beyond the count n={count}")
    if not stored.events or stored.events[0].kind != "create":
        gaps.append("the first event is not its create")
    if stored.record.delete_ms and not any(e.kind == "delete" for e in stored.events):
        gaps.append("deleted, without a delete event")
    return gaps


@dataclass
class Overlap:
    """Numbers found in two of a pool's state sets: a count and the first few (SSCAN may return one twice)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, numbers: Sequence[str]) -> None:
        self.count += len(numbers)
        self.examples += [n for n in numbers if n not in self.examples][: 3 - len(self.examples)]


@dataclass
class PoolRegistry:
    """Blocks per sub-pool, block owners, numbers found in a sub-pool's sets outside its blocks (per block), and the
    sub-pools of each pool: enough to find a number in two pools, and an import that reached only some sub-pools,
    after the walk, in memory proportional to the number of blocks."""

    blocks: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # block -> sub-pool keys
    tenants: dict[str, tuple[str, str]] = field(default_factory=dict)  # sub-pool key -> (tenant, city)
    owners: dict[str, tuple[str, str]] = field(default_factory=dict)  # block -> (tenant, city)
    foreign: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))  # (sub-pool, block) -> n
    # (tenant, city) -> sub-pool count its sub-pool 0 records (or any sub-pool, when the walk met no sub-pool 0)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add_pool(
        self, key: str, tenant: str, city: str, blocks: Iterable[str], index: int = 0, subpools: int = 1
    ) -> None:
        self.tenants[key] = (tenant, city)
        if index == 0 or (tenant, city) not in self.counts:
            self.counts[(tenant, city)] = subpools
        for block in blocks:
            self.blocks[block].add(key)

    def add_foreign(self, key: str, block: str) -> None:
        self.foreign[(key, block)] += 1

    def findings(self) -> list[Finding]:
        found = []
        for block, keys in sorted(self.blocks.items()):
            owner = self.owners.get(block)
            pools = {self.tenants[k] for k in keys}
            wrong = sorted(k for k in keys if owner is not None and self.tenants[k] != owner)
            if owner is None and len(pools) > 1:
                wrong = sorted(keys)
            for key in wrong:
                others = ", ".join(f"{t}/{c}" for t, c in sorted(pools - {self.tenants[key]})) or "none"
                claimed = f"owned by {owner[0]}/{owner[1]}" if owner else "no owner record"
                problem = f"block {block} is in this pool ({claimed}; also in the pools of {others})"
                found.append(Finding(Violation(NUMBER_IN_TWO_POOLS, f"{key}:blocks", problem), None))
        for (key, block), n in sorted(self.foreign.items()):
            pool = self.tenants.get(key)
            elsewhere = sorted(p for p in self.blocks.get(block, ()) if self.tenants[p] != pool)
            if elsewhere or (block in self.owners and self.owners[block] != pool):
                holder = ", ".join(elsewhere) or "the owner {}/{}".format(*self.owners[block])
                problem = f"{n} number(s) of block {block} are in this pool's sets; the block is {holder}'s"
                found.append(Finding(Violation(NUMBER_IN_TWO_POOLS, key, problem), None))
            else:
                problem = f"{n} number(s) of block {block}, not one of this pool's blocks, are in its sets"
                found.append(Finding(Violation(POOL_COUNTERS, key, problem), None))
        return found

    def import_gaps(self) -> list[tuple[str, int, int, list[str]]]:
        """(sub-pool key, index, count, blocks): blocks some sub-pool of a pool holds and this one does not, as the
        walk saw them (an import is N scripts, one per sub-pool: one under way, or one that stopped half-way)."""
        pool_blocks: dict[tuple[str, str], set[str]] = defaultdict(set)
        for block, keys in self.blocks.items():
            for key in keys:
                pool_blocks[self.tenants[key]].add(block)
        gaps = []
        for (tenant, city), blocks in sorted(pool_blocks.items()):
            count = self.counts[(tenant, city)]
            for index in range(count):
                key = subpool_key(tenant, city, index, count)
                missing = sorted(b for b in blocks if key not in self.blocks[b])
                if missing:
                    gaps.append((key, index, count, missing))
        return gaps
