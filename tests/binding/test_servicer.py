"""The servicer's own share: every RPC behind the one concurrency limit, request fields read through the shared
conversions, page tokens."""

from __future__ import annotations

import base64
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.binding.v1 import binding_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.clock import SystemClock
from numprotect.core.conversions import DURATION_RULE, TIMESTAMP_RULE
from numprotect.core.errors import InvalidArgument, Unavailable
from numprotect.core.identity.layer import Callers
from numprotect.core.identity.principal import Role
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.page_tokens import PageTokenKey
from numprotect.core.redis_client import create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.app import build as build_binding
from numprotect.services.binding.app import build_servicer
from numprotect.services.binding.servicer import SERVICE
from numprotect.services.binding.settings import BindingSettings
from support.inprocess import running_service
from support.redis_server import free_port
from support.rpc import violated_fields


async def test_every_rpc_waits_for_a_place_in_the_one_limit(redis_env: dict[str, str]) -> None:
    """With the limit's one place held, each RPC of the service gives up waiting (UNAVAILABLE) before it reads its
    request; once the place is free, the same call runs."""
    settings = BindingSettings.from_env(Env(redis_env))
    redis = create_redis(RedisSettings.from_env(Env(redis_env)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")  # never called: no request gets that far
    try:
        allocation = AllocationClient(channel, timeout_seconds=1)
        calls = ConcurrencyLimit(1, wait_seconds=0.05, name="binding calls")
        # Callers without a directory: as with NUMPROTECT_AUTH=off, every call is let by and must name its tenant.
        servicer = build_servicer(
            redis, allocation, settings, calls, SystemClock(), PageTokenKey.random(), Callers(None)
        )
        assert sorted(SERVICE.methods_by_name) == sorted(
            ["CreateBinding", "GetBinding", "UpdateBinding", "DeleteBinding", "ListBindings", "TraceNumber"]
        )
        async with calls:
            for name, method in SERVICE.methods_by_name.items():
                request = getattr(pb, method.input_type.name)()
                with pytest.raises(Unavailable, match="binding calls"):
                    await getattr(servicer, name)(request, None)
        with pytest.raises(InvalidArgument):  # an empty request, now validated
            await servicer.GetBinding(pb.GetBindingRequest(), None)
        assert calls.held == 0
    finally:
        await channel.close(grace=None)
        await redis.aclose()


def create_request(order: str, *, party_a: str = "13800000001", **fields: Any) -> pb.CreateBindingRequest:
    return pb.CreateBindingRequest(
        tenant_id="t1",
        out_order_id=order,
        mode=common_pb2.BINDING_MODE_AXB,
        party_a=party_a,
        party_b="13900000002",
        city_code="010",
        user_consent=True,
        **fields,
    )


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return raised.value


async def test_times_outside_what_protobuf_allows_are_invalid_argument_naming_the_field(services: Any) -> None:
    """Read through numprotect.core.conversions: not protobuf's ValueError (INTERNAL)."""
    async with services() as s:
        create = create_request("o-1", ttl=Duration(seconds=5, nanos=-1))  # signs differ: not a Duration
        assert (await _refused(s.binding.CreateBinding(create))).details() == f"ttl: {DURATION_RULE}"
        update = pb.UpdateBindingRequest(
            binding=pb.Binding(binding_id="b" + "0" * 22, tenant_id="t1", expire_time=Timestamp(seconds=10**12)),
            update_mask=FieldMask(paths=["expire_time"]),
        )
        assert (await _refused(s.binding.UpdateBinding(update))).details() == f"binding.expire_time: {TIMESTAMP_RULE}"
        for at in (Timestamp(seconds=10**12), Timestamp(seconds=0, nanos=-1), Timestamp(seconds=253_402_300_800)):
            trace = pb.TraceNumberRequest(virtual_number="700100000000001", at=at)
            assert (await _refused(s.binding.TraceNumber(trace))).details() == f"at: {TIMESTAMP_RULE}"
        for stamp in (Timestamp(seconds=0, nanos=-1), Timestamp(seconds=253_402_300_800), Timestamp(nanos=10**9)):
            update.binding.expire_time.CopyFrom(stamp)
            assert violated_fields(await _refused(s.binding.UpdateBinding(update))) == ["binding.expire_time"]
        for ttl in (
            Duration(seconds=315_576_000_000),  # the largest Duration: far beyond NUMPROTECT_BINDING_MAX_TTL
            Duration(seconds=315_576_000_001),
            Duration(nanos=-1),
            Duration(nanos=10**9),
            Duration(seconds=-60),
        ):
            refused = await _refused(s.binding.CreateBinding(create_request("o-2", ttl=ttl)))
            assert violated_fields(refused) == ["ttl"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"party_a": "\uff11\uff13\uff18" + "\uff10" * 7 + "\uff11"}, "party_a"),  # full-width digits
        ({"party_a": "\u0661\u0663\u0668" + "\u0660" * 7 + "\u0661"}, "party_a"),  # Arabic-Indic digits
        ({"party_b": "1390000\x000002"}, "party_b"),
        ({"party_b": "+"}, "party_b"),
        ({"party_b": "1" * 65536}, "party_b"),
        ({"out_order_id": "o" * 65536}, "out_order_id"),
        ({"out_order_id": "\u00e9t\u00e9"}, "out_order_id"),
        ({"city_code": "0\u0661\u0660"}, "city_code"),
        ({"mode": 99}, "mode"),
        ({"mode": -1}, "mode"),
        ({"call_restriction": 2**31 - 1}, "call_restriction"),
    ],
)
async def test_hostile_create_fields_are_invalid_argument_naming_them(
    services: Any, change: dict[str, Any], field: str
) -> None:
    async with services() as s:
        request = create_request("o-1")
        for name, value in change.items():
            setattr(request, name, value)
        refused = await _refused(s.binding.CreateBinding(request))
        assert violated_fields(refused) == [field]
        assert len(refused.details() or "") < 300  # the rule, never the value, whatever its size


