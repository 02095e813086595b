"""The binding service end to end: real Redis, real allocation service, real gRPC (all in-process)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2

from numprotect.allocation.v1 import allocation_pb2
from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.binding.v1 import binding_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.binding_records import BindingRecordStore, binding_key, decode_stored, order_key
from numprotect.core.errors import Aborted, FailedPrecondition
from numprotect.core.identity.directory import CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY
from numprotect.core.identity.principal import Role
from numprotect.core.phone import mask
from numprotect.core.redis_client import LuaScript
from numprotect.core.routes import Route, axe_marker_key, axn_key, caller_key, extension_key
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.app import build as build_binding
from numprotect.services.binding.store import TENANT_SHARDS, tenant_index_key
from numprotect.services.translation.app import build_sync as build_translation
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.inprocess import running_service, running_sync_service
from support.redis_server import free_port
from support.rpc import rpc_error, violated_fields
from support.tls import secure_channel

A = "13800000001"
B = "13900000002"
B2 = "13700000003"
B3 = "13600000004"
AXB = common_pb2.BINDING_MODE_AXB
AXN = common_pb2.BINDING_MODE_AXN
AXE = common_pb2.BINDING_MODE_AXE


def create_request(
    order: str,
    *,
    tenant: str = "t1",
    mode: int = AXB,
    party_a: str = A,
    party_b: str = B,
    ttl_seconds: float | None = None,
    city_code: str = "010",
    **fields: Any,
) -> pb.CreateBindingRequest:
    request = pb.CreateBindingRequest(
        tenant_id=tenant,
        out_order_id=order,
        mode=mode,  # type: ignore[arg-type]
        party_a=party_a,
        party_b=party_b,
        city_code=city_code,
        user_consent=fields.pop("user_consent", True),
        **fields,
    )
    if ttl_seconds is not None:
        ttl = Duration()
        ttl.FromMilliseconds(int(ttl_seconds * 1000))
        request.ttl.CopyFrom(ttl)
    return request


async def number_info(allocation: Any, virtual_number: str) -> allocation_pb2.NumberInfo:
    reply = await allocation.GetNumber(allocation_pb2.GetNumberRequest(virtual_number=virtual_number))
    return reply.number  # type: ignore[no-any-return]


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no google.rpc.Status in the trailers")


def keys_matching(redis_sync: Any, pattern: str) -> list[str]:
    """All keys matching `pattern` on every node (cluster) or the one node."""
    return sorted(k.decode() if isinstance(k, bytes) else k for k in redis_sync.scan_iter(match=pattern, count=1000))


async def _create(s: Any, order: str, **kwargs: Any) -> pb.Binding:
    """Creates as the key of the request's tenant (t1 unless `tenant` names another)."""
    reply = await s.tenant(kwargs.get("tenant", "t1")).CreateBinding(create_request(order, **kwargs))
    return reply.binding  # type: ignore[no-any-return]


def _mask(*paths: str) -> Any:
    from google.protobuf.field_mask_pb2 import FieldMask

    return FieldMask(paths=list(paths))


def _ts(ms: int) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _route(redis_sync: Any, key: str) -> Route | None:
    raw = redis_sync.get(key)
    return None if raw is None else Route.decode(raw)


# ---------------------------------------------------------------- lifecycle per mode


