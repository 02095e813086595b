"""Translate on real Redis and real gRPC: every decision and reason, per binding mode."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from numprotect.core.call_ref import CallRef
from numprotect.core.routes import (
    MODE_AXE,
    MODE_AXN,
    RESTRICTION_A_TO_B_ONLY,
    RESTRICTION_B_TO_A_ONLY,
    lock_key,
)
from numprotect.translation.v1 import translation_pb2 as pb

X = "700100000000001"
A = "13800000001"
B = "13900000002"
N = "13600000004"
STRANGER = "13700000003"


async def test_axb_connects_a_to_b_and_b_to_a_showing_the_virtual_number(tr: Any) -> None:
    await tr.put(tr.route("b1", tenant_id="t1", recording=True))
    to_b = await tr.translate(A, call_id="c-ab")
    assert to_b.decision == pb.DECISION_CONNECT
    assert (to_b.target_number, to_b.display_number, to_b.call_id) == (B, X, "c-ab")
    assert (to_b.binding_id, to_b.tenant_id, to_b.recording_enabled) == ("b1", "t1", True)
    assert to_b.reject_reason == pb.REJECT_REASON_UNSPECIFIED
    ref = CallRef.decode(to_b.call_ref)
    assert (ref.binding_id, ref.virtual_number) == ("b1", X)
    assert ref.setup_ms > 0

    to_a = await tr.translate(B, call_id="c-ba")
    assert (to_a.decision, to_a.target_number, to_a.display_number) == (pb.DECISION_CONNECT, A, X)


async def test_axb_rejects_anyone_else_with_no_binding(tr: Any) -> None:
    await tr.put(tr.route())
    reply = await tr.translate(STRANGER)
    assert (reply.decision, reply.reject_reason) == (pb.DECISION_REJECT, pb.REJECT_REASON_NO_BINDING)
    assert reply.target_number == "" and reply.display_number == ""


async def test_unknown_number_is_no_binding(tr: Any) -> None:
    tr.route_blocks("700999999999999")  # a block the carrier routes, with no binding on the number
    reply = await tr.translate(A, called="700999999999999")
    assert (reply.decision, reply.reject_reason) == (pb.DECISION_REJECT, pb.REJECT_REASON_NO_BINDING)


async def test_carrier_forms_of_the_calling_number_are_normalised(tr: Any) -> None:
    await tr.put(tr.route())
    for raw in ("+86" + A, "0086" + A, "86" + A, "0" + A, "+86 138-0000-0001"):
        reply = await tr.translate(raw)
        assert (reply.decision, reply.target_number) == (pb.DECISION_CONNECT, B), raw


async def test_axb_call_restriction_is_direction_not_allowed(tr: Any) -> None:
    await tr.put(tr.route("ab", restriction=RESTRICTION_A_TO_B_ONLY))
    assert (await tr.translate(A)).decision == pb.DECISION_CONNECT
    back = await tr.translate(B)
    assert (back.decision, back.reject_reason) == (pb.DECISION_REJECT, pb.REJECT_REASON_DIRECTION_NOT_ALLOWED)
    assert (back.binding_id, back.tenant_id) == ("ab", "t1")

    other = "700100000000002"
    await tr.put(tr.route("ba", restriction=RESTRICTION_B_TO_A_ONLY), other)
    assert (await tr.translate(B, called=other)).target_number == A
    forth = await tr.translate(A, called=other)
    assert forth.reject_reason == pb.REJECT_REASON_DIRECTION_NOT_ALLOWED


async def test_axn_anyone_reaches_a_and_a_reaches_n(tr: Any) -> None:
    await tr.put(tr.route("n1", MODE_AXN, party_b=N, recording=False))
    for caller in (STRANGER, B, "+12025550123"):
        reply = await tr.translate(caller)
        assert (reply.decision, reply.target_number, reply.display_number) == (pb.DECISION_CONNECT, A, X), caller
        assert reply.recording_enabled is False
    own = await tr.translate(A)
    assert (own.decision, own.target_number, own.binding_id) == (pb.DECISION_CONNECT, N, "n1")


async def test_axn_owner_without_default_party_is_direction_not_allowed(tr: Any) -> None:
    await tr.put(tr.route("n1", MODE_AXN, party_b=""))
    reply = await tr.translate(A)
    assert (reply.decision, reply.reject_reason) == (pb.DECISION_REJECT, pb.REJECT_REASON_DIRECTION_NOT_ALLOWED)
    assert (await tr.translate(STRANGER)).target_number == A


async def test_axe_extension_selects_the_binding(tr: Any) -> None:
    await tr.put(tr.route("e1", MODE_AXE), extension="1234")
    await tr.put(tr.route("e2", MODE_AXE, party_a="13811111111", party_b="13922222222"), extension="5678")
    first = await tr.translate(B, extension="1234")
    assert (first.decision, first.target_number, first.binding_id) == (pb.DECISION_CONNECT, A, "e1")
    assert (await tr.translate(A, extension="1234")).target_number == B
    second = await tr.translate("13922222222", extension="5678")
    assert (second.target_number, second.binding_id) == ("13811111111", "e2")


async def test_axe_without_extension_collects_one(tr: Any) -> None:
    await tr.put(tr.route("e1", MODE_AXE), extension="1234")
    reply = await tr.translate(B)
    assert reply.decision == pb.DECISION_COLLECT_EXTENSION
    assert reply.reject_reason == pb.REJECT_REASON_UNSPECIFIED and reply.target_number == ""


async def test_axe_unknown_extension_or_stranger_is_no_binding(tr: Any) -> None:
    await tr.put(tr.route("e1", MODE_AXE), extension="1234")
    assert (await tr.translate(B, extension="9999")).reject_reason == pb.REJECT_REASON_NO_BINDING
    assert (await tr.translate(STRANGER, extension="1234")).reject_reason == pb.REJECT_REASON_NO_BINDING


async def test_axe_allow_any_caller_reaches_a(tr: Any) -> None:
    await tr.put(tr.route("e1", MODE_AXE, allow_any_caller=True), extension="1234")
    reply = await tr.translate(STRANGER, extension="1234")
    assert (reply.decision, reply.target_number) == (pb.DECISION_CONNECT, A)


async def test_locked_number_rejects_every_call(tr: Any, redis_sync: Any) -> None:
    await tr.put(tr.route())
    redis_sync.set(lock_key(X), "fraud report")  # as allocation's LockNumber does
    reply = await tr.translate(A)
    assert (reply.decision, reply.reject_reason) == (pb.DECISION_REJECT, pb.REJECT_REASON_NUMBER_LOCKED)
    redis_sync.delete(lock_key(X))
    assert (await tr.translate(A)).decision == pb.DECISION_CONNECT


async def test_expired_binding_stops_translating(tr: Any) -> None:
    await tr.put(tr.route(ttl_ms=300))
    assert (await tr.translate(A)).decision == pb.DECISION_CONNECT
    await asyncio.sleep(0.45)
    reply = await tr.translate(A)
    assert (reply.decision, reply.reject_reason) == (pb.DECISION_REJECT, pb.REJECT_REASON_NO_BINDING)


async def test_deleted_binding_is_no_binding(tr: Any) -> None:
    route = await tr.put(tr.route())
    await tr.routes.remove(X, route)
    assert (await tr.translate(B)).reject_reason == pb.REJECT_REASON_NO_BINDING


async def test_rate_limit_per_caller_triggers_and_recovers(translation_factory: Any) -> None:
    tr = await translation_factory(
        {"NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "3", "NUMPROTECT_TRANSLATION_RATE_WINDOW": "600ms"}
    )
    await tr.put(tr.route("n1", MODE_AXN))
    decisions = [(await tr.translate(STRANGER)).decision for _ in range(3)]
    assert decisions == [pb.DECISION_CONNECT] * 3
    limited = await tr.translate(STRANGER)
    assert (limited.decision, limited.reject_reason) == (pb.DECISION_REJECT, pb.REJECT_REASON_RATE_LIMITED)
    assert limited.binding_id == "n1"
    # Another caller of the same number has its own allowance.
    assert (await tr.translate(B)).decision == pb.DECISION_CONNECT
    await asyncio.sleep(0.7)
    assert (await tr.translate(STRANGER)).decision == pb.DECISION_CONNECT


async def test_rate_limit_per_binding_counts_every_caller(translation_factory: Any) -> None:
    tr = await translation_factory(
        {"NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "4", "NUMPROTECT_TRANSLATION_RATE_WINDOW": "600ms"}
    )
    await tr.put(tr.route("n1", MODE_AXN))
    callers = [f"1370000000{i}" for i in range(5)]
    replies = [await tr.translate(c) for c in callers]
    assert [r.decision for r in replies] == [pb.DECISION_CONNECT] * 4 + [pb.DECISION_REJECT]
    assert replies[-1].reject_reason == pb.REJECT_REASON_RATE_LIMITED
    await asyncio.sleep(0.7)
    assert (await tr.translate(callers[-1])).decision == pb.DECISION_CONNECT


def _violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    metadata: Any = error.trailing_metadata() or ()
    raw = dict(metadata).get("grpc-status-details-bin")
    assert isinstance(raw, bytes)
    status = status_pb2.Status.FromString(raw)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return [(v.field, v.description) for v in bad.field_violations]


@pytest.mark.parametrize(
    ("caller", "called", "extension", "field"),
    [
        (A, "", "", "called_number"),
        (A, "70010000000", "", "called_number"),
        (A, "13800000001", "", "called_number"),
        (A, "+86700100000000001", "", "called_number"),
        ("", X, "", "calling_number"),
        ("anonymous", X, "", "calling_number"),
        ("12", X, "", "calling_number"),
        (A, X, "12a", "extension"),
        (A, X, "\u0661\u0662", "extension"),  # Arabic-Indic digits
        (A, "700" + "\uff11" * 12, "", "called_number"),  # full-width digits
        ("\uff11\uff13\uff18" + "\uff10" * 7 + "\uff11", X, "", "calling_number"),
        ("1380000\x000001", X, "", "calling_number"),
        ("1" * 65536, X, "", "calling_number"),
        ("+", X, "", "calling_number"),
    ],
)
async def test_malformed_numbers_are_invalid_argument_naming_the_field(
    tr: Any, caller: str, called: str, extension: str, field: str
) -> None:
    tr.route_blocks(X)  # the carrier's number: the other fields are checked after the number's carrier
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tr.translate(caller, called=called, extension=extension)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in _violations(info.value)] == [field]


async def test_a_call_id_follows_the_cdr_rule(tr: Any) -> None:
    """The call id comes back on the CDR, whose rule refuses these: Translate refuses them too (empty: none sent)."""
    await tr.put(tr.route())
    assert (await tr.translate(B, call_id="")).decision == pb.DECISION_CONNECT
    assert (await tr.translate(B, call_id="sw1:0042/7")).call_id == "sw1:0042/7"
    for call_id in ("a b", "\u00e9", "c\x00", "x" * 129, "x" * 65536):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await tr.translate(B, call_id=call_id)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in _violations(info.value)] == ["call_id"]


async def test_foreign_and_service_callers_are_accepted_as_digits(tr: Any) -> None:
    await tr.put(tr.route())
    for caller in ("+12025550123", "95555", "700100000000009"):
        reply = await tr.translate(caller)
        assert (reply.decision, reply.reject_reason) == (pb.DECISION_REJECT, pb.REJECT_REASON_NO_BINDING), caller
