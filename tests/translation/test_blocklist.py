"""Blocklists: Block/Unblock/List RPCs in Redis, enforced on the hot path from each process's in-process copy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from numprotect.core.conversions import TIMESTAMP_MAX_SECONDS
from numprotect.core.routes import MODE_AXN
from numprotect.services.translation.blocklist import MAX_TTL_MS, list_key
from numprotect.translation.v1 import translation_pb2 as pb
from support.rpc import fails, violated_fields

X = "700100000000001"
X2 = "700100000000002"
A = "13800000001"
B = "13900000002"
SPAMMER = "13700000003"
# The test settings poll every 100 ms; the documented delay is one refresh interval plus one reload.
PROPAGATION = 0.1


async def _eventually(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until check() is true; fails after `within`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, f"not within {within}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def _block(tenant_id: str, number: str, ttl_ms: int = 0, reason: str = "marketing") -> pb.BlockCallerRequest:
    request = pb.BlockCallerRequest(tenant_id=tenant_id, calling_number=number, reason=reason)
    if ttl_ms:
        request.ttl.FromMilliseconds(ttl_ms)
    return request


async def _is(tr: Any, caller: str, called: str, reason: int) -> bool:
    return bool((await tr.translate(caller, called=called)).reject_reason == reason)


async def test_global_block_rejects_within_the_refresh_delay_and_unblock_restores(tr: Any) -> None:
    await tr.put(tr.route("n1", MODE_AXN))
    assert (await tr.translate(SPAMMER)).decision == pb.DECISION_CONNECT
    reply = await tr.operator.BlockCaller(_block("", "+86" + SPAMMER))
    assert (reply.entry.calling_number, reply.entry.tenant_id, reply.entry.reason) == (SPAMMER, "", "marketing")
    assert reply.entry.create_time.seconds > 0 and not reply.entry.HasField("expire_time")
    waited = await _eventually(lambda: _is(tr, SPAMMER, X, pb.REJECT_REASON_CALLER_BLOCKED), 3 * PROPAGATION + 0.5)
    assert waited <= 3 * PROPAGATION + 0.5
    blocked = await tr.translate(SPAMMER)
    assert (blocked.decision, blocked.target_number) == (pb.DECISION_REJECT, "")
    assert (await tr.translate(B)).decision == pb.DECISION_CONNECT  # others unaffected

    await tr.operator.UnblockCaller(pb.UnblockCallerRequest(tenant_id="", calling_number=SPAMMER))
    await _eventually(lambda: _is(tr, SPAMMER, X, pb.REJECT_REASON_UNSPECIFIED), 3 * PROPAGATION + 0.5)
    assert (await tr.translate(SPAMMER)).target_number == A


async def test_tenant_block_applies_to_that_tenants_bindings_only(tr: Any) -> None:
    await tr.put(tr.route("n1", MODE_AXN, tenant_id="t1"), X)
    await tr.put(tr.route("n2", MODE_AXN, tenant_id="t2"), X2)
    await tr.tenant("t1").BlockCaller(_block("", SPAMMER))  # a tenant key: an empty tenant_id is its own list
    await _eventually(lambda: _is(tr, SPAMMER, X, pb.REJECT_REASON_CALLER_BLOCKED), 3 * PROPAGATION + 0.5)
    blocked = await tr.translate(SPAMMER, called=X)
    assert (blocked.binding_id, blocked.tenant_id) == ("n1", "t1")
    other = await tr.translate(SPAMMER, called=X2)
    assert (other.decision, other.tenant_id) == (pb.DECISION_CONNECT, "t2")


async def test_entries_with_a_ttl_lapse(tr: Any) -> None:
    await tr.put(tr.route("n1", MODE_AXN))
    await tr.operator.BlockCaller(_block("", SPAMMER, ttl_ms=600))
    await _eventually(lambda: _is(tr, SPAMMER, X, pb.REJECT_REASON_CALLER_BLOCKED), 3 * PROPAGATION + 0.5)
    await asyncio.sleep(0.6)
    assert (await tr.translate(SPAMMER)).decision == pb.DECISION_CONNECT
    listed = await tr.operator.ListBlockedCallers(pb.ListBlockedCallersRequest(tenant_id=""))
    assert list(listed.entries) == []


async def test_a_new_process_loads_the_lists_at_start(translation_factory: Any) -> None:
    first = await translation_factory()
    await first.operator.BlockCaller(_block("", SPAMMER))
    second = await translation_factory({"NUMPROTECT_TRANSLATION_BLOCKLIST_REFRESH": "60s"})
    await second.put(second.route("n1", MODE_AXN))
    assert (await second.translate(SPAMMER)).reject_reason == pb.REJECT_REASON_CALLER_BLOCKED


async def test_list_pages_through_one_tenants_entries(tr: Any) -> None:
    numbers = [f"1370000{i:04d}" for i in range(7)]
    t1 = tr.tenant("t1")
    for number in reversed(numbers):
        await t1.BlockCaller(_block("t1", number))
    await tr.tenant("t2").BlockCaller(_block("t2", "13600000000"))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await t1.ListBlockedCallers(pb.ListBlockedCallersRequest(tenant_id="t1", page_size=3, page_token=token))
        seen.extend(e.calling_number for e in page.entries)
        assert all(e.tenant_id == "t1" for e in page.entries)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert (seen, pages) == (numbers, 3)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.BlockCallerRequest(tenant_id="t1", calling_number="not a number"), "calling_number"),
        (pb.BlockCallerRequest(tenant_id="bad tenant{}", calling_number=SPAMMER), "tenant_id"),
        (pb.BlockCallerRequest(tenant_id="t1", calling_number=SPAMMER, ttl=duration_pb2.Duration(seconds=-1)), "ttl"),
    ],
)
async def test_bad_block_requests_are_invalid_argument(tr: Any, request_: pb.BlockCallerRequest, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tr.operator.BlockCaller(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")


@pytest.mark.parametrize(
    "ttl",
    [
        duration_pb2.Duration(seconds=315_576_000_000),  # the largest Duration: now + ttl is past year 9999
        duration_pb2.Duration(seconds=315_576_000_001),
        duration_pb2.Duration(seconds=MAX_TTL_MS // 1000 + 1),
        duration_pb2.Duration(seconds=60, nanos=-1),
        duration_pb2.Duration(seconds=-60, nanos=1),
        duration_pb2.Duration(nanos=1_000_000_000),
        duration_pb2.Duration(nanos=-1),
        duration_pb2.Duration(seconds=0),
    ],
)
async def test_a_ttl_out_of_range_is_invalid_argument_and_stores_nothing(tr: Any, ttl: duration_pb2.Duration) -> None:
    request = pb.BlockCallerRequest(tenant_id="t1", calling_number=SPAMMER, ttl=ttl)
    error = await fails(grpc.StatusCode.INVALID_ARGUMENT, tr.operator.BlockCaller(request))
    assert violated_fields(error) == ["ttl"]
    assert await tr.redis.exists(list_key("t:t1")) == 0
    listed = await tr.operator.ListBlockedCallers(pb.ListBlockedCallersRequest(tenant_id="t1"))
    assert list(listed.entries) == []


async def test_the_longest_ttl_is_listed_with_its_expiry(tr: Any) -> None:
    request = pb.BlockCallerRequest(tenant_id="t1", calling_number=SPAMMER)
    request.ttl.FromMilliseconds(MAX_TTL_MS)
    reply = await tr.operator.BlockCaller(request)
    expected_s = reply.entry.create_time.seconds + MAX_TTL_MS // 1000
    assert abs(reply.entry.expire_time.seconds - expected_s) <= 1
    listed = await tr.operator.ListBlockedCallers(pb.ListBlockedCallersRequest(tenant_id="t1"))
    assert [e.expire_time.seconds for e in listed.entries] == [reply.entry.expire_time.seconds]


@pytest.mark.parametrize(
    "number",
    [
        "\uff11\uff13\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff13",  # full-width digits
        "\u0661\u0663\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0663",  # Arabic-Indic digits
        "+",
        "   ",
        "",
        "1370000\x000003",
        "1370000\n0003",
        "1" * 65536,
    ],
)
async def test_a_number_translate_would_refuse_is_never_blocked(tr: Any, number: str) -> None:
    """One rule for every RPC that takes a calling number: BlockCaller refuses what Translate refuses."""
    await tr.put(tr.route("n1", MODE_AXN))
    block = tr.operator.BlockCaller(pb.BlockCallerRequest(tenant_id="t1", calling_number=number))
    assert violated_fields(await fails(grpc.StatusCode.INVALID_ARGUMENT, block)) == ["calling_number"]
    translate = tr.stub.Translate(pb.TranslateRequest(calling_number=number, called_number=X, call_id="c"))
    assert violated_fields(await fails(grpc.StatusCode.INVALID_ARGUMENT, translate)) == ["calling_number"]
    assert await tr.redis.exists(list_key("t:t1")) == 0


async def test_entries_stored_badly_are_skipped_never_internal_and_removed_by_the_next_block(tr: Any) -> None:
    """Entries an older version (or a hand) wrote: a listing and the hot path's reload skip or bound them."""
    await tr.put(tr.route("n1", MODE_AXN, tenant_id="t1"))
    key = list_key("t:t1")
    far = (TIMESTAMP_MAX_SECONDS + 10**9) * 1000
    await tr.redis.hset(
        key,
        mapping={
            SPAMMER: f"1000|{far}|stored by an older version",  # an expiry past year 9999: bounded, still blocks
            "13700000004": "not|a|number",  # unreadable
            "13700000005": "12",  # unreadable: no fields
            "\uff11\uff13\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff16": "1000|0|full-width",
            b"\xff\xfe": "1000|0|not UTF-8",
        },
    )
    await tr.redis.sadd("np:bl:scopes", "t:t1")
    await tr.redis.incr("np:bl:version")
    listed = await tr.operator.ListBlockedCallers(pb.ListBlockedCallersRequest(tenant_id="t1"))
    assert [(e.calling_number, e.reason) for e in listed.entries] == [(SPAMMER, "stored by an older version")]
    assert listed.entries[0].expire_time.seconds == TIMESTAMP_MAX_SECONDS
    # The reload of the hot path's copy went on too: the readable entry blocks.
    await _eventually(lambda: _is(tr, SPAMMER, X, pb.REJECT_REASON_CALLER_BLOCKED), 3 * PROPAGATION + 0.5)

    await tr.operator.BlockCaller(pb.BlockCallerRequest(tenant_id="t1", calling_number=B))
    assert sorted(await tr.redis.hkeys(key)) == sorted([SPAMMER.encode(), B.encode()])
