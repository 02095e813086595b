"""A peer channel reconnects promptly: real allocation and binding processes, allocation killed (SIGKILL) and
started again on the same port; binding's first CreateBinding that succeeds is sent well under a second after
allocation answers SERVING again (measured: 85 ms; 5,050 ms with grpc's default reconnect backoff, before
server.PEER_CHANNEL_OPTIONS)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.binding.v1 import binding_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.identity.principal import Role
from support.identity import mint
from support.processes import ServiceProcess

TENANT = "t1"
OUTAGE_SECONDS = 3.0  # long enough for grpc's default backoff to grow past 1.6 s


def _create(stub: Any, i: int) -> grpc.StatusCode:
    request = pb.CreateBindingRequest(
        tenant_id=TENANT,
        out_order_id=f"o-{i}",
        mode=common_pb2.BINDING_MODE_AXB,
        party_a=f"138{i:08d}",
        party_b=f"139{i:08d}",
        city_code="010",
        user_consent=True,
    )
    try:
        stub.CreateBinding(request, timeout=2)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_binding_reaches_a_restarted_allocation_promptly(redis_env: dict[str, str], redis_sync: Any) -> None:
    operator, tenant = mint(redis_sync, Role.OPERATOR), mint(redis_sync, Role.TENANT, TENANT)
    allocation = ServiceProcess("allocation", redis_env)
    binding: ServiceProcess | None = None
    try:
        peers = {"NUMPROTECT_ALLOCATION_ADDR": allocation.address}
        binding = ServiceProcess("binding", {**redis_env, **peers})
        time.sleep(0.3)  # the processes reload keys every 0.1 s in the tests
        with allocation.channel(operator) as channel:
            allocation_pb2_grpc.AllocationServiceStub(channel).ImportBlock(
                allocation_pb2.ImportBlockRequest(
                    block="70010000000", tenant_id=TENANT, city_code="010", actor="t", carrier_id="c1"
                ),
                timeout=10,
            )
        with binding.channel(tenant) as channel:
            stub: Any = binding_pb2_grpc.BindingServiceStub(channel)
            assert _create(stub, 0) == grpc.StatusCode.OK
            port = allocation.port
            allocation.process.kill()
            allocation.stop()
            down_until = time.monotonic() + OUTAGE_SECONDS
            i = 1
            while time.monotonic() < down_until:  # calls while allocation is down: the channel backs off
                assert _create(stub, i) == grpc.StatusCode.UNAVAILABLE
                i += 1
                time.sleep(0.2)
            allocation = ServiceProcess("allocation", redis_env, port=port)
            allocation.wait_serving()
            serving_at = time.monotonic()
            codes: list[grpc.StatusCode] = []
            # When the successful call was sent: during a backoff the channel fails calls at once (no wait for
            # ready), so a late start is a slow reconnect; the call's own time is the loaded host's, not measured.
            while (sent := time.monotonic()) and (code := _create(stub, i)) != grpc.StatusCode.OK:
                codes.append(code)
                assert time.monotonic() - serving_at < 10, codes
                i += 1
                time.sleep(0.01)
            waited, answered = sent - serving_at, time.monotonic() - serving_at
    finally:
        if binding is not None:
            binding.stop()
        allocation.stop()
    print(
        f"first successful CreateBinding sent {waited * 1000:.0f} ms after allocation was SERVING, answered at "
        f"{answered * 1000:.0f} ms ({len(codes)} failed)"
    )
    assert waited < 0.6, (waited, answered, set(codes), len(codes))
