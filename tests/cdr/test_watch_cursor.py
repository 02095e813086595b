"""WatchCdrs cursors (services/cdr/watch.py): one bucket's cursor is the bare stream id, as before buckets; several
buckets' a versioned token with a position per bucket; anything else is INVALID_ARGUMENT naming cursor."""

from __future__ import annotations

import base64

import pytest

from numprotect.core.errors import InvalidArgument
from numprotect.services.cdr.watch import CURSOR_PREFIX, check_cursor, decode_cursor, encode_cursor

MAX_ID = f"{2**64 - 1}-{2**64 - 1}"


@pytest.mark.parametrize(
    "positions",
    [
        ["1764000000000-0", "1764000000123-7", "0-0", "1763999999999-18446744073709551615"],
        ["0-0", "0-0"],
        [MAX_ID, "0-0", MAX_ID],
        [f"{1764000000000 + i}-{i}" for i in range(64)],
    ],
)
def test_a_cursor_of_several_buckets_decodes_to_its_positions(positions: list[str]) -> None:
    cursor = encode_cursor(positions)
    assert cursor.startswith(CURSOR_PREFIX)
    check_cursor(cursor)
    assert decode_cursor(cursor, len(positions)) == positions


def test_a_cursor_stays_short_for_close_positions() -> None:
    positions = [f"{1764000000000 + 37 * i}-{i % 3}" for i in range(16)]
    assert len(encode_cursor(positions)) <= 60  # a few bytes per bucket, sent with every record


def test_one_bucket_cursors_are_bare_stream_ids_as_before_buckets() -> None:
    assert encode_cursor(["1764000000000-3"]) == "1764000000000-3"
    assert decode_cursor("1764000000000-3", 1) == ["1764000000000-3"]
    assert decode_cursor("0", 1) == ["0-0"]
    assert decode_cursor("0", 3) == ["0-0"] * 3
    # A bare id of an owner with several buckets: bucket 0's position, the others from their start.
    assert decode_cursor("1764000000000-3", 3) == ["1764000000000-3", "0-0", "0-0"]


def _raw(data: bytes) -> str:
    return CURSOR_PREFIX + base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "yesterday",
        "2.",
        "2.!!!",
        _raw(b""),
        _raw(bytes([1, 0, 0])),  # one bucket: that is a bare id, never a token
        _raw(bytes([65]) + bytes(130)),  # more buckets than there may be
        _raw(bytes([2, 0, 0, 0])),  # cut short
        _raw(bytes([2, 0, 0, 0, 0, 0])),  # trailing bytes
        _raw(bytes([2, 0x80] * 12)),  # a varint that never ends
        _raw(bytes([2, 0, 0]) + bytes([0x80] * 9 + [0x04]) + bytes([0])),  # a part past 64 bits
        _raw(bytes([2, 1, 0, 0, 0])),  # a position before 0
        CURSOR_PREFIX + "A" * 5000,
    ],
)
def test_malformed_cursors_are_refused_naming_the_field(cursor: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_cursor(cursor)
    assert [v.field for v in raised.value.violations] == ["cursor"]


def test_a_cursor_of_another_bucket_count_is_refused() -> None:
    cursor = encode_cursor(["1-0", "2-0", "3-0"])
    with pytest.raises(InvalidArgument, match="over 3 buckets; this tenant's records are in 4"):
        decode_cursor(cursor, 4)
