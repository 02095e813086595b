"""Binding records and the per-number binding history: written by binding, read by binding and cdr.

One Redis schema shared by two services, so it lives here once (the cdr service must not import binding's code).

    np:b:{<binding_id>}    HASH   the binding record: current values, status, and its append-only events
                                  (fields h1..hN); PEXPIREAT end + retention (end = expiry or deletion)
    np:nh:{<X>}            ZSET   per virtual number: member binding_id, score = the binding's latest end
                                  (expire_ms; only ever raised); trimmed past retention; PEXPIREAT newest end
                                  + retention

Record fields (short names keep the hash in the compact listpack encoding):
    t tenant_id, o out_order_id, m mode, a party_a, b party_b (current), x virtual_number, e extension,
    c city_code, cf city_fallback, r call_restriction, rec recording_enabled, any allow_any_caller,
    uc user_consent, cms create_ms, ems expire_ms, ums update_ms, dms delete_ms (0 = not deleted),
    rid allocation reservation id, st status ("p" pending: a create not committed yet, "a" committed),
    rq the create's request as binding compares a repeated create with it ("mode|a|b|ttl_ms|city|strict|r|rec|any";
    absent in records of before its version 2),
    n number of events, h1..hN events "<kind>|<at_ms>|k=v,k=v" (kind create/update/delete;
    keys b party_b, exp expire_ms, r call_restriction, rec recording).

Expiry is not written as an event: it happens at `expire_ms` by definition (Redis expires the routes at that
instant); readers derive the "expire" event from the record, so no sweeper is needed and none can lag.

Events for tenants (numprotect.core.event_keys, docs/redis-schema.md "Events"): the update script records
binding.created (commit), binding.updated and binding.deleted in the outbox of the record's slot, in the step that
makes the change, and keeps the slot's binding expiries (binding id -> expire_ms while committed and not deleted),
from which the events service tells binding.expired. The writes here add the hints (the slot in a ring; its
earliest expiry in an expiry ring) to the same round trip.

Trace ("which binding did X serve at T"): the number's ZSET gives every binding whose end is after T (score
> T), the records filter create_ms <= T < end_ms, and the events give party B as it was at T.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from numprotect.core import event_keys, event_outbox
from numprotect.core.clock import SystemClock
from numprotect.core.redis_batch import Command, raise_first, send_together
from numprotect.core.redis_client import KeyOrArg, LuaScript, RedisClient
from numprotect.core.routes import NumberHistory, RouteTable

STATUS_PENDING = "p"
STATUS_ACTIVE = "a"
DEFAULT_RETENTION_MS = 180 * 86_400_000
# How many history members trace_number reads per round trip.
_TRACE_BATCH = 500
_NO_END = 2**62


def binding_key(binding_id: str) -> str:
    return f"np:b:{{{binding_id}}}"


def number_history_key(virtual_number: str) -> str:
    return f"np:nh:{{{virtual_number}}}"


def order_key(tenant_id: str, out_order_id: str) -> str:
    """Binding's idempotency key of (tenant_id, out_order_id), "<p|d>|<binding_id>|<fingerprint>|<deadline_ms>":
    written by binding only (services/binding/store.py), here because the invariant checker reads it too."""
    return f"np:ord:{{{tenant_id}:{out_order_id}}}"


@dataclass(frozen=True, slots=True)
class OrderState:
    """An order key's value: "p" (a create holds the order until deadline_ms) or "d" (committed: the create's
    commit point) and the binding id it names."""

    state: str
    binding_id: str
    deadline_ms: int

    @classmethod
    def decode(cls, raw: bytes | str) -> OrderState | None:
        """None for a value of another shape."""
        parts = _text(raw).split("|")
        if len(parts) != 4 or parts[0] not in ("p", "d") or not (parts[3] or "0").isdigit():
            return None
        return cls(parts[0], parts[1], int(parts[3] or "0"))

    def commits(self, binding_id: str) -> bool:
        return self.state == "d" and self.binding_id == binding_id


@dataclass(frozen=True, slots=True)
class BindingRecord:
    """One binding as stored (or, from trace_number, as it was at the asked moment)."""

    binding_id: str
    tenant_id: str
    out_order_id: str
    mode: int
    party_a: str
    party_b: str
    virtual_number: str
    extension: str
    city_code: str
    call_restriction: int
    recording_enabled: bool
    allow_any_caller: bool
    user_consent: bool
    create_ms: int
    expire_ms: int
    update_ms: int
    delete_ms: int  # 0 = not deleted

    def end_ms(self) -> int:
        """When the binding stopped (or will stop) serving: its expiry, or its deletion if earlier."""
        return min(self.expire_ms, self.delete_ms or _NO_END)

    def live_at(self, at_ms: int) -> bool:
        return self.create_ms <= at_ms < self.end_ms()


@dataclass(frozen=True, slots=True)
class BindingEvent:
    """One entry of a binding's history. `changes` holds the values set (b, exp, r, rec)."""

    kind: str  # create, update, delete, expire (derived)
    at_ms: int
    changes: Mapping[str, str]

    def encode(self) -> str:
        return f"{self.kind}|{self.at_ms}|" + ",".join(f"{k}={v}" for k, v in self.changes.items())

    @classmethod
    def decode(cls, raw: str) -> BindingEvent:
        kind, at, rest = raw.split("|", 2)
        changes = dict(item.split("=", 1) for item in rest.split(",") if item)
        return cls(kind, int(at), changes)


