"""Who may call allocation and AdminService, and what each caller sees: no or bad credentials, the wrong role, only
binding on reservations, tenants confined to their own numbers, pools and history, the regulator's reason, the
carrier of a block, the longest reservation, and exactly one audit event per privileged or denied call."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from numprotect.admin.v1 import admin_pb2
from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.allocation.v1 import allocation_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core import pool_keys
from numprotect.core.identity.directory import CARRIER_BLOCKS_KEY
from numprotect.core.identity.layer import UNAUTHENTICATED_MESSAGE
from numprotect.core.identity.principal import Role
from numprotect.core.settings import Env
from numprotect.services.allocation.settings import AllocationSettings
from support.rpc import fails, outcome, violated_fields

ALLOCATION = pb.DESCRIPTOR.services_by_name["AllocationService"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
MODULES: dict[str, Any] = {ALLOCATION.full_name: pb, ADMIN.full_name: admin_pb2}
EVERY_RPC = [(service, method.name) for service in (ALLOCATION, ADMIN) for method in service.methods]
OPERATOR_ONLY = [(ALLOCATION, m) for m in ("ImportBlock", "ReleaseNumber", "LockNumber", "UnlockNumber")] + [
    (ADMIN, m.name) for m in ADMIN.methods
]
RESERVATIONS = [(ALLOCATION, m) for m in ("AllocateNumber", "ConfirmReservation", "CancelReservation", "ReplaceParty")]
BATCH_RESERVATIONS = [(ALLOCATION, m) for m in ("AllocateNumbers", "ConfirmReservations", "CancelReservations")]
BLOCK, BLOCK_2 = "70012345678", "70087654321"
NEVER_IMPORTED = "700999999990001"
Svc = Any


def path(service: ServiceDescriptor, name: str) -> str:
    return f"/{service.full_name}/{name}"


def call(channel: grpc.aio.Channel, service: ServiceDescriptor, name: str, request: Any = None) -> Any:
    """Calls any unary RPC of `service` by name (an empty request unless one is given)."""
    method = service.methods_by_name[name]
    module = MODULES[service.full_name]
    request_class = getattr(module, method.input_type.name)
    response_class = getattr(module, method.output_type.name)
    callable_ = channel.unary_unary(
        path(service, name),
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return callable_(request if request is not None else request_class())


def key_id_of(token: str) -> str:
    return token.split("_")[1]


def timestamp_in(seconds: float) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(round((time.time() + seconds) * 1000))
    return value


async def import_block(
    operator: Any, block: str = BLOCK, tenant: str = "t1", carrier: str = "cm"
) -> pb.ImportBlockResponse:
    request = pb.ImportBlockRequest(block=block, tenant_id=tenant, city_code="010", carrier_id=carrier, actor="ops")
    reply: pb.ImportBlockResponse = await operator.ImportBlock(request)
    return reply


async def allocate(binding: Any, tenant: str = "t1", a: str = "13800000001", b: str = "13800000002") -> Any:
    return await binding.AllocateNumber(
        pb.AllocateNumberRequest(tenant_id=tenant, mode=common_pb2.BINDING_MODE_AXB, parties=[a, b], city_code="010")
    )


def stub(channel: grpc.aio.Channel) -> Any:
    return allocation_pb2_grpc.AllocationServiceStub(channel)


ServiceFactory = Callable[..., AbstractAsyncContextManager[Svc]]


async def test_no_or_bad_credentials_are_unauthenticated_on_every_rpc_with_one_message(
    allocation_svc: ServiceFactory, audit_events: Any
) -> None:
    async with allocation_svc() as svc:
        real = svc.token(Role.OPERATOR)
        key_id, secret = real.split("_")[1], real.split("_")[2]
        wrong_secret = f"npk_{key_id}_{'A' * 43 if secret != 'A' * 43 else 'B' * 43}"
        unknown_id = f"npk_{'0' * 16}_{secret}"
        channels = {
            "none": svc.channel,
            "malformed": svc.channel_with("not-a-token"),
            "unknown key id": svc.channel_with(unknown_id),
            "wrong secret": svc.channel_with(wrong_secret),
        }
        for label, channel in channels.items():
            for service, name in EVERY_RPC:
                code, details = await outcome(call(channel, service, name))
                assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE), (label, name)
        events = [e for _, e in await audit_events(svc)]
        # Exactly one event per refused call, none naming a principal.
        assert len(events) == len(channels) * len(EVERY_RPC)
        assert {(e.principal, e.outcome) for e in events} == {("anonymous", "UNAUTHENTICATED")}
        for service, name in EVERY_RPC:
            assert sum(e.method == path(service, name) for e in events) == len(channels)
        # The real key still works (the wrong secret did not lock it out).
        assert (await outcome(call(svc.channel_with(real), ALLOCATION, "GetNumber")))[0] is not (
            grpc.StatusCode.UNAUTHENTICATED
        )


async def test_a_tenant_key_is_denied_every_operator_rpc_and_each_denial_is_audited_once(
    allocation_svc: ServiceFactory, audit_events: Any
) -> None:
    async with allocation_svc() as svc:
        token = svc.token(Role.TENANT, "t1")
        tenant = svc.channel_with(token)
        for service, name in OPERATOR_ONLY:
            code, details = await outcome(call(tenant, service, name))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code, details)
            assert "tenant role may not call" in details
        events = [e for _, e in await audit_events(svc)]
        assert len(events) == len(OPERATOR_ONLY)
        for service, name in OPERATOR_ONLY:
            (event,) = [e for e in events if e.method == path(service, name)]
            assert (event.principal, event.role, event.outcome) == (
                f"tenant:t1/key:{key_id_of(token)}",
                "tenant",
                "PERMISSION_DENIED",
            )


async def test_only_the_binding_service_may_reserve(allocation_svc: ServiceFactory, audit_events: Any) -> None:
    async with allocation_svc() as svc:
        others = {
            "operator": svc.channel_as(Role.OPERATOR),
            "tenant": svc.channel_as(Role.TENANT, "t1"),
            "carrier": svc.channel_as(Role.CARRIER, "cm"),
            "regulator": svc.channel_as(Role.REGULATOR),
            "cdr service": svc.channel_as(Role.SERVICE, "cdr"),
        }
        for label, channel in others.items():
            for service, name in RESERVATIONS + BATCH_RESERVATIONS:
                code, _ = await outcome(call(channel, service, name))
                assert code == grpc.StatusCode.PERMISSION_DENIED, (label, name)
        binding = svc.channel_as(Role.SERVICE, "binding")
        for service, name in RESERVATIONS:  # allowed: an empty request is refused for its content, not the caller
            code, _ = await outcome(call(binding, service, name))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        for service, name in BATCH_RESERVATIONS:  # an empty batch: nothing to do
            assert not (await call(binding, service, name)).results, name
        denied = [e for _, e in await audit_events(svc) if e.outcome == "PERMISSION_DENIED"]
        assert len(denied) == len(others) * len(RESERVATIONS + BATCH_RESERVATIONS)


async def test_a_tenant_sees_only_its_own_numbers_pool_and_history(
    allocation_svc: ServiceFactory, audit_events: Any
) -> None:
    async with allocation_svc() as svc:
        operator, binding = stub(svc.channel_as(Role.OPERATOR)), stub(svc.channel_as(Role.SERVICE, "binding"))
        tenant_a, tenant_b = stub(svc.channel_as(Role.TENANT, "t1")), stub(svc.channel_as(Role.TENANT, "t2"))
        await import_block(operator, BLOCK, "t1")
        await import_block(operator, BLOCK_2, "t2")
        x = (await allocate(binding, "t1")).virtual_number

        async def a_view() -> tuple[Any, ...]:
            number = await tenant_a.GetNumber(pb.GetNumberRequest(virtual_number=x))
            pool = await tenant_a.GetPoolStats(pb.GetPoolStatsRequest())  # empty tenant_id: its own
            for figures in (pool, *pool.cities):  # the rate window grows with the clock
                figures.ClearField("net_taken_per_day")
            pool.ClearField("rate_window")
            history = await tenant_a.ListNumberHistory(pb.ListNumberHistoryRequest(virtual_number=x))
            return number, pool, history

        before = await a_view()
        assert before[0].number.tenant_id == "t1" and before[1].in_use == 1
        assert [e.kind for e in before[2].events] == ["import", "assign"]

        # B asking for A's number answers exactly as for a number that exists nowhere.
        missing = await fails(
            grpc.StatusCode.NOT_FOUND, tenant_b.GetNumber(pb.GetNumberRequest(virtual_number=NEVER_IMPORTED))
        )
        hidden = await fails(grpc.StatusCode.NOT_FOUND, tenant_b.GetNumber(pb.GetNumberRequest(virtual_number=x)))
        assert (hidden.details() or "").replace(x, "N") == (missing.details() or "").replace(NEVER_IMPORTED, "N")
        hidden_history = await fails(
            grpc.StatusCode.NOT_FOUND, tenant_b.ListNumberHistory(pb.ListNumberHistoryRequest(virtual_number=x))
        )
        assert x in (hidden_history.details() or "") and "t1" not in (hidden_history.details() or "")
        other_pool = await fails(
            grpc.StatusCode.PERMISSION_DENIED, tenant_b.GetPoolStats(pb.GetPoolStatsRequest(tenant_id="t1"))
        )
        assert "tenant_id" in (other_pool.details() or "")
        await fails(
            grpc.StatusCode.PERMISSION_DENIED,
            tenant_b.LockNumber(pb.LockNumberRequest(virtual_number=x, reason="mine now")),
        )
        await fails(
            grpc.StatusCode.PERMISSION_DENIED, tenant_b.ReleaseNumber(pb.ReleaseNumberRequest(virtual_number=x))
        )
        # B's own pool is its own; A's data is unchanged.
        own = await tenant_b.GetPoolStats(pb.GetPoolStatsRequest())
        assert (own.total, own.in_use) == (10_000, 0)
        assert await a_view() == before
        # The operator must name a tenant; B's denials are audited, its own reads are not.
        no_tenant = await fails(grpc.StatusCode.INVALID_ARGUMENT, operator.GetPoolStats(pb.GetPoolStatsRequest()))
        assert violated_fields(no_tenant) == ["tenant_id"]
        b_events = [e for _, e in await audit_events(svc) if e.principal.startswith("tenant:t2/")]
        assert sorted(e.method.rsplit("/", 1)[1] for e in b_events) == ["GetPoolStats", "LockNumber", "ReleaseNumber"]


async def test_the_regulator_reads_history_only_with_a_reason_which_is_audited(
    allocation_svc: ServiceFactory, audit_events: Any
) -> None:
    async with allocation_svc() as svc:
        operator, binding = stub(svc.channel_as(Role.OPERATOR)), stub(svc.channel_as(Role.SERVICE, "binding"))
        regulator = stub(svc.channel_as(Role.REGULATOR))
        await import_block(operator)
        x = (await allocate(binding)).virtual_number
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT, regulator.ListNumberHistory(pb.ListNumberHistoryRequest(virtual_number=x))
        )
        assert violated_fields(error) == ["reason"]
        reply = await regulator.ListNumberHistory(pb.ListNumberHistoryRequest(virtual_number=x, reason="case 2026/17"))
        assert [e.kind for e in reply.events] == ["import", "assign"]
        number = await regulator.GetNumber(pb.GetNumberRequest(virtual_number=x))
        assert number.number.tenant_id == "t1"
        history = path(ALLOCATION, "ListNumberHistory")
        events = [e for _, e in await audit_events(svc) if e.role == "regulator"]
        assert [(e.method, e.outcome, e.reason) for e in events] == [
            (history, "INVALID_ARGUMENT", ""),
            (history, "OK", "case 2026/17"),
            (path(ALLOCATION, "GetNumber"), "OK", ""),
        ]
        assert f"virtual_number={x}" in events[1].target


async def test_each_privileged_call_leaves_one_event_with_the_true_principal(
    allocation_svc: ServiceFactory, audit_events: Any
) -> None:
    async with allocation_svc() as svc:
        token = svc.token(Role.OPERATOR)
        operator = stub(svc.channel_with(token))
        await import_block(operator)
        x = BLOCK + "0042"
        await operator.LockNumber(pb.LockNumberRequest(virtual_number=x, reason="complaint", actor="says-someone-else"))
        await operator.UnlockNumber(pb.UnlockNumberRequest(virtual_number=x))
        await operator.ReleaseNumber(pb.ReleaseNumberRequest(virtual_number=x, reason="returned"))
        await operator.GetPoolStats(pb.GetPoolStatsRequest(tenant_id="t1"))  # an operator read of tenant data
        events = [e for _, e in await audit_events(svc)]
        subject = f"operator/key:{key_id_of(token)}"
        assert [(e.method.rsplit("/", 1)[1], e.principal, e.outcome) for e in events] == [
            ("ImportBlock", subject, "OK"),
            ("LockNumber", subject, "OK"),
            ("UnlockNumber", subject, "OK"),
            ("ReleaseNumber", subject, "OK"),
            ("GetPoolStats", subject, "OK"),
        ]
        assert events[0].target == f"block={BLOCK},tenant_id=t1,carrier_id=cm"
        assert events[1].target == f"virtual_number={x}" and events[1].reason == "complaint"
        assert all(e.peer and e.time_ms for e in events)


async def test_import_records_the_carrier_and_refuses_a_block_another_carrier_routes(
    allocation_svc: ServiceFactory, redis_sync: Any
) -> None:
    async with allocation_svc() as svc:
        operator = stub(svc.channel_as(Role.OPERATOR))
        assert (await import_block(operator, carrier="cm")).numbers_added == 10_000
        error = await fails(grpc.StatusCode.FAILED_PRECONDITION, import_block(operator, carrier="cu"))
        assert "carrier cm" in (error.details() or "") and BLOCK in (error.details() or "")
        # Another carrier on a new block of another tenant is fine; the first block keeps its carrier.
        assert (await import_block(operator, BLOCK_2, "t2", carrier="cu")).numbers_added == 10_000
        assert (await import_block(operator, carrier="cm")).already_imported
        assert {k.decode(): v.decode() for k, v in redis_sync.hgetall(CARRIER_BLOCKS_KEY).items()} == {
            BLOCK: "cm",
            BLOCK_2: "cu",
        }
        assert redis_sync.hget(pool_keys.block_owner_key(BLOCK), "carrier") == b"cm"
        directory = svc.runtime.identity.directory
        directory.reload()
        assert (directory.carrier_of(BLOCK + "0001"), directory.carrier_of(BLOCK_2 + "0001")) == ("cm", "cu")
        history = await operator.ListNumberHistory(pb.ListNumberHistoryRequest(virtual_number=BLOCK + "0001"))
        assert history.events[0].detail == "city=010 carrier=cm"
        stats = await operator.GetPoolStats(pb.GetPoolStatsRequest(tenant_id="t1"))
        assert stats.total == 10_000  # the refused import added nothing


async def test_a_reservation_never_outlives_the_longest_binding(allocation_svc: ServiceFactory) -> None:
    assert AllocationSettings.from_env(Env({})).max_binding_lifetime_seconds == 90 * 86400
    async with allocation_svc(NUMPROTECT_MAX_BINDING_LIFETIME="1h") as svc:
        operator, binding = stub(svc.channel_as(Role.OPERATOR)), stub(svc.channel_as(Role.SERVICE, "binding"))
        await import_block(operator)
        reply = await allocate(binding)
        too_long = pb.ConfirmReservationRequest(
            reservation_id=reply.reservation_id, binding_id="b" + "1" * 22, expire_time=timestamp_in(3600 + 60)
        )
        error = await fails(grpc.StatusCode.INVALID_ARGUMENT, binding.ConfirmReservation(too_long))
        assert violated_fields(error) == ["expire_time"]
        assert "3600s" in (error.details() or "") and "NUMPROTECT_MAX_BINDING_LIFETIME" in (error.details() or "")
        ok = pb.ConfirmReservationRequest(
            reservation_id=reply.reservation_id, binding_id="b" + "1" * 22, expire_time=timestamp_in(3600 - 60)
        )
        await binding.ConfirmReservation(ok)
        info = await operator.GetNumber(pb.GetNumberRequest(virtual_number=reply.virtual_number))
        assert info.number.active_bindings == 1
