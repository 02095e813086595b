"""The servicer's own share: every RPC behind the one concurrency limit, and request fields it parses itself."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.core.clock import SystemClock
from numprotect.core.errors import InvalidArgument, Unavailable
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.redis_client import create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.app import build_servicer
from numprotect.services.binding.servicer import SERVICE
from numprotect.services.binding.settings import BindingSettings
from support.redis_server import free_port


async def test_every_rpc_waits_for_a_place_in_the_one_limit(redis_env: dict[str, str]) -> None:
    """With the limit's one place held, each RPC of the service gives up waiting (UNAVAILABLE) before it reads its
    request; once the place is free, the same call runs."""
    settings = BindingSettings.from_env(Env(redis_env))
    redis = create_redis(RedisSettings.from_env(Env(redis_env)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")  # never called: no request gets that far
    try:
        allocation = AllocationClient(channel, timeout_seconds=1)
        calls = ConcurrencyLimit(1, wait_seconds=0.05, name="binding calls")
        servicer = build_servicer(redis, allocation, settings, calls, SystemClock())
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


async def test_trace_number_refuses_a_moment_outside_the_timestamp_range(services: Any) -> None:
    async with services() as s:
        for at in (Timestamp(seconds=10**12), Timestamp(seconds=0, nanos=-1)):
            request = pb.TraceNumberRequest(virtual_number="700100000000001", at=at)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await s.binding.TraceNumber(request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (raised.value.details() or "").startswith("at: must be a timestamp")