@dataclass(frozen=True, slots=True)
class StoredBinding:
    """Everything the record holds: the public record plus what only the binding service needs."""

    record: BindingRecord
    reservation_id: str
    city_fallback: bool
    status: str
    events: tuple[BindingEvent, ...]

    @property
    def pending(self) -> bool:
        return self.status != STATUS_ACTIVE

    def history(self, at_ms: int | None = None) -> list[BindingEvent]:
        """The recorded events plus the derived expiry (once expire_ms has passed, unless deleted before)."""
        now = SystemClock().now_ms() if at_ms is None else at_ms
        events = list(self.events)
        rec = self.record
        if rec.expire_ms <= now and (rec.delete_ms == 0 or rec.delete_ms > rec.expire_ms):
            events.append(BindingEvent("expire", rec.expire_ms, {}))
        return events

    def party_b_at(self, at_ms: int) -> str:
        """Party B as it was at `at_ms`: the value set by the last event at or before then (events are in
        order; the create event always names B), the creation's value for an earlier moment."""
        values = [(e.at_ms, e.changes["b"]) for e in self.events if "b" in e.changes]
        if not values:
            return self.record.party_b
        party_b = values[0][1]
        for at, value in values:
            if at <= at_ms:
                party_b = value
        return party_b

    def as_of(self, at_ms: int) -> BindingRecord:
        return replace(self.record, party_b=self.party_b_at(at_ms))


