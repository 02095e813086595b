"""Per-record validation: a record is either accepted into a normalised `ValidCdr` or rejected with a reason.

Rules (docs/cdr.md, "Validation"):
- call_id: required, 1 to 128 visible ASCII characters (0x21-0x7E).
- called_number: a 15-digit 700 number.
- calling_number: required; the calling-number rule of Translate and the blocklists (phone.normalize_calling):
  Chinese numbers are normalised (+86/0086/86 removed), any other number is kept as its digits (3 to 20, an
  optional leading +), so the record of every call Translate answered is accepted.
- target_number (optional): a real Chinese number, normalised. display_number (optional): a 700 number or a
  real number. extension (optional): 1 to 4 digits.
- call_time and release_time required; call <= ring <= answer <= release for those present; call_time not
  older than the retention and not further in the future than the allowed clock skew.
- release_cause 0..127; call_type, release_direction, unconnected_cause: a value the contract defines.
- binding_id, tenant_id, out_order_id, carrier_id (optional): at most 128 visible ASCII characters each.
- Output-only fields (binding_match, ingest_time, billable_seconds) are ignored and recomputed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.call_ref import CallRef
from numprotect.core.conversions import optional_timestamp_ms
from numprotect.core.errors import InvalidArgument
from numprotect.core.identifiers import CALL_ID, CALL_ID_MAX, IdentifierRule
from numprotect.core.phone import (
    InvalidNumber,
    normalize_calling,
    normalize_party,
    validate_extension,
    validate_virtual,
)

MAX_ID_FIELD = 128
MAX_URL = 2048
# binding_id, tenant_id, out_order_id and carrier_id of a record: what a carrier may send is bounded and printable,
# so a stored record's ids can be looked up (ListCdrs builds an index key from binding_id by the same rule).
RECORD_ID = IdentifierRule(
    re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_FIELD}}}"),
    f"must be 1-{MAX_ID_FIELD} visible ASCII characters",
)


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    call_id: str
    field: str
    reason: str

    def to_proto(self) -> cdr_pb2.RejectedRecord:
        return cdr_pb2.RejectedRecord(index=self.index, call_id=self.call_id, field=self.field, reason=self.reason)


class _Reject(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(slots=True)
class ValidCdr:
    """A record that passed validation: numbers normalised, output-only fields cleared, facts derived."""

    index: int
    record: cdr_pb2.CallDetailRecord
    call_ms: int
    answered: bool
    billable_seconds: int
    # The decoded call_ref when it was one this platform issued for this virtual number.
    call_ref: CallRef | None
    # The call's end (release_time), for the ingestion lag.
    release_ms: int = 0


def _timestamp(record: cdr_pb2.CallDetailRecord, field: str, *, required: bool) -> int | None:
    ms = optional_timestamp_ms(record, field)  # InvalidArgument for a value no Timestamp may hold
    if ms is None:
        if required:
            raise _Reject(field, "is required")
        return None
    if ms < 1000:
        raise _Reject(field, "must be after 1970-01-01T00:00:00Z")
    return ms


def _enum(record: cdr_pb2.CallDetailRecord, field: str, enum: object) -> None:
    value = getattr(record, field)
    descriptor = enum.DESCRIPTOR  # type: ignore[attr-defined]
    if descriptor.values_by_number.get(value) is None:
        names = ", ".join(v.name for v in descriptor.values)
        raise _Reject(field, f"unknown value {value}; must be one of {names}")


def _calling(raw: str) -> str:
    try:
        return normalize_calling(raw)
    except InvalidNumber as exc:
        raise _Reject("calling_number", str(exc)) from None


def _bounded(record: cdr_pb2.CallDetailRecord, field: str, limit: int) -> None:
    if len(getattr(record, field)) > limit:
        raise _Reject(field, f"must be at most {limit} characters")


def validate(
    index: int,
    incoming: cdr_pb2.CallDetailRecord,
    *,
    now_ms: int,
    retention_ms: int,
    max_clock_skew_ms: int,
) -> ValidCdr | Rejection:
    """Checks one record; never raises for bad input."""
    try:
        return _validate(index, incoming, now_ms=now_ms, retention_ms=retention_ms, max_clock_skew_ms=max_clock_skew_ms)
    except _Reject as exc:
        return Rejection(index, incoming.call_id[:CALL_ID_MAX], exc.field, exc.reason)
    except InvalidArgument as exc:  # a shared rule (numprotect.core.identifiers, conversions) refused a field
        first = exc.violations[0]
        return Rejection(index, incoming.call_id[:CALL_ID_MAX], first.field, first.description)


def _validate(
    index: int, incoming: cdr_pb2.CallDetailRecord, *, now_ms: int, retention_ms: int, max_clock_skew_ms: int
) -> ValidCdr:
    record = cdr_pb2.CallDetailRecord()
    record.CopyFrom(incoming)
    CALL_ID.check("call_id", record.call_id)

    try:
        validate_virtual(record.called_number)
    except InvalidNumber as exc:
        raise _Reject("called_number", str(exc)) from None
    if not record.calling_number:
        raise _Reject("calling_number", "is required")
    record.calling_number = _calling(record.calling_number)
    if record.target_number:
        try:
            record.target_number = normalize_party(record.target_number)
        except InvalidNumber as exc:
            raise _Reject("target_number", str(exc)) from None
    if record.display_number and not record.display_number.startswith("700"):
        try:
            record.display_number = normalize_party(record.display_number)
        except InvalidNumber as exc:
            raise _Reject("display_number", f"must be a 700 number or a real number: {exc}") from None
    elif record.display_number:
        try:
            validate_virtual(record.display_number)
        except InvalidNumber as exc:
            raise _Reject("display_number", str(exc)) from None
    if record.extension:
        try:
            validate_extension(record.extension)
        except InvalidNumber as exc:
            raise _Reject("extension", str(exc)) from None

    call_ms = _timestamp(record, "call_time", required=True)
    ring_ms = _timestamp(record, "ring_time", required=False)
    answer_ms = _timestamp(record, "answer_time", required=False)
    release_ms = _timestamp(record, "release_time", required=True)
    assert call_ms is not None and release_ms is not None
    previous_name, previous_ms = "call_time", call_ms
    for name, value in (("ring_time", ring_ms), ("answer_time", answer_ms), ("release_time", release_ms)):
        if value is None:
            continue
        if value < previous_ms:
            raise _Reject(name, f"must not be before {previous_name} (call <= ring <= answer <= release)")
        previous_name, previous_ms = name, value
    if call_ms < now_ms - retention_ms:
        raise _Reject("call_time", "is older than the retention period; the record can no longer be accepted")
    if call_ms > now_ms + max_clock_skew_ms:
        raise _Reject("call_time", "is in the future (beyond the allowed clock skew)")

    if not 0 <= record.release_cause <= 127:
        raise _Reject("release_cause", "must be a Q.850 cause from 0 to 127")
    _enum(record, "call_type", cdr_pb2.CallType)
    _enum(record, "release_direction", cdr_pb2.ReleaseDirection)
    _enum(record, "unconnected_cause", cdr_pb2.UnconnectedCause)
    for name in ("binding_id", "tenant_id", "out_order_id", "carrier_id"):
        RECORD_ID.check(name, getattr(record, name), required=False)
    _bounded(record, "recording_url", MAX_URL)
    _bounded(record, "call_ref", MAX_URL)

    call_ref: CallRef | None = None
    if record.call_ref:
        try:
            decoded = CallRef.decode(record.call_ref)
        except ValueError:
            decoded = None
        # A call_ref for another number (a carrier mix-up) is not trusted for enrichment.
        if decoded is not None and decoded.virtual_number == record.called_number and decoded.binding_id:
            call_ref = decoded

    answered = answer_ms is not None
    billable = -(-(release_ms - answer_ms) // 1000) if answer_ms is not None else 0
    record.ClearField("binding_match")
    record.ClearField("ingest_time")
    record.billable_seconds = billable
    return ValidCdr(
        index=index,
        record=record,
        call_ms=call_ms,
        answered=answered,
        billable_seconds=billable,
        call_ref=call_ref,
        release_ms=release_ms,
    )
