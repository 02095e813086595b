"""Outbox entries -> events: the event id and the single-event webhook body (docs/events.md, "Payloads").

Body (compact JSON, keys in this order): {"id": <event id>, "type": <type>, "timestamp": <RFC 3339 UTC, ms, Z>,
"data": {...}}; `data` is a protobuf message in its JSON mapping (lowerCamelCase, defaults left out):
- binding.*: the `Binding` as the event left it (binding_protos.record_after_event: the record's n-th event; an
  expiry: the record, as of its expiry instant), read from the binding record (its real parties: the tenant's own);
- cdr.created: the stored `CallDetailRecord`, as the tenant's ListCdrs shows it (ingest_time from the entry's `at`);
- abuse.flagged: an `AbuseSignal` (cdr.proto), the caller masked as GetAbuseSignals masks it;
- number.locked / number.unlocked: {"virtualNumber", "tenantId", "reason"}.
The body is made once, when the event is routed, and kept in the tenant's log: every delivery, replay and watch
carries the same bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core import event_keys
from numprotect.core.binding_protos import binding_to_proto, record_after_event
from numprotect.core.binding_records import StoredBinding, binding_key, decode_stored
from numprotect.core.conversions import timestamp_from_ms
from numprotect.core.phone import mask
from numprotect.core.redis_client import RedisClient, as_text

log = logging.getLogger(__name__)

BINDING_TYPES = (
    event_keys.BINDING_CREATED,
    event_keys.BINDING_UPDATED,
    event_keys.BINDING_DELETED,
    event_keys.BINDING_EXPIRED,
)
NUMBER_TYPES = (event_keys.NUMBER_LOCKED, event_keys.NUMBER_UNLOCKED)
# The `rq` field of a binding record (the create's request, "mode|a|b|ttl_ms|city|strict|r|rec|any"): where the
# create's call restriction and recording flag are.
_REQUEST_RESTRICTION = 6
_REQUEST_RECORDING = 7


# A binding record as read: the stored binding and its create's (call restriction, recording), if known.
Found = tuple[StoredBinding, tuple[int, bool] | None]
# Binding id -> its record (None: unreadable); ids without a record are absent.
BindingRecords = Mapping[str, Found | None]


class Unrenderable(Exception):
    """An outbox entry no event can be made of, now or later (the events service drops it, counted by `reason`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One entry of a slot's outbox (event_keys: ty, tn, at, src, n, d)."""

    entry_id: str
    type: str
    tenant_id: str
    at_ms: int
    source: str
    index: str
    data: bytes

    @classmethod
    def decode(cls, entry_id: str, fields: Mapping[Any, Any]) -> OutboxEntry:
        """The entry of an XRANGE reply's fields; Unrenderable when it lacks what every event needs."""
        values = {_lenient_text(k): v for k, v in fields.items()}

        def text(name: str) -> str:
            return _lenient_text(values.get(name, b""))

        event_type = text("ty")
        if event_type not in event_keys.EVENT_TYPES:
            raise Unrenderable("unknown_type", f"entry {entry_id}: type {event_type!r}")
        if not text("tn"):
            raise Unrenderable("no_tenant", f"entry {entry_id}: {event_type} of no tenant")
        at = text("at")
        if not at.isdigit():
            raise Unrenderable("malformed", f"entry {entry_id}: at {at!r} is not epoch ms")
        data = values.get("d", b"")
        return cls(
            entry_id=entry_id,
            type=event_type,
            tenant_id=text("tn"),
            at_ms=int(at),
            source=text("src"),
            index=text("n"),
            data=data if isinstance(data, bytes) else str(data).encode(),
        )

    @property
    def event_id(self) -> str:
        """The same for every entry recording the same event (a producer's script run twice): routing keeps one."""
        return event_keys.event_id(self.type, self.source, self._discriminator())

    def _discriminator(self) -> str:
        if self.type == event_keys.BINDING_EXPIRED:
            return self.data.decode(errors="replace")  # the expiry ms
        if self.type in BINDING_TYPES:
            return self.index  # the record's event index
        if self.type == event_keys.ABUSE_FLAGGED:
            return self.data.decode(errors="replace").split("|", 1)[0]  # the window
        if self.type in NUMBER_TYPES:
            return str(self.at_ms)
        return ""  # cdr.created: the call itself


@dataclass(frozen=True, slots=True)
class RenderedEvent:
    """An event ready to route: what the tenant's log keeps."""

    entry_id: str  # the outbox entry it came from
    event_id: str
    type: str
    tenant_id: str
    at_ms: int
    body: str


def rfc3339_ms(at_ms: int) -> str:
    """2026-12-01T08:00:00.123Z"""
    moment = dt.datetime.fromtimestamp(at_ms // 1000, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{at_ms % 1000:03d}Z"


def event_body(event_id: str, event_type: str, at_ms: int, data: Mapping[str, Any]) -> str:
    body = {"id": event_id, "type": event_type, "timestamp": rfc3339_ms(at_ms), "data": data}
    return json.dumps(body, separators=(",", ":"))


def _json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message)


class Renderer:
    """Renders outbox entries, reading the binding records binding events need (one pipelined round trip)."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    async def render(self, entries: Sequence[OutboxEntry]) -> list[RenderedEvent | Unrenderable]:
        """Each entry's event, or why it has none, in order. A Redis failure raises (the entries stay in the outbox
        for the next round); rendering itself reads nothing more, so an entry it fails on fails every time."""
        records = await self._binding_records([e.source for e in entries if e.type in BINDING_TYPES])
        out: list[RenderedEvent | Unrenderable] = []
        for entry in entries:
            try:
                data = self._data(entry, records)
            except Unrenderable as exc:
                out.append(exc)
                continue
            except Exception as exc:  # a bug: the same every time, so it must not hold up the outbox either
                # Where it failed and what, not the exception's text: that may hold a party's number.
                log.error(
                    "events render failed",
                    extra={
                        "entry_id": entry.entry_id,
                        "type": entry.type,
                        "error": type(exc).__name__,
                        "where": "".join(traceback.format_tb(exc.__traceback__)),
                    },
                )
                out.append(Unrenderable("render_failed", f"entry {entry.entry_id}: {type(exc).__name__}"))
                continue
            event_id = entry.event_id
            out.append(
                RenderedEvent(
                    entry.entry_id,
                    event_id,
                    entry.type,
                    entry.tenant_id,
                    entry.at_ms,
                    event_body(event_id, entry.type, entry.at_ms, data),
                )
            )
        return out

    def _data(self, entry: OutboxEntry, records: BindingRecords) -> Any:
        if entry.type in BINDING_TYPES:
            return self._binding(entry, records)
        if entry.type == event_keys.CDR_CREATED:
            try:
                record = cdr_pb2.CallDetailRecord.FromString(entry.data)
            except DecodeError:
                raise Unrenderable("malformed", f"entry {entry.entry_id}: d is no CallDetailRecord") from None
            # The stored bytes carry no ingest_time: ListCdrs takes it from the record's stream id, whose ms the
            # entry's `at` is (cdr ingest.lua), so the event shows the record as ListCdrs does.
            record.ingest_time.CopyFrom(timestamp_from_ms(entry.at_ms))
            return _json(record)
        if entry.type == event_keys.ABUSE_FLAGGED:
            return _json(_abuse_signal(entry))
        return {
            "virtualNumber": entry.source,
            "tenantId": entry.tenant_id,
            "reason": entry.data.decode(errors="replace").split("|", 1)[0],
        }

    def _binding(self, entry: OutboxEntry, records: BindingRecords) -> dict[str, Any]:
        if entry.source not in records:
            raise Unrenderable("binding_gone", f"entry {entry.entry_id}: no record of binding {entry.source}")
        found = records[entry.source]
        if found is None:
            raise Unrenderable("malformed", f"entry {entry.entry_id}: binding {entry.source}'s record is unreadable")
        stored, created_with = found
        if stored.record.tenant_id != entry.tenant_id:
            raise Unrenderable("malformed", f"entry {entry.entry_id}: binding {entry.source} is another tenant's")
        if entry.type == event_keys.BINDING_EXPIRED:
            index = len(stored.events)
        elif entry.index.isdigit() and 1 <= int(entry.index) <= len(stored.events):
            index = int(entry.index)
        else:
            raise Unrenderable(
                "malformed", f"entry {entry.entry_id}: binding {entry.source} has no event {entry.index!r}"
            )
        record = record_after_event(stored, index, created_with=created_with)
        return _json(binding_to_proto(record, city_fallback=stored.city_fallback, now_ms=entry.at_ms))

    async def _binding_records(self, binding_ids: Sequence[str]) -> dict[str, Found | None]:
        ids = list(dict.fromkeys(binding_ids))
        if not ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for binding_id in ids:
                pipe.hgetall(binding_key(binding_id))
            replies = await pipe.execute()
        found: dict[str, Found | None] = {}
        for binding_id, raw in zip(ids, replies, strict=True):
            try:
                stored = decode_stored(binding_id, raw)
            except ValueError:  # a record no binding service wrote so: its entries are dropped as malformed
                stored = None
                found[binding_id] = None
            if stored is not None:
                found[binding_id] = (stored, _created_with(raw))
        return found


def _lenient_text(value: Any) -> str:
    """A field as text; bytes that are not UTF-8 (no producer writes them) become U+FFFD and fail the checks."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _created_with(raw: Mapping[Any, Any]) -> tuple[int, bool] | None:
    """The create's (call restriction, recording) from the record's `rq`, when it has one."""
    request = raw.get(b"rq", raw.get("rq"))
    if request is None:
        return None
    parts = as_text(request).split("|")
    if len(parts) <= _REQUEST_RECORDING or not parts[_REQUEST_RESTRICTION].isdigit():
        return None
    return int(parts[_REQUEST_RESTRICTION]), parts[_REQUEST_RECORDING] == "1"


def _abuse_signal(entry: OutboxEntry) -> cdr_pb2.AbuseSignal:
    number, _, caller = entry.source.partition("|")
    parts = entry.data.decode(errors="replace").split("|")
    if not caller or len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise Unrenderable("malformed", f"entry {entry.entry_id}: abuse data is not window|short|unanswered|total")
    window_ms, short, unanswered, total = (int(p) for p in parts)
    return cdr_pb2.AbuseSignal(
        virtual_number=number,
        calling_number=mask(caller),
        total_calls=total,
        short_calls=short,
        unanswered_calls=unanswered,
        flagged=True,
        window_start=timestamp_from_ms(window_ms),
    )
