"""Timestamp and Duration conversions: exact round trips, and bad values become INVALID_ARGUMENT on the field."""

from __future__ import annotations

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from numprotect.allocation.v1 import allocation_pb2
from numprotect.core.conversions import (
    DURATION_RULE,
    TIMESTAMP_MAX_MS,
    TIMESTAMP_MIN_MS,
    TIMESTAMP_RULE,
    bounded_duration_ms,
    duration_from_ms,
    duration_ms,
    duration_seconds,
    in_timestamp_range,
    optional_timestamp_ms,
    seconds_text,
    timestamp_from_ms,
    timestamp_ms,
)
from numprotect.core.errors import InvalidArgument


@pytest.mark.parametrize("ms", [0, 1, 999, 1_764_000_000_123, -1, -62_135_596_800_000, 253_402_300_799_999])
def test_timestamp_round_trips_epoch_ms(ms: int) -> None:
    stamp = timestamp_from_ms(ms)
    assert stamp.seconds * 1000 + stamp.nanos // 1_000_000 == ms
    assert 0 <= stamp.nanos < 1_000_000_000
    assert timestamp_ms("at", stamp) == ms


def test_timestamp_ms_drops_sub_millisecond_nanos_rounding_down() -> None:
    assert timestamp_ms("at", Timestamp(seconds=10, nanos=1_999_999)) == 10_001


@pytest.mark.parametrize(
    "stamp",
    [
        Timestamp(seconds=253_402_300_800),
        Timestamp(seconds=-62_135_596_801),
        Timestamp(seconds=1, nanos=1_000_000_000),
        Timestamp(seconds=1, nanos=-1),
    ],
)
def test_out_of_range_timestamp_is_invalid_argument_naming_the_field(stamp: Timestamp) -> None:
    with pytest.raises(InvalidArgument) as caught:
        timestamp_ms("expire_time", stamp)
    assert [(v.field, v.description) for v in caught.value.violations] == [("expire_time", TIMESTAMP_RULE)]


def test_optional_timestamp_is_none_when_unset_and_names_the_path_when_bad() -> None:
    request = allocation_pb2.ConfirmReservationRequest()
    assert optional_timestamp_ms(request, "expire_time") is None
    request.expire_time.seconds = 5
    assert optional_timestamp_ms(request, "expire_time") == 5000
    request.expire_time.seconds = 10**12
    with pytest.raises(InvalidArgument) as caught:
        optional_timestamp_ms(request, "expire_time", path="reservation.expire_time")
    assert caught.value.violations[0].field == "reservation.expire_time"


@pytest.mark.parametrize("ms", [0, 1, 1500, 86_400_000, -1, -1500])
def test_duration_round_trips_ms(ms: int) -> None:
    duration = duration_from_ms(ms)
    assert duration_ms("ttl", duration) == ms
    assert duration_seconds("ttl", duration) == ms / 1000


def test_duration_ms_rounds_toward_zero_like_protobuf() -> None:
    for duration in (Duration(seconds=1, nanos=1_999_999), Duration(seconds=-1, nanos=-1_999_999)):
        assert duration_ms("ttl", duration) == duration.ToMilliseconds()


@pytest.mark.parametrize(
    "duration",
    [
        Duration(seconds=315_576_000_001),
        Duration(seconds=1, nanos=-5),
        Duration(seconds=-1, nanos=5),
        Duration(nanos=1_000_000_000),
    ],
)
def test_invalid_duration_is_invalid_argument_naming_the_field(duration: Duration) -> None:
    with pytest.raises(InvalidArgument) as caught:
        duration_ms("lease", duration)
    assert [(v.field, v.description) for v in caught.value.violations] == [("lease", DURATION_RULE)]


def test_bounded_duration_checks_the_type_first_then_the_fields_own_range() -> None:
    assert bounded_duration_ms("ttl", Duration(seconds=60), 1, 3_600_000) == 60_000
    with pytest.raises(InvalidArgument) as caught:
        bounded_duration_ms("ttl", Duration(seconds=1, nanos=-1), 1, 3_600_000)
    assert [(v.field, v.description) for v in caught.value.violations] == [("ttl", DURATION_RULE)]
    for outside in (Duration(), Duration(seconds=3601), Duration(seconds=315_576_000_000)):
        with pytest.raises(InvalidArgument) as caught:
            bounded_duration_ms("ttl", outside, 1, 3_600_000, setting="NUMPROTECT_X")
        assert [(v.field, v.description) for v in caught.value.violations] == [
            ("ttl", "must be between 0.001s and 3600s (NUMPROTECT_X) (or unset)")
        ]


def test_timestamp_range_is_what_timestamp_from_ms_can_write() -> None:
    for ms in (TIMESTAMP_MIN_MS, 0, TIMESTAMP_MAX_MS):
        assert in_timestamp_range(ms)
        timestamp_from_ms(ms)
    for ms in (TIMESTAMP_MIN_MS - 1, TIMESTAMP_MAX_MS + 1):
        assert not in_timestamp_range(ms)
        with pytest.raises(ValueError):
            timestamp_from_ms(ms)


def test_seconds_text_reads_like_a_setting() -> None:
    assert [seconds_text(ms) for ms in (100, 1000, 1500, 7_776_000_000)] == ["0.1s", "1s", "1.5s", "7776000s"]
