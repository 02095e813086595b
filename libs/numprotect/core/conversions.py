"""Protobuf well-known types <-> the integers the services store (epoch milliseconds, milliseconds).

Reading a field from a request takes the field's name: a value outside what the type allows becomes
INVALID_ARGUMENT naming that field, where protobuf's own ToMilliseconds would raise ValueError (INTERNAL).
A field also has its own business range (a ttl up to the service's maximum, ...): `bounded_duration_ms` checks
both at once, so that nothing computed from an accepted value (now + ttl) can leave the Timestamp range and
fail later, when it is written into a response (timestamp_from_ms raises ValueError outside the range).
"""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from numprotect.core.errors import InvalidArgument

# 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z, the range google.protobuf.Timestamp allows.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
# +-10000 years, the range google.protobuf.Duration allows.
DURATION_MAX_SECONDS = 315_576_000_000
TIMESTAMP_MIN_MS = TIMESTAMP_MIN_SECONDS * 1000
TIMESTAMP_MAX_MS = TIMESTAMP_MAX_SECONDS * 1000 + 999
_NANOS_PER_SECOND = 1_000_000_000
_NANOS_PER_MS = 1_000_000

TIMESTAMP_RULE = "must be a timestamp from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z with nanos 0..999999999"
DURATION_RULE = "must be a duration of at most 10000 years with nanos of the same sign as seconds, |nanos| < 1e9"


def timestamp_from_ms(ms: int) -> Timestamp:
    """The Timestamp for epoch milliseconds."""
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def timestamp_ms(field: str, stamp: Timestamp) -> int:
    """Epoch milliseconds of a request's Timestamp (sub-millisecond nanos dropped, rounding down)."""
    if not TIMESTAMP_MIN_SECONDS <= stamp.seconds <= TIMESTAMP_MAX_SECONDS or not 0 <= stamp.nanos < _NANOS_PER_SECOND:
        raise InvalidArgument.field(field, TIMESTAMP_RULE)
    return stamp.seconds * 1000 + stamp.nanos // _NANOS_PER_MS


def optional_timestamp_ms(message: Message, field: str, *, path: str | None = None) -> int | None:
    """Epoch milliseconds of `message.field`, or None when the field is unset.

    `path` names the field in errors when it is nested (e.g. "binding.expire_time"); default `field`.
    """
    if not message.HasField(field):
        return None
    return timestamp_ms(path or field, getattr(message, field))


def duration_from_ms(ms: int) -> Duration:
    """The Duration for a number of milliseconds."""
    duration = Duration()
    duration.FromMilliseconds(ms)
    return duration


def duration_ms(field: str, duration: Duration) -> int:
    """Milliseconds of a request's Duration (sub-millisecond nanos dropped, rounding toward zero)."""
    seconds, nanos = duration.seconds, duration.nanos
    if (
        abs(seconds) > DURATION_MAX_SECONDS
        or abs(nanos) >= _NANOS_PER_SECOND
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise InvalidArgument.field(field, DURATION_RULE)
    whole_ms = nanos // _NANOS_PER_MS if nanos >= 0 else -(-nanos // _NANOS_PER_MS)
    return seconds * 1000 + whole_ms


def bounded_duration_ms(field: str, duration: Duration, minimum_ms: int, maximum_ms: int, *, setting: str = "") -> int:
    """duration_ms, also INVALID_ARGUMENT unless minimum_ms <= value <= maximum_ms (`setting`: what sets the bound)."""
    ms = duration_ms(field, duration)
    if not minimum_ms <= ms <= maximum_ms:
        source = f" ({setting})" if setting else ""
        raise InvalidArgument.field(
            field, f"must be between {seconds_text(minimum_ms)} and {seconds_text(maximum_ms)}{source} (or unset)"
        )
    return ms


def seconds_text(ms: int) -> str:
    """Milliseconds as a person reads seconds: 100 -> "0.1s", 7776000000 -> "7776000s"."""
    return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"


def in_timestamp_range(ms: int) -> bool:
    """True when epoch milliseconds `ms` can be written as a Timestamp (timestamp_from_ms does not raise)."""
    return TIMESTAMP_MIN_MS <= ms <= TIMESTAMP_MAX_MS


def duration_seconds(field: str, duration: Duration) -> float:
    """Seconds of a request's Duration, at millisecond precision."""
    return duration_ms(field, duration) / 1000
