"""End to end, as deployed: allocation, binding and translation as separate processes on one Redis.

The operator imports a block for a tenant, routed by carrier CARRIER (ImportBlock's carrier_id); the tenant's
CreateBinding picks a number, and the carrier's Translate connects both ways (another carrier is refused the
number); the operator's lock and the tenant's deletion of the binding then reject. Every call carries its
principal's API key, over TLS.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.identity.principal import Role
from numprotect.translation.v1 import translation_pb2 as pb
from numprotect.translation.v1 import translation_pb2_grpc
from support.identity import mint
from support.processes import ServiceProcess

TENANT = "t1"
CARRIER = "cm"
BLOCK = "70010000000"
A = "13800000001"
B = "13900000002"


@pytest.fixture
def deployed(redis_env: dict[str, str]) -> Iterator[dict[str, ServiceProcess]]:
    started: dict[str, ServiceProcess] = {}
    try:
        started["allocation"] = ServiceProcess("allocation", redis_env)
        peers = {"NUMPROTECT_ALLOCATION_ADDR": started["allocation"].address}
        started["binding"] = ServiceProcess("binding", {**redis_env, **peers})
        started["translation"] = ServiceProcess("translation", redis_env)
        for process in started.values():
            process.wait_serving()
        yield started
    finally:
        for process in reversed(list(started.values())):
            process.stop()


def test_create_binding_then_translate_both_ways(deployed: dict[str, ServiceProcess], redis_sync: Any) -> None:
    operator, tenant, carrier, other_carrier = (
        mint(redis_sync, role, principal_id)
        for role, principal_id in (
            (Role.OPERATOR, ""),
            (Role.TENANT, TENANT),
            (Role.CARRIER, CARRIER),
            (Role.CARRIER, "cx"),
        )
    )
    time.sleep(0.5)  # the processes reload keys every 0.1 s (NUMPROTECT_AUTH_REFRESH_SECONDS in the tests)
    with (
        deployed["allocation"].channel(operator) as allocation_channel,
        deployed["binding"].channel(tenant) as binding_channel,
        deployed["translation"].channel(carrier) as translation_channel,
        deployed["translation"].channel(other_carrier) as other_channel,
    ):
        allocation: Any = allocation_pb2_grpc.AllocationServiceStub(allocation_channel)
        binding: Any = binding_pb2_grpc.BindingServiceStub(binding_channel)
        translation: Any = translation_pb2_grpc.TranslationServiceStub(translation_channel)
        allocation.ImportBlock(
            allocation_pb2.ImportBlockRequest(
                block=BLOCK, tenant_id=TENANT, city_code="010", actor="e2e", carrier_id=CARRIER
            ),
            timeout=10,
        )
        created = binding.CreateBinding(
            binding_pb2.CreateBindingRequest(
                tenant_id=TENANT,
                out_order_id="order-1",
                mode=common_pb2.BINDING_MODE_AXB,
                party_a=A,
                party_b="+86" + B,
                city_code="010",
                recording_enabled=True,
                user_consent=True,
            ),
            timeout=10,
        ).binding
        x = created.virtual_number
        assert x.startswith(BLOCK) and len(x) == 15

        def translate(caller: str) -> pb.TranslateResponse:
            request = pb.TranslateRequest(calling_number=caller, called_number=x, call_id="e2e")
            reply: pb.TranslateResponse = translation.Translate(request, timeout=5)
            return reply

        deadline = time.monotonic() + 3  # translation loads the block's carrier within one reload interval
        while True:
            try:
                to_b = translate(A)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED and time.monotonic() < deadline
                time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as refused:
            translation_pb2_grpc.TranslationServiceStub(other_channel).Translate(
                pb.TranslateRequest(calling_number=A, called_number=x), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # another carrier's number
        assert (to_b.decision, to_b.target_number, to_b.display_number) == (pb.DECISION_CONNECT, B, x)
        assert (to_b.binding_id, to_b.tenant_id, to_b.recording_enabled) == (created.binding_id, TENANT, True)
        to_a = translate("+86" + B)
        assert (to_a.decision, to_a.target_number, to_a.display_number) == (pb.DECISION_CONNECT, A, x)
        assert translate("13700000003").reject_reason == pb.REJECT_REASON_NO_BINDING

        allocation.LockNumber(
            allocation_pb2.LockNumberRequest(virtual_number=x, reason="fraud", actor="e2e"), timeout=10
        )
        assert translate(A).reject_reason == pb.REJECT_REASON_NUMBER_LOCKED
        allocation.UnlockNumber(allocation_pb2.UnlockNumberRequest(virtual_number=x, actor="e2e"), timeout=10)
        assert translate(A).decision == pb.DECISION_CONNECT

        binding.DeleteBinding(
            binding_pb2.DeleteBindingRequest(binding_id=created.binding_id, tenant_id=TENANT), timeout=10
        )
        assert translate(A).reject_reason == pb.REJECT_REASON_NO_BINDING
