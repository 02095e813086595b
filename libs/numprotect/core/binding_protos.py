"""Binding records and events as the protobuf messages of numprotect.binding.v1: the binding service answers with
them, and the events service renders binding.* webhooks from them (one conversion, so both say the same)."""

from __future__ import annotations

from dataclasses import replace

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.common.v1 import common_pb2
from numprotect.core.binding_records import BindingEvent, BindingRecord, StoredBinding
from numprotect.core.conversions import timestamp_from_ms

# Event change keys (as stored in the record) -> the Binding fields they set.
_EVENT_FIELDS = {"b": "party_b", "exp": "expire_time", "r": "call_restriction", "rec": "recording_enabled"}


def binding_state(record: BindingRecord, now_ms: int) -> common_pb2.BindingState.ValueType:
    """DELETED, EXPIRED (derived from expire_time: nothing is written at expiry) or ACTIVE at `now_ms`."""
    if record.delete_ms:
        return common_pb2.BINDING_STATE_DELETED
    if record.expire_ms <= now_ms:
        return common_pb2.BINDING_STATE_EXPIRED
    return common_pb2.BINDING_STATE_ACTIVE


def binding_to_proto(record: BindingRecord, *, city_fallback: bool = False, now_ms: int) -> pb.Binding:
    """The Binding message of a record, its state as of `now_ms`."""
    message = pb.Binding(
        binding_id=record.binding_id,
        tenant_id=record.tenant_id,
        out_order_id=record.out_order_id,
        mode=record.mode,  # type: ignore[arg-type]
        party_a=record.party_a,
        party_b=record.party_b,
        virtual_number=record.virtual_number,
        extension=record.extension,
        city_code=record.city_code,
        call_restriction=record.call_restriction,  # type: ignore[arg-type]
        recording_enabled=record.recording_enabled,
        create_time=timestamp_from_ms(record.create_ms),
        expire_time=timestamp_from_ms(record.expire_ms),
        state=binding_state(record, now_ms),
        user_consent=record.user_consent,
        allow_any_caller=record.allow_any_caller,
        update_time=timestamp_from_ms(record.update_ms),
        city_fallback=city_fallback,
    )
    if record.delete_ms:
        message.delete_time.CopyFrom(timestamp_from_ms(record.delete_ms))
    return message


def event_to_proto(event: BindingEvent) -> pb.BindingEvent:
    message = pb.BindingEvent(
        time=timestamp_from_ms(event.at_ms),
        kind=event.kind,
        changed_fields=[_EVENT_FIELDS[k] for k in event.changes if k in _EVENT_FIELDS],
        party_b=event.changes.get("b", ""),
        call_restriction=int(event.changes.get("r", "0")),  # type: ignore[arg-type]
        recording_enabled=event.changes.get("rec") == "1",
    )
    if "exp" in event.changes:
        message.expire_time.CopyFrom(timestamp_from_ms(int(event.changes["exp"])))
    return message


def record_after_event(
    stored: StoredBinding, index: int, *, created_with: tuple[int, bool] | None = None
) -> BindingRecord:
    """The record as it stood right after its `index`-th event (1: the create): party B, expiry, call restriction
    and recording as the events up to it set them, update and delete times as of then. The record holds only the
    current values, and the events only what changed: a call restriction or recording flag changed by a later
    event is taken, before its first change, from `created_with` (the create's request: (restriction,
    recording)), else from the record."""
    record = stored.record
    events = stored.events[:index]
    later = stored.events[index:]
    if not events:
        return record
    values: dict[str, str] = {}
    update_ms = record.create_ms
    delete_ms = 0
    for event in events:
        values.update(event.changes)
        if event.kind in ("update", "delete"):
            update_ms = event.at_ms
        if event.kind == "delete":
            delete_ms = event.at_ms
    restriction, recording = record.call_restriction, record.recording_enabled
    if created_with is not None:
        if "r" not in values and any("r" in e.changes for e in later):
            restriction = created_with[0]
        if "rec" not in values and any("rec" in e.changes for e in later):
            recording = created_with[1]
    return replace(
        record,
        party_b=values.get("b", record.party_b),
        expire_ms=int(values.get("exp", record.expire_ms)),
        call_restriction=int(values["r"]) if "r" in values else restriction,
        recording_enabled=values["rec"] == "1" if "rec" in values else recording,
        update_ms=update_ms,
        delete_ms=delete_ms,
    )
