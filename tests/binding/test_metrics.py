"""The bindings' metrics on real binding and allocation services: created by mode, updated and deleted counted by
binding once per binding (idempotent repeats are not), and a binding's expiry counted once by allocation when it
reclaims the number."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from binding.conftest import ServicesFactory
from binding.test_binding import AXN, create_request
from google.protobuf.field_mask_pb2 import FieldMask

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.common.v1 import common_pb2


def sample(service: Any, name: str, labels: dict[str, str] | None = None) -> float | None:
    value: float | None = service.runtime.metrics.registry.get_sample_value(name, labels or {})
    return value


def bindings(s: Any) -> dict[str, float | None]:
    svc = s.binding_service
    return {
        **{m: sample(svc, "numprotect_bindings_created_total", {"mode": m}) for m in ("axb", "axn", "axe")},
        "updated": sample(svc, "numprotect_bindings_updated_total"),
        "deleted": sample(svc, "numprotect_bindings_deleted_total"),
    }


async def test_creates_updates_deletes_and_expiries_are_counted_once(services: ServicesFactory) -> None:
    async with services(NUMPROTECT_BINDING_MIN_TTL="1s", NUMPROTECT_METRICS_POOL_REFRESH="100ms") as s:
        assert bindings(s) == {"axb": 0, "axn": 0, "axe": 0, "updated": 0, "deleted": 0}
        first = (await s.binding.CreateBinding(create_request("o1"))).binding
        repeat = (await s.binding.CreateBinding(create_request("o1"))).binding  # the same order: no new binding
        assert repeat.binding_id == first.binding_id
        await s.binding.CreateBinding(create_request("o2", mode=AXN, party_b=""))
        update = pb.UpdateBindingRequest(
            binding=pb.Binding(binding_id=first.binding_id, tenant_id="t1", recording_enabled=False),
            update_mask=FieldMask(paths=["recording_enabled"]),
        )
        await s.binding.UpdateBinding(update)
        for _ in range(2):  # a repeated delete changes nothing
            await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=first.binding_id, tenant_id="t1"))
        short = (await s.binding.CreateBinding(create_request("o3", party_b="13700000003", ttl_seconds=1))).binding
        assert bindings(s) == {"axb": 2, "axn": 1, "axe": 0, "updated": 1, "deleted": 1}

        # The short binding ends; allocation reclaims its number (the deleted one was given back, not expired).
        deadline = time.monotonic() + 10
        while sample(s.allocation_service, "numprotect_bindings_expired_total") != 1:
            assert time.monotonic() < deadline, "the expiry was not counted"
            await asyncio.sleep(0.05)
        got = await s.binding.GetBinding(pb.GetBindingRequest(binding_id=short.binding_id, tenant_id="t1"))
        assert got.binding.state == common_pb2.BINDING_STATE_EXPIRED
        await asyncio.sleep(0.3)  # more refresh rounds count it no more
        assert sample(s.allocation_service, "numprotect_bindings_expired_total") == 1
        assert bindings(s) == {"axb": 2, "axn": 1, "axe": 0, "updated": 1, "deleted": 1}
