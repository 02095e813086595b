"""Real state for the doctor tests, made by the real allocation, binding and cdr services (in-process, TLS and
auth on) on the Redis under test (standalone or cluster), and the invariant checker's options for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.doctor import Options
from numprotect.core.identity.principal import Role
from numprotect.services.allocation.app import build as build_allocation
from numprotect.services.binding.app import build as build_binding
from numprotect.services.cdr.app import build as build_cdr
from support.identity import mint
from support.inprocess import running_service

TENANT, OTHER_TENANT = "t-doc", "t-other"
BLOCK, OTHER_BLOCK = "70010000000", "70010000001"
CITY = "010"
# TENANT's pool has three sub-pools, OTHER_TENANT's one (as a pool made before sub-pools): the checks read both.
SUBPOOLS = {TENANT: 3, OTHER_TENANT: 1}
CARRIER = "cmcc"
# The create lease and recovery interval the services run with and the doctor judges by: short, so the state
# settles within a test (a create is judged once its deadline, 1 s and a recovery round have passed).
LEASE_SECONDS = 0.5
RECOVERY_SECONDS = 0.2


def doctor_options(**overrides: Any) -> Options:
    """The checker as the tests run it: the services' short lease, a short second look, no pacing."""
    values: dict[str, Any] = {
        "create_lease_seconds": LEASE_SECONDS,
        "recovery_seconds": RECOVERY_SECONDS,
        "grace_seconds": 0.2,
        "recheck_seconds": 0.05,
    }
    return Options(**{**values, **overrides})


@dataclass(frozen=True)
class MadeState:
    """What the services made: bindings by name (the Binding messages as created or last updated)."""

    bindings: dict[str, Any]
    cdr_call_ids: list[str]


def _duration(seconds: float) -> Duration:
    value = Duration()
    value.FromMilliseconds(int(seconds * 1000))
    return value


def _record(call_id: str, binding: Any) -> cdr_pb2.CallDetailRecord:
    start = time.time_ns() // 1_000_000 - 60_000
    record = cdr_pb2.CallDetailRecord(
        call_id=call_id,
        binding_id=binding.binding_id,
        calling_number=binding.party_a,
        called_number=binding.virtual_number,
        target_number=binding.party_b,
        call_type=cdr_pb2.CALL_TYPE_PEER_TO_A,
        release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
        release_cause=16,
        unconnected_cause=cdr_pb2.UNCONNECTED_CAUSE_NONE,
        carrier_id=CARRIER,
    )
    record.call_time.FromMilliseconds(start)
    record.ring_time.FromMilliseconds(start + 2000)
    record.answer_time.FromMilliseconds(start + 5000)
    record.release_time.FromMilliseconds(start + 35_000)
    return record


@asynccontextmanager
async def made_state(redis_env: dict[str, str], redis_sync: Any, tmp_path: Path) -> AsyncIterator[MadeState]:
    """Blocks imported, bindings of every mode created, updated and deleted, CDRs ingested (one sent twice), all
    through the services; yields once every create is past its lease (so the checker judges everything) and the
    services have stopped (nothing else writes while a test plants and restores)."""
    settings = {
        "NUMPROTECT_BINDING_MIN_TTL": "1s",
        "NUMPROTECT_BINDING_CREATE_LEASE": f"{LEASE_SECONDS}s",
        "NUMPROTECT_BINDING_RECOVERY_INTERVAL": f"{RECOVERY_SECONDS}s",
    }
    token_file = tmp_path / "binding.token"
    token_file.write_text(mint(redis_sync, Role.SERVICE, "binding") + "\n")
    token_file.chmod(0o600)
    one_subpool = {**redis_env, **settings, "NUMPROTECT_ALLOCATION_SUBPOOLS": str(SUBPOOLS[OTHER_TENANT])}
    async with running_service("allocation", build_allocation, one_subpool) as alloc:
        await allocation_pb2_grpc.AllocationServiceStub(alloc.channel_as(Role.OPERATOR)).ImportBlock(
            allocation_pb2.ImportBlockRequest(
                block=OTHER_BLOCK, tenant_id=OTHER_TENANT, city_code=CITY, actor="test", carrier_id=CARRIER
            )
        )
    subpools = {**redis_env, **settings, "NUMPROTECT_ALLOCATION_SUBPOOLS": str(SUBPOOLS[TENANT])}
    async with running_service("allocation", build_allocation, subpools) as alloc:
        allocation: Any = allocation_pb2_grpc.AllocationServiceStub(alloc.channel_as(Role.OPERATOR))
        await allocation.ImportBlock(
            allocation_pb2.ImportBlockRequest(
                block=BLOCK, tenant_id=TENANT, city_code=CITY, actor="test", carrier_id=CARRIER
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
            binding: Any = binding_pb2_grpc.BindingServiceStub(bind_svc.channel_as(Role.TENANT, TENANT))
            carrier: Any = cdr_pb2_grpc.CdrServiceStub(cdr_svc.channel_as(Role.CARRIER, CARRIER))

            async def create(order: str, mode: Any, party_a: str, party_b: str = "", ttl_s: float = 3600) -> Any:
                request = binding_pb2.CreateBindingRequest(
                    tenant_id=TENANT,
                    out_order_id=order,
                    mode=mode,
                    party_a=party_a,
                    party_b=party_b,
                    ttl=_duration(ttl_s),
                    city_code=CITY,
                    user_consent=True,
                )
                return (await binding.CreateBinding(request)).binding

            made = {
                "axb": await create("o-axb", common_pb2.BINDING_MODE_AXB, "13900000001", "13800000001"),
                "axb_updated": await create("o-upd", common_pb2.BINDING_MODE_AXB, "13900000002", "13800000002"),
                "axn": await create("o-axn", common_pb2.BINDING_MODE_AXN, "13900000003", "13800000003"),
                "axe": await create("o-axe", common_pb2.BINDING_MODE_AXE, "13900000004", "13800000004"),
                "deleted": await create("o-del", common_pb2.BINDING_MODE_AXB, "13900000005", "13800000005"),
                "short": await create("o-short", common_pb2.BINDING_MODE_AXB, "13900000006", "13800000006", 1.0),
            }
            updated = made["axb_updated"]
            reply = await binding.UpdateBinding(
                binding_pb2.UpdateBindingRequest(
                    binding=binding_pb2.Binding(
                        binding_id=updated.binding_id,
                        tenant_id=TENANT,
                        party_b="13700000002",
                        expire_time=updated.expire_time,
                    ),
                    update_mask=FieldMask(paths=["party_b"]),
                )
            )
            made["axb_updated"] = reply.binding
            await binding.DeleteBinding(
                binding_pb2.DeleteBindingRequest(binding_id=made["deleted"].binding_id, tenant_id=TENANT)
            )
            call_ids = ["call-1", "call-2", "call-3"]
            records = [_record(call_id, made["axb"]) for call_id in call_ids]
            accepted = await carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
            again = await carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records[:1]))
            assert (accepted.accepted, again.duplicates) == (3, 1)
            # Past every create's deadline, 1 s and a recovery round, and the short binding's end (grace included).
            await asyncio.sleep(LEASE_SECONDS + 1 + RECOVERY_SECONDS + 0.5)
            state = MadeState(made, call_ids)
    # Yielded with the services stopped: their background work (allocation's pool-metrics refresh sweeps lapsed
    # reservations back to :avail) must not write between a test's snapshot of a key and its restore.
    yield state
