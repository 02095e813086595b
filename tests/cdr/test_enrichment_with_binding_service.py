"""Enrichment against bindings created through the REAL binding service (with the real allocation service):
a live binding by binding_id and by call_ref, an expired and a deleted one through the number history, and a
call on a number that served nobody."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from google.protobuf.duration_pb2 import Duration

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.call_ref import CallRef
from numprotect.core.identity.principal import Role
from numprotect.services.allocation.app import build as build_allocation
from numprotect.services.binding.app import build as build_binding
from numprotect.services.cdr.app import build as build_cdr
from support.identity import mint
from support.inprocess import running_service

BLOCK = "70010000000"
CARRIER = "cmcc"  # make_record's carrier_id
A, B = "13900000002", "13800000001"


def _ms() -> int:
    return time.time_ns() // 1_000_000


async def test_enrichment_of_records_for_bindings_made_by_the_binding_service(
    redis_env: dict[str, str], redis_sync: Any, make_record: Any, tmp_path: Path
) -> None:
    settings = {"NUMPROTECT_BINDING_MIN_TTL": "1s"}
    # Binding reserves numbers at allocation as the "binding" service (its token file, as a deployment mounts it).
    token_file = tmp_path / "binding.token"
    token_file.write_text(mint(redis_sync, Role.SERVICE, "binding") + "\n")
    token_file.chmod(0o600)
    async with running_service("allocation", build_allocation, {**redis_env, **settings}) as alloc:
        allocation: Any = allocation_pb2_grpc.AllocationServiceStub(alloc.channel_as(Role.OPERATOR))
        # The import records the block's carrier too: the one whose CDRs are accepted for its numbers.
        await allocation.ImportBlock(
            allocation_pb2.ImportBlockRequest(
                block=BLOCK, tenant_id="t-shop", city_code="010", actor="test", carrier_id=CARRIER
            )
        )
        environ = {
            **redis_env,
            "NUMPROTECT_ALLOCATION_ADDR": alloc.address,
            "NUMPROTECT_SERVICE_TOKEN_FILE": str(token_file),
            **settings,
        }
        async with (
            running_service("binding", build_binding, environ) as bind_svc,
            running_service("cdr", build_cdr, redis_env) as cdr_svc,
        ):
            binding: Any = binding_pb2_grpc.BindingServiceStub(bind_svc.channel_as(Role.TENANT, "t-shop"))
            carrier: Any = cdr_pb2_grpc.CdrServiceStub(cdr_svc.channel_as(Role.CARRIER, CARRIER))
            cdr: Any = cdr_pb2_grpc.CdrServiceStub(cdr_svc.channel_as(Role.TENANT, "t-shop"))
            operator: Any = cdr_pb2_grpc.CdrServiceStub(cdr_svc.channel_as(Role.OPERATOR))

            async def create(order: str, ttl_s: float, party_a: str = A, party_b: str = B) -> Any:
                ttl = Duration()
                ttl.FromMilliseconds(int(ttl_s * 1000))
                reply = await binding.CreateBinding(
                    binding_pb2.CreateBindingRequest(
                        tenant_id="t-shop",
                        out_order_id=order,
                        mode=common_pb2.BINDING_MODE_AXB,
                        party_a=party_a,
                        party_b=party_b,
                        ttl=ttl,
                        city_code="010",
                        user_consent=True,
                    )
                )
                return reply.binding

            live = await create("order-live", 3600)
            short = await create("order-short", 3, party_a="13700000003", party_b="13600000004")
            during_short = short.create_time.ToMilliseconds() + 1
            gone = await create("order-deleted", 3600, party_a="13500000005", party_b="13300000006")
            during = _ms()
            await binding.DeleteBinding(
                binding_pb2.DeleteBindingRequest(binding_id=gone.binding_id, tenant_id="t-shop")
            )
            await asyncio.sleep(max(0.0, short.expire_time.ToMilliseconds() - _ms()) / 1000 + 0.2)  # it expires

            ref = CallRef(live.binding_id, live.virtual_number, during).encode()
            records = [
                make_record("live-id", binding_id=live.binding_id, called_number=live.virtual_number, call_ms=during),
                make_record("live-ref", call_ref=ref, called_number=live.virtual_number, call_ms=during),
                make_record(
                    "expired",
                    called_number=short.virtual_number,
                    calling_number="13600000004",
                    target_number="13700000003",
                    call_ms=during_short,
                ),
                make_record(
                    "deleted",
                    called_number=gone.virtual_number,
                    calling_number="13300000006",
                    target_number="13500000005",
                    call_ms=during,
                ),
                # The expired binding's number, but after it expired: nobody was served.
                make_record(
                    "after-expiry",
                    called_number=short.virtual_number,
                    calling_number="13600000004",
                    target_number="13700000003",
                    call_ms=_ms() - 100,
                ),
            ]
            reply = await carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
            assert (reply.accepted, reply.duplicates, len(reply.rejected)) == (5, 0, 0)
            listed = await cdr.ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="t-shop", page_size=100))
            unmatched = await operator.ListCdrs(cdr_pb2.ListCdrsRequest(unmatched=True, page_size=100))
            by_order = await cdr.ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="t-shop", out_order_id="order-deleted"))

    got = {r.call_id: r for r in listed.records}
    assert set(got) == {"live-id", "live-ref", "expired", "deleted"}
    expected = {
        "live-id": (live.binding_id, "order-live", cdr_pb2.BINDING_MATCH_BINDING_ID),
        "live-ref": (live.binding_id, "order-live", cdr_pb2.BINDING_MATCH_CALL_REF),
        "expired": (short.binding_id, "order-short", cdr_pb2.BINDING_MATCH_HISTORY),
        "deleted": (gone.binding_id, "order-deleted", cdr_pb2.BINDING_MATCH_HISTORY),
    }
    for call_id, (binding_id, order, match) in expected.items():
        record = got[call_id]
        assert (record.binding_id, record.out_order_id, record.binding_match) == (binding_id, order, match)
        assert record.tenant_id == "t-shop"
    assert [r.call_id for r in unmatched.records] == ["after-expiry"]
    assert unmatched.records[0].binding_match == cdr_pb2.BINDING_MATCH_NONE
    assert [r.call_id for r in by_order.records] == ["deleted"]