async def test_an_unknown_update_mask_path_is_quoted_short_whatever_its_length(services: Any) -> None:
    """A 70 KB path once came back whole in the status message: past the client's metadata limit, the caller saw
    RESOURCE_EXHAUSTED instead of the INVALID_ARGUMENT."""
    async with services() as s:
        binding = pb.Binding(binding_id="b" + "0" * 22, tenant_id="t1")
        for paths in (["x" * 70_000], [f"nope{i}" for i in range(10_000)], ["\u00e9", "\x00", "expire_time.seconds"]):
            update = pb.UpdateBindingRequest(binding=binding, update_mask=FieldMask(paths=paths))
            refused = await _refused(s.binding.UpdateBinding(update))
            assert violated_fields(refused) == ["update_mask"]
            assert len(refused.details() or "") < 300
        for binding_id in ("\uff42" + "\uff10" * 22, "b" + "0" * 21 + "\x00", "b" * 65536):
            get = pb.GetBindingRequest(binding_id=binding_id)
            assert violated_fields(await _refused(s.binding.GetBinding(get))) == ["binding_id"]


async def test_list_tokens_are_signed_bound_to_the_tenant_and_shared_by_replicas_with_one_key(
    services: Any, redis_env: dict[str, str], service_token_file: Any
) -> None:
    key = {"NUMPROTECT_PAGE_TOKEN_KEY": base64.b64encode(b"binding-test-key-of-thirty-two-b").decode()}
    other_key = {"NUMPROTECT_PAGE_TOKEN_KEY": base64.b64encode(b"o" * 32).decode()}
    async with services(**key) as s:
        created = [
            (await s.binding.CreateBinding(create_request(f"page-{i}", party_a=f"1380000010{i}"))).binding.binding_id
            for i in range(3)
        ]
        first = await s.binding.ListBindings(pb.ListBindingsRequest(tenant_id="t1", page_size=1))
        assert [b.binding_id for b in first.bindings] == created[:1] and first.next_page_token
        environ = {
            **redis_env,
            "NUMPROTECT_ALLOCATION_ADDR": s.allocation_address,
            "NUMPROTECT_SERVICE_TOKEN_FILE": str(service_token_file),
        }
        async with running_service("binding", build_binding, {**environ, **key}) as replica:
            stub: Any = binding_pb2_grpc.BindingServiceStub(replica.channel_as(Role.TENANT, "t1"))
            rest = await stub.ListBindings(pb.ListBindingsRequest(tenant_id="t1", page_token=first.next_page_token))
            assert [b.binding_id for b in rest.bindings] == created[1:] and not rest.next_page_token
        # t2's key replaying t1's token: the token continues t1's listing only.
        other_tenant = pb.ListBindingsRequest(page_token=first.next_page_token)
        error = await _refused(s.tenant("t2").ListBindings(other_tenant))
        assert (error.details() or "").startswith("page_token: is not a next_page_token of binding.ListBindings")
        # The operator reading t2's bindings with it: the same.
        as_operator = pb.ListBindingsRequest(tenant_id="t2", page_token=first.next_page_token)
        assert (await _refused(s.binding_as(Role.OPERATOR).ListBindings(as_operator))).details() == error.details()
        async with running_service("binding", build_binding, {**environ, **other_key}) as foreign:
            stub = binding_pb2_grpc.BindingServiceStub(foreign.channel_as(Role.TENANT, "t1"))
            request = pb.ListBindingsRequest(tenant_id="t1", page_token=first.next_page_token)
            assert (await _refused(stub.ListBindings(request))).details() == error.details()