def encode_record_fields(
    record: BindingRecord, *, reservation_id: str, city_fallback: bool, status: str
) -> dict[str, str]:
    """The hash fields of a new record (events are added by the scripts)."""
    return {
        "t": record.tenant_id,
        "o": record.out_order_id,
        "m": str(record.mode),
        "a": record.party_a,
        "b": record.party_b,
        "x": record.virtual_number,
        "e": record.extension,
        "c": record.city_code,
        "cf": "1" if city_fallback else "0",
        "r": str(record.call_restriction),
        "rec": "1" if record.recording_enabled else "0",
        "any": "1" if record.allow_any_caller else "0",
        "uc": "1" if record.user_consent else "0",
        "cms": str(record.create_ms),
        "ems": str(record.expire_ms),
        "ums": str(record.update_ms),
        "dms": str(record.delete_ms),
        "rid": reservation_id,
        "st": status,
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_stored(binding_id: str, raw: Mapping[Any, Any]) -> StoredBinding | None:
    """The stored binding from an HGETALL reply, or None when the hash is missing or not a record."""
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    if "cms" not in fields or "t" not in fields:
        return None
    count = int(fields.get("n", "0"))
    events = tuple(BindingEvent.decode(fields[f"h{i}"]) for i in range(1, count + 1) if f"h{i}" in fields)
    record = BindingRecord(
        binding_id=binding_id,
        tenant_id=fields["t"],
        out_order_id=fields.get("o", ""),
        mode=int(fields.get("m", "0")),
        party_a=fields.get("a", ""),
        party_b=fields.get("b", ""),
        virtual_number=fields.get("x", ""),
        extension=fields.get("e", ""),
        city_code=fields.get("c", ""),
        call_restriction=int(fields.get("r", "0")),
        recording_enabled=fields.get("rec") == "1",
        allow_any_caller=fields.get("any") == "1",
        user_consent=fields.get("uc") == "1",
        create_ms=int(fields["cms"]),
        expire_ms=int(fields.get("ems", "0")),
        update_ms=int(fields.get("ums", "0")),
        delete_ms=int(fields.get("dms", "0")),
    )
    return StoredBinding(
        record=record,
        reservation_id=fields.get("rid", ""),
        city_fallback=fields.get("cf") == "1",
        status=fields.get("st", STATUS_PENDING),
        events=events,
    )


async def get_stored_bindings(redis: RedisClient, binding_ids: Sequence[str]) -> dict[str, StoredBinding]:
    """Stored bindings (pending ones included) by id, read in one pipeline; missing ids are absent."""
    if not binding_ids:
        return {}
    ids = list(dict.fromkeys(binding_ids))
    if len(ids) == 1:  # one command costs less than a pipeline of one
        replies = [await redis.hgetall(binding_key(ids[0]))]
    else:
        async with redis.pipeline(transaction=False) as pipe:
            for binding_id in ids:
                pipe.hgetall(binding_key(binding_id))
            replies = await pipe.execute()
    found: dict[str, StoredBinding] = {}
    for binding_id, raw in zip(ids, replies, strict=True):
        stored = decode_stored(binding_id, raw)
        if stored is not None:
            found[binding_id] = stored
    return found


async def get_binding_records(redis: RedisClient, binding_ids: Sequence[str]) -> dict[str, BindingRecord]:
    """Committed binding records by id (one pipelined round trip); unknown, pending or purged ids are absent."""
    stored = await get_stored_bindings(redis, binding_ids)
    return {bid: s.record for bid, s in stored.items() if not s.pending}


async def get_binding_records_at(
    redis: RedisClient, binding_ids: Sequence[str], at_ms: int
) -> dict[str, BindingRecord]:
    """Like get_binding_records, with party B as it was at `at_ms` (e.g. a call's time: B may be replaced later).

    The records are returned whether or not they were live then (check `live_at`); missing ids are absent.
    """
    stored = await get_stored_bindings(redis, binding_ids)
    return {bid: s.as_of(at_ms) for bid, s in stored.items() if not s.pending}


async def trace_number(
    redis: RedisClient, virtual_number: str, at_ms: int, *, party: str = "", extension: str = ""
) -> list[BindingRecord]:
    """The bindings live on `virtual_number` at `at_ms`, with their parties as they were then, oldest first.

    `party` keeps only bindings where it was party A or B (N for AXN) at that moment; `extension` only the AXE
    binding on that extension. Reads the number's history in batches of bindings ending after `at_ms`.
    """
    key = number_history_key(virtual_number)
    found: list[BindingRecord] = []
    offset = 0
    while True:
        ids = await redis.zrangebyscore(key, f"({at_ms}", "+inf", start=offset, num=_TRACE_BATCH)
        if not ids:
            break
        stored = await get_stored_bindings(redis, [_text(i) for i in ids])
        for binding in stored.values():
            if binding.pending or binding.record.virtual_number != virtual_number:
                continue
            if not binding.record.live_at(at_ms):
                continue
            then = binding.as_of(at_ms)
            if extension and then.extension != extension:
                continue
            if party and party not in (then.party_a, then.party_b):
                continue
            found.append(then)
        if len(ids) < _TRACE_BATCH:
            break
        offset += _TRACE_BATCH
    found.sort(key=lambda r: (r.create_ms, r.binding_id))
    return found


async def get_binding_history(redis: RedisClient, binding_id: str) -> list[BindingEvent]:
    """Every recorded event of a committed binding plus its derived expiry; [] when unknown."""
    stored = (await get_stored_bindings(redis, [binding_id])).get(binding_id)
    return [] if stored is None or stored.pending else stored.history()


class BindingRecordStore:
    """The writes of the binding record and the number history (used by the binding service only). Each write is
    also available as a `Command`, to send with other independent writes in one round trip (redis_batch)."""

    _create = LuaScript.beside(__file__, "binding_record_create.lua")
    _update = LuaScript.beside(__file__, "binding_record_update.lua")

    def __init__(self, redis: RedisClient, retention_ms: int = DEFAULT_RETENTION_MS) -> None:
        self.redis = redis
        self.retention_ms = retention_ms
        event_outbox.warm()

    async def create(
        self,
        record: BindingRecord,
        *,
        reservation_id: str,
        city_fallback: bool,
        keep_until_ms: int | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> bool:
        """Writes a new pending record with its create event; False (nothing written) if the id exists.

        A pending record expires at `keep_until_ms` when given (an abandoned create leaves no long-lived
        garbage); activate() then keeps it for the binding's end + retention. `extra`: fields only the binding
        service reads (`rq`, the create's request).
        """
        command = self.create_command(
            record, reservation_id=reservation_id, city_fallback=city_fallback, keep_until_ms=keep_until_ms, extra=extra
        )
        return self.created(raise_first(await send_together(self.redis, [command]))[0])

    def create_command(
        self,
        record: BindingRecord,
        *,
        reservation_id: str,
        city_fallback: bool,
        keep_until_ms: int | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> Command:
        """The command of `create` (its reply goes to `created`)."""
        fields = encode_record_fields(
            record, reservation_id=reservation_id, city_fallback=city_fallback, status=STATUS_PENDING
        )
        fields.update(extra or {})
        event = BindingEvent("create", record.create_ms, {"b": record.party_b, "exp": str(record.expire_ms)})
        expire_at = keep_until_ms if keep_until_ms is not None else record.end_ms() + self.retention_ms
        flat: list[KeyOrArg] = [expire_at, event.encode()]
        for name, value in fields.items():
            flat.extend((name, value))
        return Command.run(self._create, [binding_key(record.binding_id)], flat)

    @staticmethod
    def created(reply: Any) -> bool:
        """True when the reply of a create says the record was written (False: the id exists)."""
        return int(reply) == 1

    async def update(
        self,
        binding_id: str,
        fields: Mapping[str, str],
        event: BindingEvent | None,
        *,
        end_ms: int | None = None,
        release: tuple[str, str] | None = None,
    ) -> bool:
        """Sets `fields` and appends `event` on an existing record; new retention when `end_ms` is given; with
        `release` (a key of the record's slot and the value it holds), deletes that key in the same step (the
        writer's lock).

        False (nothing written, nothing deleted) when the record does not exist.

        The events it records (binding.created when `fields` commit the record, binding.updated / .deleted with an
        `event` of that kind) are hinted in the same round trip (`event_hints`).
        """
        command = self.update_command(binding_id, fields, event, end_ms=end_ms, release=release)
        expire_ms = int(fields["ems"]) if "ems" in fields else None
        hints = self.event_hints(binding_id, fields, event, expire_ms)
        return int(await event_outbox.run_with_hints(self.redis, command, hints)) == 1

    @staticmethod
    def event_hints(
        binding_id: str, fields: Mapping[str, str], event: BindingEvent | None, expire_ms: int | None
    ) -> list[Command]:
        """The hints for the events service that an update of `fields` with `event` calls for: the record's slot in
        its ring when an event may be recorded (a commit, an update or delete event), and in its expiry ring (ZADD
        LT: only ever earlier) when the binding's expiry is written (`expire_ms`: the record's expiry, when known).
        Hints only: a lost one delays an event until the events service's sweep."""
        commits = fields.get("st") == STATUS_ACTIVE
        if not commits and (event is None or event.kind not in ("update", "delete")):
            return []
        key = binding_key(binding_id)
        hints = [event_outbox.ring_hint(key)]
        if expire_ms is not None and "dms" not in fields:
            hints.append(event_outbox.expiry_ring_hint(key, expire_ms))
        return hints

    def update_command(
        self,
        binding_id: str,
        fields: Mapping[str, str],
        event: BindingEvent | None,
        *,
        end_ms: int | None = None,
        release: tuple[str, str] | None = None,
    ) -> Command:
        """The command of `update` (its reply: 1 written, 0 no record), without the events' hints (`event_hints`:
        send them together)."""
        expire_at = 0 if end_ms is None else end_ms + self.retention_ms
        key = binding_key(binding_id)
        keys = [key, event_keys.outbox_key_beside(key), event_keys.expiry_key_beside(key)]
        token = ""
        if release is not None:
            keys.append(release[0])
            token = release[1]
        flat: list[KeyOrArg] = [expire_at, event.encode() if event else "", token]
        for name, value in fields.items():
            flat.extend((name, value))
        return Command.run(self._update, keys, flat)

    async def activate(self, binding_id: str, end_ms: int | None = None, *, expire_ms: int | None = None) -> bool:
        """Marks the record committed (binding.created is recorded); with `end_ms`, keeps it until end + retention.
        `expire_ms`: the binding's expiry, for the expiry ring's hint (without it the expirer learns of the binding
        from its sweep)."""
        command, *hints = self.activate_commands(binding_id, end_ms, expire_ms=expire_ms)
        return int(await event_outbox.run_with_hints(self.redis, command, hints)) == 1

    def activate_commands(
        self, binding_id: str, end_ms: int | None = None, *, expire_ms: int | None = None
    ) -> list[Command]:
        """The commands of `activate`: the record's script, then its hints (read the script's reply with
        `event_outbox.first_reply`)."""
        fields = {"st": STATUS_ACTIVE}
        command = self.update_command(binding_id, fields, None, end_ms=end_ms)
        return [command, *self.event_hints(binding_id, fields, None, expire_ms)]

    async def discard(self, binding_id: str) -> None:
        """Removes a record whose create failed (compensation)."""
        await self.redis.delete(binding_key(binding_id))

    def history(self, virtual_number: str, end_ms: int) -> NumberHistory:
        """A binding's entry in the number's history, ending at `end_ms` (written by the routes' script: same slot)."""
        return NumberHistory(number_history_key(virtual_number), end_ms, self.retention_ms)

    async def add_to_history(self, virtual_number: str, binding_id: str, end_ms: int) -> None:
        """Indexes the binding on its number (score only ever raised) and trims what left retention."""
        raise_first(await send_together(self.redis, [self.history_command(virtual_number, binding_id, end_ms)]))

    def history_command(self, virtual_number: str, binding_id: str, end_ms: int) -> Command:
        return RouteTable.history_command(virtual_number, binding_id, self.history(virtual_number, end_ms))
