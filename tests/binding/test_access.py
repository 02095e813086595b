"""Who may call the binding service and what each caller sees: real allocation and binding in-process over TLS with
auth on, real Redis, real API keys (issue 15: identity and access)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.binding.v1 import binding_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.dev_pki import LOCAL_HOSTS
from numprotect.core.identity.audit import AuditEvent, stream_entries
from numprotect.core.identity.principal import Role
from numprotect.core.identity.service_token import ServiceToken
from numprotect.services.allocation.app import build as build_allocation
from numprotect.services.binding.app import build as build_binding
from numprotect.services.binding.servicer import SERVICE
from support.identity import mint
from support.inprocess import running_service
from support.processes import ServiceProcess
from support.rpc import rpc_error
from support.tls import secure_channel, test_pki, tls_env

A = "13800000001"
B = "13900000002"
_BIND = "/numprotect.binding.v1.BindingService/"
IMPORT = allocation_pb2.ImportBlockRequest(
    block="70010000000", tenant_id="t1", city_code="010", actor="test", carrier_id="c1"
)


def create_request(order: str, *, tenant: str = "", party_a: str = A, party_b: str = B) -> pb.CreateBindingRequest:
    return pb.CreateBindingRequest(
        tenant_id=tenant,
        out_order_id=order,
        mode=common_pb2.BINDING_MODE_AXB,
        party_a=party_a,
        party_b=party_b,
        city_code="010",
        user_consent=True,
    )


def _now_ts() -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


async def audit_events(s: Any, redis_sync: Any) -> list[AuditEvent]:
    """The binding process's audit events so far (its queue flushed first)."""
    audit = s.binding_service.runtime.identity.audit
    assert audit is not None and await asyncio.to_thread(audit.flush)
    return [AuditEvent.from_canonical(fields["e"]) for _, fields in stream_entries(redis_sync)]


def quota_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    from google.rpc import status_pb2

    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            subjects = []
            for detail in status.details:
                failure = error_details_pb2.QuotaFailure()
                if detail.Unpack(failure):
                    subjects += [v.subject for v in failure.violations]
            return subjects
    return []


def keys_matching(redis_sync: Any, pattern: str) -> list[str]:
    return sorted(k.decode() for k in redis_sync.scan_iter(match=pattern, count=1000))


def nothing_of_a_binding_written(redis_sync: Any) -> bool:
    """No route, record, order claim, or tenant-index entry anywhere."""
    return (
        keys_matching(redis_sync, "np:rt:*") == []
        and keys_matching(redis_sync, "np:b:*") == []
        and keys_matching(redis_sync, "np:ord:*") == []
        and [k for k in keys_matching(redis_sync, "np:tl:*") if redis_sync.zcard(k)] == []
    )


# ---------------------------------------------------------------- authentication


async def test_no_token_or_a_wrong_one_is_unauthenticated_on_every_rpc(services: Any) -> None:
    async with services() as s:
        assert sorted(SERVICE.methods_by_name) == sorted(
            ["CreateBinding", "GetBinding", "UpdateBinding", "DeleteBinding", "ListBindings", "TraceNumber"]
        )
        unknown = "npk_0123456789abcdef_" + "A" * 43  # well formed, never issued
        for stub in (s.binding_with(None), s.binding_with(unknown), s.binding_with("garbage")):
            for name, method in SERVICE.methods_by_name.items():
                request = getattr(pb, method.input_type.name)()
                error = await rpc_error(getattr(stub, name)(request))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name


# ---------------------------------------------------------------- tenants


