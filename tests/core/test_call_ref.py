"""call_ref round-trips and refuses what the platform did not issue."""

from __future__ import annotations

import base64

import pytest

from numprotect.core.call_ref import CallRef, encode_call_ref


def test_call_ref_round_trips_with_and_without_trace_context() -> None:
    traced = CallRef("b-123", "700100000000001", 1_764_000_000_000, trace_id=0xABC, span_id=0x12)
    assert CallRef.decode(traced.encode()) == traced
    plain = CallRef("b-123", "700100000000001", 1_764_000_000_000)
    assert CallRef.decode(plain.encode()) == plain
    assert "=" not in plain.encode()
    assert "13800000001" not in traced.encode()


@pytest.mark.parametrize("bad", ["", "!!!", "YWJj", CallRef("b", "x", 1).encode()[:-3]])
def test_foreign_call_refs_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="call_ref"):
        CallRef.decode(bad)


@pytest.mark.parametrize("binding_id", ["b-1", "b?>~", "绑定-7", "x" * 61])
def test_encoding_is_url_safe_base64_of_the_fields_without_padding(binding_id: str) -> None:
    expected_raw = f"c1|{binding_id}|700100000000001|1764000000000|abc|12".encode()
    expected = base64.urlsafe_b64encode(expected_raw).decode().rstrip("=")
    encoded = encode_call_ref(binding_id, "700100000000001", 1_764_000_000_000, 0xABC, 0x12)
    assert encoded == expected
    assert encoded == CallRef(binding_id, "700100000000001", 1_764_000_000_000, 0xABC, 0x12).encode()