async def test_axb_full_lifecycle(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        created = await _create(s, "order-1", party_a="+86 138-0000-0001", ttl_seconds=600, recording_enabled=True)
        x = created.virtual_number
        assert created.party_a == A and created.party_b == B  # normalised
        assert created.state == common_pb2.BINDING_STATE_ACTIVE
        assert len(x) == 15 and x.startswith("70010000000")
        assert created.city_code == "010" and not created.city_fallback
        assert created.expire_time.ToMilliseconds() - created.create_time.ToMilliseconds() == 600_000
        # Translation's view: both caller keys, expiring with the binding.
        for caller, other in ((A, B), (B, A)):
            route = _route(redis_sync, caller_key(x, caller))
            assert route is not None and route.binding_id == created.binding_id
            assert {route.party_a, route.party_b} == {caller, other}
            assert abs(redis_sync.pexpiretime(caller_key(x, caller)) - created.expire_time.ToMilliseconds()) <= 1
        info = await number_info(s.allocation, x)
        assert info.active_bindings == 1

        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert got.binding == created

        updated = await s.binding.UpdateBinding(
            pb.UpdateBindingRequest(
                binding=pb.Binding(
                    binding_id=created.binding_id,
                    tenant_id="t1",
                    call_restriction=common_pb2.CALL_RESTRICTION_A_TO_B_ONLY,
                    recording_enabled=False,
                ),
                update_mask=_mask("call_restriction", "recording_enabled"),
            )
        )
        assert updated.binding.call_restriction == common_pb2.CALL_RESTRICTION_A_TO_B_ONLY
        assert not updated.binding.recording_enabled
        route = _route(redis_sync, caller_key(x, A))
        assert route is not None and route.call_restriction == common_pb2.CALL_RESTRICTION_A_TO_B_ONLY
        assert not route.recording_enabled

        deleted = await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert deleted.binding.state == common_pb2.BINDING_STATE_DELETED
        assert deleted.binding.HasField("delete_time")
        assert redis_sync.exists(caller_key(x, A), caller_key(x, B)) == 0
        assert (await number_info(s.allocation, x)).active_bindings == 0
        # Still readable, and a repeated delete changes nothing.
        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert got.binding.state == common_pb2.BINDING_STATE_DELETED
        again = await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert again.binding.delete_time == deleted.binding.delete_time
        error = await rpc_error(
            s.binding.UpdateBinding(
                pb.UpdateBindingRequest(
                    binding=pb.Binding(binding_id=created.binding_id, tenant_id="t1", recording_enabled=True),
                    update_mask=_mask("recording_enabled"),
                )
            )
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_axn_lifecycle_with_optional_default_party(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        created = await _create(s, "axn-1", mode=AXN, party_b="")
        x = created.virtual_number
        route = _route(redis_sync, axn_key(x))
        assert route is not None and route.party_a == A and route.party_b == ""
        assert created.party_b == ""
        updated = await s.binding.UpdateBinding(
            pb.UpdateBindingRequest(
                binding=pb.Binding(binding_id=created.binding_id, tenant_id="t1", party_b=B2),
                update_mask=_mask("party_b"),
            )
        )
        assert updated.binding.party_b == B2
        route = _route(redis_sync, axn_key(x))
        assert route is not None and route.party_b == B2
        with_n = await _create(s, "axn-2", mode=AXN, party_a=B3, party_b=B)
        assert with_n.virtual_number != x  # X belongs to A alone
        await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert redis_sync.exists(axn_key(x)) == 0
        assert (await number_info(s.allocation, x)).active_bindings == 0


async def test_axe_lifecycle_with_extension(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        created = await _create(s, "axe-1", mode=AXE, allow_any_caller=True)
        x, ext = created.virtual_number, created.extension
        assert len(ext) == 4 and ext.isdigit()
        route = _route(redis_sync, extension_key(x, ext))
        assert route is not None and route.allow_any_caller and route.binding_id == created.binding_id
        assert redis_sync.exists(axe_marker_key(x)) == 1
        other = await _create(s, "axe-2", mode=AXE, party_a=B2, party_b=B3)
        if other.virtual_number == x:
            assert other.extension != ext
        at = _ts(_now_ms())
        traced = await s.binding.TraceNumber(pb.TraceNumberRequest(virtual_number=x, at=at, extension=ext))
        assert [b.binding_id for b in traced.bindings] == [created.binding_id]
        assert traced.bindings[0].extension == ext
        await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert redis_sync.exists(extension_key(x, ext)) == 0
        route = _route(redis_sync, extension_key(other.virtual_number, other.extension))
        assert route is not None and route.binding_id == other.binding_id


# ---------------------------------------------------------------- idempotency


async def test_repeated_create_returns_the_same_binding_and_other_parties_conflict(services: Any) -> None:
    async with services() as s:
        first = await _create(s, "order-7")
        again = await _create(s, "order-7", party_a="0086" + A)  # same parties, written differently
        assert again.binding_id == first.binding_id and again.virtual_number == first.virtual_number
        error = await rpc_error(s.binding.CreateBinding(create_request("order-7", party_b=B2)))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        # The same order id of another tenant is another order.
        other = await _create(s, "order-7", tenant="t2")
        assert other.binding_id != first.binding_id


def mismatch_details(error: grpc.aio.AioRpcError) -> tuple[str, str, dict[str, str]]:
    """An ORDER_REQUEST_MISMATCH answer's ErrorInfo `fields` and `binding_id`, and its BadRequest (field ->
    description)."""
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    for detail in status_details(error).details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
    assert info.reason == "ORDER_REQUEST_MISMATCH", info
    described = {violation.field: violation.description for violation in bad.field_violations}
    return info.metadata["fields"], info.metadata["binding_id"], described


async def test_a_repeated_order_with_other_values_names_exactly_the_differing_fields(services: Any) -> None:
    async with services() as s:
        first = await _create(s, "order-9", ttl_seconds=3600, call_restriction=common_pb2.CALL_RESTRICTION_NONE)
        # An exact repeat (the default restriction given or not) returns the same binding.
        again = await _create(s, "order-9", ttl_seconds=3600)
        assert (again.binding_id, again.virtual_number) == (first.binding_id, first.virtual_number)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"ttl_seconds": 7200}, "ttl"),
            ({"city_code": "021"}, "city_code"),
            ({"call_restriction": common_pb2.CALL_RESTRICTION_A_TO_B_ONLY}, "call_restriction"),
            ({"party_b": B2}, "party_b"),
            ({"party_a": B3, "party_b": B2}, "party_a,party_b"),
            ({"ttl_seconds": 60, "city_code": "021", "recording_enabled": True}, "ttl,city_code,recording_enabled"),
        ]
        for changed, expected in cases:
            request = create_request("order-9", **{"ttl_seconds": 3600, **changed})
            error = await rpc_error(s.binding.CreateBinding(request))
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS, (changed, error.details())
            fields, binding_id, described = mismatch_details(error)
            assert fields == expected and binding_id == first.binding_id, (changed, fields)
            assert list(described) == expected.split(","), described
            text = (error.details() or "") + " " + " ".join(described.values())
            # Phone numbers masked (the first request's party shown as 139****0002), never whole.
            for number in (A, B, B2, B3):
                assert number not in text, text
        _, _, described = mismatch_details(
            await rpc_error(s.binding.CreateBinding(create_request("order-9", ttl_seconds=3600, party_b=B2)))
        )
        assert described["party_b"] == f"differs from the order's first request ({mask(B)})"
        # Nothing was created by the refused repeats: the order still names the first binding, alone.
        listed = await s.binding.ListBindings(pb.ListBindingsRequest(tenant_id="t1"))
        assert [b.binding_id for b in listed.bindings] == [first.binding_id]


async def test_32_concurrent_duplicates_create_exactly_one_binding(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        replies = await asyncio.gather(*(s.binding.CreateBinding(create_request("dup-1")) for _ in range(32)))
        ids = {reply.binding.binding_id for reply in replies}
        assert len(ids) == 1
        x = replies[0].binding.virtual_number
        assert (await number_info(s.allocation, x)).active_bindings == 1
        assert len(keys_matching(redis_sync, "np:b:{*}")) == 1
        listed = await s.binding.ListBindings(pb.ListBindingsRequest(tenant_id="t1"))
        assert [b.binding_id for b in listed.bindings] == list(ids)
        stats = await s.allocation.GetPoolStats(allocation_pb2.GetPoolStatsRequest(tenant_id="t1"))
        assert stats.in_use == 1


# ---------------------------------------------------------------- expiry


async def test_expiry_removes_the_routes_and_releases_the_number(services: Any, redis_sync: Any) -> None:
    async with services(NUMPROTECT_BINDING_MIN_TTL="1s") as s:
        created = await _create(s, "short-1", ttl_seconds=2)
        x = created.virtual_number
        assert redis_sync.exists(caller_key(x, A), caller_key(x, B)) == 2
        expire_ms = created.expire_time.ToMilliseconds()
        await asyncio.sleep(max(0.0, (expire_ms - _now_ms()) / 1000) + 0.15)
        assert redis_sync.exists(caller_key(x, A), caller_key(x, B)) == 0
        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert got.binding.state == common_pb2.BINDING_STATE_EXPIRED
        assert (await number_info(s.allocation, x)).active_bindings == 0
        error = await rpc_error(
            s.binding.UpdateBinding(
                pb.UpdateBindingRequest(
                    binding=pb.Binding(
                        binding_id=created.binding_id, tenant_id="t1", expire_time=_ts(expire_ms + 60_000)
                    ),
                    update_mask=_mask("expire_time"),
                )
            )
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        # The history records the expiry (derived from expire_ms).
        history = await get_binding_history_sync(redis_sync, created.binding_id)
        assert history[-1] == ("expire", expire_ms)


async def get_binding_history_sync(redis_sync: Any, binding_id: str) -> list[tuple[str, int]]:
    raw = redis_sync.hgetall(binding_key(binding_id))
    stored = decode_stored(binding_id, raw)
    assert stored is not None
    return [(e.kind, e.at_ms) for e in stored.history()]


async def test_shortening_and_extending_expire_time(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        created = await _create(s, "shorten-1", ttl_seconds=3600)
        x = created.virtual_number
        later = created.expire_time.ToMilliseconds() + 3_600_000
        extended = await s.binding.UpdateBinding(
            pb.UpdateBindingRequest(
                binding=pb.Binding(binding_id=created.binding_id, tenant_id="t1", expire_time=_ts(later)),
                update_mask=_mask("expire_time"),
            )
        )
        assert extended.binding.expire_time.ToMilliseconds() == later
        assert abs(redis_sync.pexpiretime(caller_key(x, A)) - later) <= 1
        retention = 180 * 86_400_000  # the record and the order key stay that long after the new end
        assert abs(redis_sync.pexpiretime(binding_key(created.binding_id)) - (later + retention)) <= 1
        assert abs(redis_sync.pexpiretime(order_key("t1", "shorten-1")) - (later + retention)) <= 1
        soon = _now_ms() + 2000  # far enough for a loaded machine to apply the update first
        await s.binding.UpdateBinding(
            pb.UpdateBindingRequest(
                binding=pb.Binding(binding_id=created.binding_id, tenant_id="t1", expire_time=_ts(soon)),
                update_mask=_mask("binding.expire_time"),
            )
        )
        assert abs(redis_sync.pexpiretime(caller_key(x, B)) - soon) <= 1
        await asyncio.sleep((soon - _now_ms()) / 1000 + 0.15)
        assert redis_sync.exists(caller_key(x, A), caller_key(x, B)) == 0
        assert (await number_info(s.allocation, x)).active_bindings == 0
        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert got.binding.state == common_pb2.BINDING_STATE_EXPIRED
        too_late = created.create_time.ToMilliseconds() + 91 * 86_400_000
        fresh = await _create(s, "shorten-2")
        error = await rpc_error(
            s.binding.UpdateBinding(
                pb.UpdateBindingRequest(
                    binding=pb.Binding(binding_id=fresh.binding_id, tenant_id="t1", expire_time=_ts(too_late)),
                    update_mask=_mask("expire_time"),
                )
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(error) == ["binding.expire_time"]


# ---------------------------------------------------------------- party B replacement and trace


async def test_party_b_replacement_and_trace_across_it(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        before = _now_ms() - 1
        created = await _create(s, "rider-1")
        x = created.virtual_number
        await asyncio.sleep(0.01)
        during = _now_ms()
        await asyncio.sleep(0.01)
        updated = await s.binding.UpdateBinding(
            pb.UpdateBindingRequest(
                binding=pb.Binding(binding_id=created.binding_id, tenant_id="t1", party_b=B2),
                update_mask=_mask("party_b"),
            )
        )
        assert updated.binding.party_b == B2
        history = await s.binding.GetBinding(
            pb.GetBindingRequest(binding_id=created.binding_id, tenant_id="t1", include_history=True)
        )
        assert [(e.kind, list(e.changed_fields), e.party_b) for e in history.history] == [
            ("create", ["party_b", "expire_time"], B),
            ("update", ["party_b"], B2),
        ]
        # The old rider can no longer reach A; the new one can; A now reaches the new one.
        assert redis_sync.exists(caller_key(x, B)) == 0
        new_route = _route(redis_sync, caller_key(x, B2))
        assert new_route is not None and new_route.binding_id == created.binding_id
        a_route = _route(redis_sync, caller_key(x, A))
        assert a_route is not None and a_route.party_b == B2
        await asyncio.sleep(0.01)
        after_change = _now_ms()

        def trace(at_ms: int, party: str = "") -> Any:
            return s.binding.TraceNumber(pb.TraceNumberRequest(virtual_number=x, at=_ts(at_ms), party_number=party))

        assert (await rpc_error(trace(before))).code() == grpc.StatusCode.NOT_FOUND
        then = await trace(during, B)
        assert [(b.binding_id, b.party_b) for b in then.bindings] == [(created.binding_id, B)]
        now = await trace(after_change)
        assert [b.party_b for b in now.bindings] == [B2]
        assert (await rpc_error(trace(after_change, B))).code() == grpc.StatusCode.NOT_FOUND

        await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert (await rpc_error(trace(_now_ms() + 1))).code() == grpc.StatusCode.NOT_FOUND
        kinds = await s.binding.GetBinding(
            pb.GetBindingRequest(binding_id=created.binding_id, tenant_id="t1", include_history=True)
        )
        assert [e.kind for e in kinds.history] == ["create", "update", "delete"]
        # Long after: the old moments still answer (traceability).
        still = await trace(during, "+86" + B)
        assert still.bindings[0].binding_id == created.binding_id
        assert still.bindings[0].state == common_pb2.BINDING_STATE_DELETED


async def test_replacing_b_with_a_party_already_on_the_number_fails(services: Any, redis_sync: Any) -> None:
    # One sub-pool (a cluster's default is 3): its in-use numbers are filled first, so the second binding shares X.
    async with services(NUMPROTECT_ALLOCATION_SUBPOOLS="1") as s:
        first = await _create(s, "p-1")
        # A second binding sharing the number (the pool fills in-use numbers first) with B3 on it.
        second = None
        for i in range(6):
            candidate = await _create(
                s, f"p-2-{i}", party_a=f"1350000000{i}", party_b=B3 if i == 0 else f"1340000000{i}"
            )
            if candidate.virtual_number == first.virtual_number and candidate.party_b == B3:
                second = candidate
                break
        assert second is not None, "allocation did not reuse the in-use AXB number"
        error = await rpc_error(
            s.binding.UpdateBinding(
                pb.UpdateBindingRequest(
                    binding=pb.Binding(binding_id=first.binding_id, tenant_id="t1", party_b=B3),
                    update_mask=_mask("party_b"),
                )
            )
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        # Nothing changed.
        route = _route(redis_sync, caller_key(first.virtual_number, B))
        assert route is not None and route.binding_id == first.binding_id
        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=first.binding_id, tenant_id="t1"))
        assert got.binding.party_b == B


# ---------------------------------------------------------------- validation, tenants, listing


async def test_invalid_arguments_name_every_field(services: Any) -> None:
    async with services() as s:
        error = await rpc_error(
            s.binding.CreateBinding(
                create_request(
                    "",
                    mode=0,
                    party_a="70010000000123",
                    party_b="12345",
                    ttl_seconds=10,
                    city_code="10",
                    allow_any_caller=True,
                )
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(violated_fields(error)) == {
            "out_order_id",
            "mode",
            "party_a",
            "party_b",
            "allow_any_caller",
            "ttl",
            "city_code",
        }
        same = await rpc_error(s.binding.CreateBinding(create_request("o", party_b="+86" + A)))
        assert violated_fields(same) == ["party_b"]
        consent = await rpc_error(s.binding.CreateBinding(create_request("o", user_consent=False)))
        assert consent.code() == grpc.StatusCode.FAILED_PRECONDITION
        created = await _create(s, "ok-1")
        mask_error = await rpc_error(
            s.binding.UpdateBinding(
                pb.UpdateBindingRequest(
                    binding=pb.Binding(binding_id=created.binding_id, tenant_id="t1"),
                    update_mask=_mask("party_a", "virtual_number", "recording_enabled"),
                )
            )
        )
        assert mask_error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(mask_error) == ["update_mask"]
        message = mask_error.details() or ""
        assert "party_a" in message and "virtual_number" in message
        bad_id = await rpc_error(s.binding.GetBinding(pb.GetBindingRequest(binding_id="nope", tenant_id="")))
        assert violated_fields(bad_id) == ["binding_id"]  # a tenant's empty tenant_id means its own
        operator = s.binding_as(Role.OPERATOR)
        bad_id = await rpc_error(operator.GetBinding(pb.GetBindingRequest(binding_id="nope", tenant_id="")))
        assert set(violated_fields(bad_id)) == {"binding_id", "tenant_id"}  # the operator must name the tenant
        trace = await rpc_error(s.binding.TraceNumber(pb.TraceNumberRequest(virtual_number="123")))
        assert violated_fields(trace) == ["virtual_number"]


async def test_a_tenant_never_sees_or_changes_another_tenants_binding(services: Any, redis_sync: Any) -> None:
    """t2's key on t1's binding ids: NOT_FOUND, the very answer of an id that does not exist (no oracle)."""
    async with services() as s:
        mine = await _create(s, "iso-1")
        t2 = s.tenant("t2")
        missing = "b" + "0" * 22
        for tenant_id in ("", "t2"):  # t2's own, implicitly or by name

            def calls(binding_id: str, tenant_id: str = tenant_id) -> tuple[Callable[[], Any], ...]:
                return (
                    lambda: t2.GetBinding(pb.GetBindingRequest(binding_id=binding_id, tenant_id=tenant_id)),
                    lambda: t2.DeleteBinding(pb.DeleteBindingRequest(binding_id=binding_id, tenant_id=tenant_id)),
                    lambda: t2.UpdateBinding(
                        pb.UpdateBindingRequest(
                            binding=pb.Binding(binding_id=binding_id, tenant_id=tenant_id, party_b=B2),
                            update_mask=_mask("party_b"),
                        )
                    ),
                )

            for foreign, absent in zip(calls(mine.binding_id), calls(missing), strict=True):
                error, none = await rpc_error(foreign()), await rpc_error(absent())
                assert error.code() == none.code() == grpc.StatusCode.NOT_FOUND
                assert (error.details() or "").replace(mine.binding_id, "ID") == (none.details() or "").replace(
                    missing, "ID"
                )
        assert redis_sync.exists(caller_key(mine.virtual_number, B)) == 1
        listed = await t2.ListBindings(pb.ListBindingsRequest(tenant_id="t2"))
        assert list(listed.bindings) == []
        by_order = await t2.ListBindings(pb.ListBindingsRequest(out_order_id="iso-1"))
        assert list(by_order.bindings) == []


async def test_list_bindings_pages_and_filters(services: Any) -> None:
    async with services() as s:
        created = [await _create(s, f"list-{i}", party_a=f"1380000010{i}", party_b=f"1390000010{i}") for i in range(7)]
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await s.binding.ListBindings(pb.ListBindingsRequest(tenant_id="t1", page_size=3, page_token=token))
            assert len(page.bindings) <= 3
            seen += [b.binding_id for b in page.bindings]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == [b.binding_id for b in created]  # creation order, each once
        assert pages == 3
        one = await s.binding.ListBindings(pb.ListBindingsRequest(tenant_id="t1", out_order_id="list-4"))
        assert [b.binding_id for b in one.bindings] == [created[4].binding_id]
        default = await s.binding.ListBindings(pb.ListBindingsRequest(tenant_id="t1"))
        assert len(default.bindings) == 7 and not default.next_page_token
        own = await s.binding.ListBindings(pb.ListBindingsRequest())  # a tenant's empty tenant_id: its own
        assert [b.binding_id for b in own.bindings] == [b.binding_id for b in created]
        operator = s.binding_as(Role.OPERATOR)
        for stub, request, field in (
            (s.binding, pb.ListBindingsRequest(tenant_id="t1", page_token="garbage"), "page_token"),
            (s.binding, pb.ListBindingsRequest(tenant_id="t1", page_size=1001), "page_size"),
            (operator, pb.ListBindingsRequest(tenant_id=""), "tenant_id"),  # the operator names the tenant
            (s.binding, pb.ListBindingsRequest(tenant_id="t1", out_order_id="{x}"), "out_order_id"),
        ):
            error = await rpc_error(stub.ListBindings(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert violated_fields(error) == [field]


# ---------------------------------------------------------------- failure midway


async def test_a_redis_fault_midway_leaves_nothing_reserved_or_written(services: Any, redis_sync: Any) -> None:
    """The tenant index write (after AllocateNumber) fails for real: a WRONGTYPE key planted at every shard."""
    async with services() as s:
        planted = [tenant_index_key("t1", shard) for shard in range(TENANT_SHARDS)]
        for key in planted:
            redis_sync.set(key, "not a zset")
        error = await rpc_error(s.binding.CreateBinding(create_request("fault-1")))
        assert error.code() != grpc.StatusCode.OK
        # No reservation left at allocation, no route, no record, no history, no claim on the order.
        stats = await s.allocation.GetPoolStats(allocation_pb2.GetPoolStatsRequest(tenant_id="t1"))
        assert stats.in_use == 0
        assert keys_matching(redis_sync, "np:rt:*") == []
        assert keys_matching(redis_sync, "np:b:*") == []
        assert [k for k in keys_matching(redis_sync, "np:nh:*") if redis_sync.zcard(k)] == []
        assert keys_matching(redis_sync, "np:ord:*") == []
        # Once Redis is healthy the same order creates normally (the idempotency key was not left claimed).
        for key in planted:
            redis_sync.delete(key)
        created = await _create(s, "fault-1")
        assert created.state == common_pb2.BINDING_STATE_ACTIVE
        assert (await number_info(s.allocation, created.virtual_number)).active_bindings == 1


async def test_a_fault_at_the_record_write_is_undone_too(services: Any, redis_sync: Any) -> None:
    """The record write itself fails (a script error): the number reserved just before is given back."""
    async with services() as s:
        original = BindingRecordStore._create
        try:
            BindingRecordStore._create = LuaScript.beside(__file__, "failing_script.lua")  # type: ignore[misc]
            error = await rpc_error(s.binding.CreateBinding(create_request("fault-2")))
        finally:
            BindingRecordStore._create = original  # type: ignore[misc]
        assert error.code() != grpc.StatusCode.OK
        stats = await s.allocation.GetPoolStats(allocation_pb2.GetPoolStatsRequest(tenant_id="t1"))
        assert stats.in_use == 0
        assert keys_matching(redis_sync, "np:rt:*") == []
        assert keys_matching(redis_sync, "np:b:*") == []
        assert keys_matching(redis_sync, "np:ord:*") == []
        assert [k for k in keys_matching(redis_sync, "np:tl:*") if redis_sync.zcard(k)] == []
        assert (await _create(s, "fault-2")).state == common_pb2.BINDING_STATE_ACTIVE


async def test_a_repeated_create_takes_over_an_abandoned_one_and_cleans_it_up(services: Any, redis_sync: Any) -> None:
    """A create that crashed after writing everything but before its commit: once its deadline passed, the
    next create of the order removes its routes, reservation and record, then creates the binding anew."""
    async with services() as s:
        crashed = await _create(s, "crash-1")
        key = order_key("t1", "crash-1")
        state, binding_id, fp, _ = redis_sync.get(key).decode().split("|")
        assert (state, binding_id) == ("d", crashed.binding_id)
        redis_sync.set(key, f"p|{binding_id}|{fp}|{_now_ms() - 1}", keepttl=True)  # pending, deadline passed
        redis_sync.hset(binding_key(binding_id), "st", "p")

        fresh = await _create(s, "crash-1")
        assert fresh.binding_id != crashed.binding_id
        error = await rpc_error(s.binding.GetBinding(pb.GetBindingRequest(binding_id=binding_id, tenant_id="t1")))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert redis_sync.exists(binding_key(binding_id)) == 0
        for caller in (A, B):
            route = _route(redis_sync, caller_key(crashed.virtual_number, caller))
            assert route is None or route.binding_id == fresh.binding_id
        stats = await s.allocation.GetPoolStats(allocation_pb2.GetPoolStatsRequest(tenant_id="t1"))
        assert stats.in_use == 1
        assert (await number_info(s.allocation, fresh.virtual_number)).active_bindings == 1


async def test_a_committed_binding_left_pending_is_completed_by_a_read(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        created = await _create(s, "repair-1")
        redis_sync.hset(binding_key(created.binding_id), "st", "p")  # as if the status write had failed
        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert got.binding.binding_id == created.binding_id
        assert redis_sync.hget(binding_key(created.binding_id), "st") == b"a"


async def test_allocation_unreachable_is_unavailable_and_leaves_the_order_free(
    redis_env: dict[str, str], redis_sync: Any, service_token_file: Any
) -> None:
    environ = {
        **redis_env,
        "NUMPROTECT_ALLOCATION_ADDR": f"127.0.0.1:{free_port()}",
        "NUMPROTECT_BINDING_ALLOCATION_TIMEOUT": "2s",
        "NUMPROTECT_SERVICE_TOKEN_FILE": str(service_token_file),
    }
    async with running_service("binding", build_binding, environ) as svc:
        stub: Any = binding_pb2_grpc.BindingServiceStub(svc.channel_as(Role.TENANT, "t1"))
        error = await rpc_error(stub.CreateBinding(create_request("down-1")))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "AllocateNumber" in (error.details() or "")
        assert keys_matching(redis_sync, "np:ord:*") == []
        assert [k for k in keys_matching(redis_sync, "np:tl:*") if redis_sync.zcard(k)] == []
        again = await rpc_error(stub.CreateBinding(create_request("down-1")))
        assert again.code() == grpc.StatusCode.UNAVAILABLE  # not ABORTED: no claim was left behind


async def test_translation_follows_the_binding_through_replacement_and_delete(
    services: Any, redis_env: dict[str, str], redis_sync: Any
) -> None:
    """The route keys written here are what the real translation service decides calls from."""
    async with services() as s, running_sync_service("translation", build_translation, redis_env) as tr:
        created = await _create(s, "call-1")
        x = created.virtual_number
        # The carrier that routes the number's block translates it (as allocation's ImportBlock records it).
        if redis_sync.hsetnx(CARRIER_BLOCKS_KEY, x[:11], "c1"):
            redis_sync.incr(CARRIER_VERSION_KEY)
        translation: Any = translation_pb2_grpc.TranslationServiceStub(tr.channel_as(Role.CARRIER, "c1"))

        async def call(caller: str) -> Any:
            request = translation_pb2.TranslateRequest(calling_number=caller, called_number=x, call_id="c1")
            return await translation.Translate(request)

        connected = await call(B)
        assert connected.decision == translation_pb2.DECISION_CONNECT and connected.target_number == A
        assert connected.binding_id == created.binding_id and connected.display_number == x
        await s.binding.UpdateBinding(
            pb.UpdateBindingRequest(
                binding=pb.Binding(binding_id=created.binding_id, tenant_id="t1", party_b=B2),
                update_mask=_mask("party_b"),
            )
        )
        assert (await call(B)).decision == translation_pb2.DECISION_REJECT  # the old rider cannot reach A
        assert (await call(B2)).target_number == A
        assert (await call(A)).target_number == B2
        await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        assert (await call(A)).decision == translation_pb2.DECISION_REJECT


async def test_concurrent_changes_of_one_binding_run_one_at_a_time(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        created = await _create(s, "race-1")
        replies = await asyncio.gather(
            *(
                s.binding.UpdateBinding(
                    pb.UpdateBindingRequest(
                        binding=pb.Binding(
                            binding_id=created.binding_id, tenant_id="t1", party_b=party, recording_enabled=True
                        ),
                        update_mask=_mask("party_b"),
                    )
                )
                for party in (B2, B3, "13300000005", "13200000006")
            ),
            return_exceptions=True,
        )
        succeeded = [r.binding.party_b for r in replies if not isinstance(r, BaseException)]
        failed = [r for r in replies if isinstance(r, grpc.aio.AioRpcError)]
        assert succeeded and len(succeeded) + len(failed) == 4
        assert all(e.code() == grpc.StatusCode.ABORTED for e in failed)
        # Whatever order they ran in, record, routes and allocation agree on the last B.
        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=created.binding_id, tenant_id="t1"))
        final_b = got.binding.party_b
        x = created.virtual_number
        routed = [k for k in keys_matching(redis_sync, f"np:rt:{{{x}}}:c:*")]
        assert sorted(routed) == sorted([caller_key(x, A), caller_key(x, final_b)])
        route = _route(redis_sync, caller_key(x, A))
        assert route is not None and route.party_b == final_b
        assert (await number_info(s.allocation, x)).active_bindings == 1


async def test_a_lapsed_reservation_makes_confirm_aborted(services: Any) -> None:
    """A create that outran its lease gets ABORTED (retry), not NOT_FOUND (which would mean the binding)."""
    async with services() as s, secure_channel(s.allocation_address, s.service_token) as channel:
        client = AllocationClient(channel, timeout_seconds=5)
        allocation = await client.allocate("t1", AXB, [A, B], "010", False, lease_ms=100)
        await asyncio.sleep(0.3)
        with pytest.raises(Aborted, match="retry"):
            await client.confirm(allocation.reservation_id, "b0000000000000000000000", _now_ms() + 60_000)
        with pytest.raises(FailedPrecondition):
            await client.replace_party(allocation.reservation_id, B, B2)
        await client.cancel(allocation.reservation_id, "test")  # idempotent: nothing left to cancel is fine


async def test_an_order_past_its_retention_serves_again(services: Any, redis_sync: Any) -> None:
    async with services() as s:
        first = await _create(s, "again-1")
        await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=first.binding_id, tenant_id="t1"))
        assert (await _create(s, "again-1")).binding_id == first.binding_id  # within retention: the same
        redis_sync.delete(binding_key(first.binding_id))  # as Redis does once the retention has passed
        second = await _create(s, "again-1")
        assert second.binding_id != first.binding_id
        assert second.state == common_pb2.BINDING_STATE_ACTIVE
