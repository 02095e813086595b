"""Allocation's domain metrics on real services and Redis: numprotect_pool_numbers follows imports and allocations
(refreshed on the NUMPROTECT_METRICS_POOL_REFRESH timer), and numprotect_bindings_expired counts a binding's end once
however many allocation processes share the pools."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from allocation.conftest import Svc, as_policy
from allocation.test_allocation import B1, BLOCK, allocate, import_block, party, timestamp_in

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.core.settings import Env, SettingsError
from numprotect.services.allocation.settings import AllocationSettings

FAST = {"NUMPROTECT_METRICS_POOL_REFRESH": "100ms"}
SvcFactory = Callable[..., AbstractAsyncContextManager[Svc]]


def pool(svc: Svc, state: str, tenant: str = "t1", city: str = "010") -> float | None:
    labels = {"tenant": tenant, "city": city, "state": state}
    return svc.runtime.metrics.registry.get_sample_value("numprotect_pool_numbers", labels)


def expired(svc: Svc) -> float:
    value = svc.runtime.metrics.registry.get_sample_value("numprotect_bindings_expired_total")
    assert value is not None  # exposed from the start
    return value


async def until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the metric did not get there in time"
        await asyncio.sleep(0.05)


def states(svc: Svc) -> tuple[float | None, ...]:
    return tuple(pool(svc, state) for state in ("free", "in_use", "locked", "cooling"))


async def test_pool_gauges_follow_imports_allocations_and_locks(allocation_svc: SvcFactory) -> None:
    async with allocation_svc(**FAST) as svc:
        stub: Any = as_policy(svc)  # stands for the stub (conftest.AsPolicy)
        await asyncio.sleep(0.3)
        assert pool(svc, "free") is None  # no pool yet, no series
        await import_block(stub)
        await until(lambda: states(svc) == (10_000, 0, 0, 0))
        await allocate(stub, party(1), party(2))
        await until(lambda: states(svc) == (9_999, 1, 0, 0))
        await stub.LockNumber(pb.LockNumberRequest(virtual_number=BLOCK + "0001", reason="fraud", actor="ops"))
        await until(lambda: pool(svc, "locked") == 1)
        # The same figures GetPoolStats answers.
        answered = await stub.GetPoolStats(pb.GetPoolStatsRequest(tenant_id="t1", city_code="010"))
        await until(lambda: states(svc) == (answered.available, answered.in_use, answered.locked, answered.cooling))


async def test_an_expiry_is_counted_once_across_allocation_processes(allocation_svc: SvcFactory) -> None:
    async with allocation_svc(**FAST) as first, allocation_svc(**FAST) as second:
        stub: Any = as_policy(first)
        await import_block(stub)
        assert expired(first) == expired(second) == 0
        bound = await allocate(stub, party(1), party(2))
        await stub.ConfirmReservation(
            pb.ConfirmReservationRequest(
                reservation_id=bound.reservation_id, binding_id=B1, expire_time=timestamp_in(0.5)
            )
        )
        await allocate(stub, party(3), party(4), lease_s=0.3)  # a reservation never confirmed: no binding ends
        await until(lambda: expired(first) + expired(second) == 1)
        await until(lambda: pool(first, "in_use") == 0 and pool(second, "in_use") == 0)
        # Other sweeps (an allocation, GetNumber) and more refresh rounds in both processes count nothing again.
        await allocate(stub, party(5), party(6))
        await stub.GetNumber(pb.GetNumberRequest(virtual_number=bound.virtual_number))
        await asyncio.sleep(0.5)
        assert expired(first) + expired(second) == 1


@pytest.mark.parametrize("value", ["0s", "2h", "soon"])
def test_the_refresh_interval_is_validated(value: str) -> None:
    with pytest.raises(SettingsError, match="NUMPROTECT_METRICS_POOL_REFRESH"):
        AllocationSettings.from_env(Env({"NUMPROTECT_METRICS_POOL_REFRESH": value}))
    assert AllocationSettings.from_env(Env({})).metrics_pool_refresh_seconds == 15.0