async def test_tenant_b_cannot_read_change_list_or_trace_tenant_a(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        a, b = s.tenant("t1"), s.tenant("t2")
        mine = (await a.CreateBinding(create_request("a-1"))).binding
        get_a = pb.GetBindingRequest(binding_id=mine.binding_id, include_history=True)
        before = await a.GetBinding(get_a)
        routes_before = {k: redis_sync.get(k) for k in keys_matching(redis_sync, "np:rt:*")}

        for call in (
            b.GetBinding(pb.GetBindingRequest(binding_id=mine.binding_id)),
            b.DeleteBinding(pb.DeleteBindingRequest(binding_id=mine.binding_id)),
            b.UpdateBinding(
                pb.UpdateBindingRequest(
                    binding=pb.Binding(binding_id=mine.binding_id, party_b="13700000003"),
                    update_mask=FieldMask(paths=["party_b"]),
                )
            ),
        ):
            assert (await rpc_error(call)).code() == grpc.StatusCode.NOT_FOUND
        # Naming tenant A outright: refused for the name, whatever the id (no oracle either).
        for call in (
            b.ListBindings(pb.ListBindingsRequest(tenant_id="t1")),
            b.GetBinding(pb.GetBindingRequest(binding_id=mine.binding_id, tenant_id="t1")),
            b.DeleteBinding(pb.DeleteBindingRequest(binding_id=mine.binding_id, tenant_id="t1")),
            b.UpdateBinding(
                pb.UpdateBindingRequest(
                    binding=pb.Binding(binding_id=mine.binding_id, tenant_id="t1", recording_enabled=True),
                    update_mask=FieldMask(paths=["recording_enabled"]),
                )
            ),
            b.CreateBinding(create_request("b-as-a", tenant="t1")),
        ):
            assert (await rpc_error(call)).code() == grpc.StatusCode.PERMISSION_DENIED
        # TraceNumber: tenant B learns nothing of A's binding on the number, the answer of a number never bound.
        x = mine.virtual_number
        traced = await rpc_error(b.TraceNumber(pb.TraceNumberRequest(virtual_number=x, at=_now_ts())))
        never = "700100000099999"
        unbound = await rpc_error(b.TraceNumber(pb.TraceNumberRequest(virtual_number=never, at=_now_ts())))
        assert traced.code() == unbound.code() == grpc.StatusCode.NOT_FOUND
        assert (traced.details() or "").replace(x, "X") == (unbound.details() or "").replace(never, "X")
        own = await a.TraceNumber(pb.TraceNumberRequest(virtual_number=x, at=_now_ts()))
        assert [t.binding_id for t in own.bindings] == [mine.binding_id]

        # A's data unchanged: the binding with its history, and what translation routes by.
        assert await a.GetBinding(get_a) == before
        assert {k: redis_sync.get(k) for k in keys_matching(redis_sync, "np:rt:*")} == routes_before
        assert [x.binding_id for x in (await a.ListBindings(pb.ListBindingsRequest())).bindings] == [mine.binding_id]


async def test_the_operator_traces_every_tenants_numbers_a_tenant_only_its_own(services: Any) -> None:
    async with services() as s:
        operator = s.binding_as(Role.OPERATOR)
        made = {
            tenant: (await s.tenant(tenant).CreateBinding(create_request("tr-1"))).binding for tenant in ("t1", "t2")
        }
        for tenant, binding in made.items():
            trace = pb.TraceNumberRequest(virtual_number=binding.virtual_number, at=_now_ts())
            seen = await operator.TraceNumber(trace)
            assert [(b.binding_id, b.tenant_id) for b in seen.bindings] == [(binding.binding_id, tenant)]
            own = await s.tenant(tenant).TraceNumber(trace)
            assert [b.binding_id for b in own.bindings] == [binding.binding_id]
            other = "t2" if tenant == "t1" else "t1"
            assert (await rpc_error(s.tenant(other).TraceNumber(trace))).code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- operator, carrier, regulator


async def test_operator_reads_any_tenant_and_leaves_an_audit_event(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        mine = (await s.binding.CreateBinding(create_request("op-1"))).binding
        operator = s.binding_as(Role.OPERATOR)
        listed = await operator.ListBindings(pb.ListBindingsRequest(tenant_id="t1"))
        assert [b.binding_id for b in listed.bindings] == [mine.binding_id]
        got = await operator.GetBinding(pb.GetBindingRequest(binding_id=mine.binding_id, tenant_id="t1"))
        assert got.binding == mine
        # Named under another tenant, the id is not found (the record carries its tenant).
        other = await rpc_error(operator.GetBinding(pb.GetBindingRequest(binding_id=mine.binding_id, tenant_id="t2")))
        assert other.code() == grpc.StatusCode.NOT_FOUND
        events = await audit_events(s, redis_sync)
        reads = [e for e in events if e.role == "operator" and e.method.startswith(_BIND)]
        assert [(e.method, e.target, e.outcome) for e in reads] == [
            (_BIND + "ListBindings", "tenant_id=t1", "OK"),
            (_BIND + "GetBinding", f"binding_id={mine.binding_id}", "OK"),
            (_BIND + "GetBinding", f"binding_id={mine.binding_id}", "NOT_FOUND"),
        ]
        assert all(e.principal.startswith("operator") for e in reads)
        # A tenant reading its own leaves none (the audit is of overseers' reads).
        assert not [e for e in events if e.role == "tenant" and e.outcome == "OK"]


async def test_only_tenants_create_update_or_delete(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        mine = (await s.binding.CreateBinding(create_request("w-1"))).binding
        for role, principal_id in ((Role.OPERATOR, ""), (Role.CARRIER, "c1"), (Role.REGULATOR, "")):
            stub = s.binding_as(role, principal_id)
            for call in (
                stub.CreateBinding(create_request("w-2", tenant="t1")),
                stub.DeleteBinding(pb.DeleteBindingRequest(binding_id=mine.binding_id, tenant_id="t1")),
                stub.UpdateBinding(
                    pb.UpdateBindingRequest(
                        binding=pb.Binding(binding_id=mine.binding_id, tenant_id="t1", recording_enabled=True),
                        update_mask=FieldMask(paths=["recording_enabled"]),
                    )
                ),
            ):
                assert (await rpc_error(call)).code() == grpc.StatusCode.PERMISSION_DENIED, role
        listed = await s.binding.ListBindings(pb.ListBindingsRequest())
        assert [(b.binding_id, b.recording_enabled, b.state) for b in listed.bindings] == [
            (mine.binding_id, False, common_pb2.BINDING_STATE_ACTIVE)
        ]
        denied = [e for e in await audit_events(s, redis_sync) if e.outcome == "PERMISSION_DENIED"]
        assert len(denied) == 9  # every denied call leaves one event


async def test_regulator_traces_with_a_reason_that_goes_into_the_audit_trail(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        mine = (await s.binding.CreateBinding(create_request("reg-1"))).binding
        regulator = s.binding_as(Role.REGULATOR)
        request = pb.TraceNumberRequest(virtual_number=mine.virtual_number, at=_now_ts())
        missing = await rpc_error(regulator.TraceNumber(request))
        assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (missing.details() or "").startswith("reason: is required")
        request.reason = "case 2026-0042"
        traced = await regulator.TraceNumber(request)
        assert [b.binding_id for b in traced.bindings] == [mine.binding_id]
        events = [e for e in await audit_events(s, redis_sync) if e.role == "regulator"]
        assert [(e.method, e.target, e.reason, e.outcome) for e in events] == [
            (_BIND + "TraceNumber", f"virtual_number={mine.virtual_number}", "", "INVALID_ARGUMENT"),
            (_BIND + "TraceNumber", f"virtual_number={mine.virtual_number}", "case 2026-0042", "OK"),
        ]


# ---------------------------------------------------------------- binding's own credential at allocation


async def test_binding_with_a_tenant_token_as_its_credential_cannot_reserve(
    redis_env: dict[str, str], redis_sync: Any, token_file: Any
) -> None:
    """A tenant's token (or none, with binding's own auth off) is refused by allocation's reservation RPCs: the
    create fails cleanly (UNAVAILABLE naming the credential), nothing reserved or written, the order stays free."""
    tenant_token = token_file(mint(redis_sync, Role.TENANT, "t1"))
    async with running_service("allocation", build_allocation, redis_env) as alloc:
        allocation: Any = allocation_pb2_grpc.AllocationServiceStub(alloc.channel_as(Role.OPERATOR))
        await allocation.ImportBlock(IMPORT)
        base = {**redis_env, "NUMPROTECT_ALLOCATION_ADDR": alloc.address}
        for environ in (
            {**base, "NUMPROTECT_SERVICE_TOKEN_FILE": str(tenant_token)},
            {**base, "NUMPROTECT_AUTH": "off"},
        ):
            async with running_service("binding", build_binding, environ) as svc:
                channel = svc.channel if environ.get("NUMPROTECT_AUTH") == "off" else svc.channel_as(Role.TENANT, "t1")
                stub: Any = binding_pb2_grpc.BindingServiceStub(channel)
                error = await rpc_error(stub.CreateBinding(create_request("cred-1", tenant="t1")))
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "refused the binding service's credential" in (error.details() or "")
                assert nothing_of_a_binding_written(redis_sync)
                stats = await allocation.GetPoolStats(allocation_pb2.GetPoolStatsRequest(tenant_id="t1"))
                assert stats.in_use == 0


async def test_binding_refuses_to_start_without_a_credential_while_auth_is_on(
    redis_env: dict[str, str],
) -> None:
    from numprotect.core.settings import SettingsError

    try:
        async with running_service("binding", build_binding, redis_env):
            raise AssertionError("binding started without a service credential")
    except SettingsError as exc:
        assert str(exc).startswith("NUMPROTECT_SERVICE_TOKEN_FILE: required while NUMPROTECT_AUTH=on")


async def test_the_token_rides_a_plaintext_channel_too(
    redis_env: dict[str, str], redis_sync: Any, service_token_file: Path
) -> None:
    """NUMPROTECT_TLS=off (grpc refuses call credentials there): the bootstrap's interceptor sends the token. The
    test's own clients use the same interceptor."""

    def plaintext(address: str, token: str) -> grpc.aio.Channel:
        interceptors: list[Any] = [ServiceToken(token).interceptor()]
        return grpc.aio.insecure_channel(address, interceptors=interceptors)

    off = {**redis_env, "NUMPROTECT_TLS": "off"}
    async with running_service("allocation", build_allocation, off) as alloc:
        async with plaintext(alloc.address, alloc.token(Role.OPERATOR)) as operator:
            await allocation_pb2_grpc.AllocationServiceStub(operator).ImportBlock(IMPORT)
        environ = {
            **off,
            "NUMPROTECT_ALLOCATION_ADDR": alloc.address,
            "NUMPROTECT_SERVICE_TOKEN_FILE": str(service_token_file),
        }
        async with (
            running_service("binding", build_binding, environ) as svc,
            plaintext(svc.address, svc.token(Role.TENANT, "t1")) as tenant,
        ):
            stub: Any = binding_pb2_grpc.BindingServiceStub(tenant)
            created = (await stub.CreateBinding(create_request("plain-1"))).binding
            assert created.state == common_pb2.BINDING_STATE_ACTIVE


async def test_in_mtls_mode_the_workload_certificate_is_binding_s_credential(
    redis_env: dict[str, str], redis_sync: Any, tmp_path: Path
) -> None:
    """No token file: binding presents its workload certificate (spiffe://numprotect/service/binding) to an
    allocation process in mTLS mode, which takes the principal from it."""
    pki = test_pki()
    workload = pki.issue("binding", "spiffe://numprotect/service/binding", tmp_path, hosts=LOCAL_HOSTS)
    client = pki.issue("client", None, tmp_path)
    mtls = tls_env("require")
    operator_token = mint(redis_sync, Role.OPERATOR)  # before the process starts: it loads the keys at start
    alloc = await asyncio.to_thread(ServiceProcess, "allocation", {**redis_env, **mtls})
    try:
        async with secure_channel(alloc.address, operator_token, client=client) as operator:
            await allocation_pb2_grpc.AllocationServiceStub(operator).ImportBlock(IMPORT)
        environ = {
            **redis_env,
            **mtls,
            "NUMPROTECT_TLS_CERT_FILE": str(workload.cert_file),
            "NUMPROTECT_TLS_KEY_FILE": str(workload.key_file),
            "NUMPROTECT_ALLOCATION_ADDR": alloc.address,
        }
        async with running_service("binding", build_binding, environ) as svc:
            assert svc.runtime.service_token is None
            async with secure_channel(svc.address, svc.token(Role.TENANT, "t1"), client=client) as tenant:
                stub: Any = binding_pb2_grpc.BindingServiceStub(tenant)
                created = (await stub.CreateBinding(create_request("mtls-1"))).binding
                assert created.state == common_pb2.BINDING_STATE_ACTIVE
    finally:
        await asyncio.to_thread(alloc.stop)


# ---------------------------------------------------------------- rate limits


async def test_create_and_trace_are_rate_limited_per_principal_then_recover(services: Any) -> None:
    limits = {
        "NUMPROTECT_CREATE_BINDING_RATE": "1",
        "NUMPROTECT_CREATE_BINDING_BURST": "2",
        "NUMPROTECT_TRACE_NUMBER_RATE": "1",
        "NUMPROTECT_TRACE_NUMBER_BURST": "3",
    }
    async with services(**limits) as s:
        t1, t2 = s.tenant("t1"), s.tenant("t2")
        made = [(await t1.CreateBinding(create_request(f"r-{i}", party_a=f"1380000000{i}"))).binding for i in range(2)]
        error = await rpc_error(t1.CreateBinding(create_request("r-2", party_a="13800000002")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "NUMPROTECT_CREATE_BINDING_RATE" in (error.details() or "")
        assert quota_subjects(error) == ["NUMPROTECT_CREATE_BINDING_RATE"]
        # Another principal has its own bucket.
        assert (await t2.CreateBinding(create_request("r-0"))).binding.tenant_id == "t2"

        x = made[0].virtual_number
        trace = pb.TraceNumberRequest(virtual_number=x, at=_now_ts())
        for _ in range(3):
            await t1.TraceNumber(trace)
        error = await rpc_error(t1.TraceNumber(trace))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_subjects(error) == ["NUMPROTECT_TRACE_NUMBER_RATE"]
        operator = s.binding_as(Role.OPERATOR)
        assert (await operator.TraceNumber(trace)).bindings  # its own bucket

        await asyncio.sleep(1.05)  # 1/s: a token back after a second
        again = await t1.CreateBinding(create_request("r-2", party_a="13800000002"))
        assert again.binding.state == common_pb2.BINDING_STATE_ACTIVE
        assert (await t1.TraceNumber(trace)).bindings
        health: Any = health_pb2_grpc.HealthStub(s.binding_service.channel)
        status = await health.Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING
