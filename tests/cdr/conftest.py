"""Fixtures of the cdr tests: the real service in-process on a real Redis (standalone or cluster), records,
and bindings written through the shared binding-record schema."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core.binding_records import BindingRecord, BindingRecordStore
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.routes import MODE_AXB, RESTRICTION_NONE
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.cdr.app import build
from support.inprocess import running_service

X = "700100000000001"
CALLER = "13800000001"
TARGET = "13900000002"

ServiceFactory = Callable[..., AbstractAsyncContextManager[cdr_pb2_grpc.CdrServiceStub]]
RecordFactory = Callable[..., cdr_pb2.CallDetailRecord]
BindingFactory = Callable[..., Any]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def cdr_service(redis_env: dict[str, str]) -> ServiceFactory:
    """`async with cdr_service(NUMPROTECT_CDR_MAX_BATCH="10") as stub:` a served cdr service."""

    @asynccontextmanager
    async def start(**settings: str) -> AsyncIterator[cdr_pb2_grpc.CdrServiceStub]:
        environ: Mapping[str, str] = {**redis_env, "NUMPROTECT_CDR_WATCH_BLOCK": "200ms", **settings}
        async with running_service("cdr", build, environ) as svc:
            yield cdr_pb2_grpc.CdrServiceStub(svc.channel)

    return start


@pytest.fixture
def make_record() -> RecordFactory:
    """A valid, answered record: make_record("c1", answered_s=30, calling_number=..., ...)."""

    def make(
        call_id: str,
        *,
        call_ms: int | None = None,
        answered_s: float | None = 30.0,
        ring_s: float = 2.0,
        **fields: Any,
    ) -> cdr_pb2.CallDetailRecord:
        start = now_ms() - 120_000 if call_ms is None else call_ms
        record = cdr_pb2.CallDetailRecord(
            call_id=call_id,
            calling_number=CALLER,
            called_number=X,
            target_number=TARGET,
            call_type=cdr_pb2.CALL_TYPE_PEER_TO_A,
            release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
            release_cause=16,
            unconnected_cause=cdr_pb2.UNCONNECTED_CAUSE_NONE,
            carrier_id="cmcc",
        )
        record.call_time.FromMilliseconds(start)
        record.ring_time.FromMilliseconds(start + int(ring_s * 1000))
        answer = start + int(ring_s * 1000) + 3000
        if answered_s is not None:
            record.answer_time.FromMilliseconds(answer)
            record.release_time.FromMilliseconds(answer + int(answered_s * 1000))
        else:
            record.release_time.FromMilliseconds(answer)
        for name, value in fields.items():
            if name in ("call_time", "ring_time", "answer_time", "release_time"):
                if value is None:
                    record.ClearField(name)  # type: ignore[arg-type]
                else:
                    getattr(record, name).FromMilliseconds(value)
            else:
                setattr(record, name, value)
        return record

    return make


@pytest.fixture
async def redis(redis_env: dict[str, str]) -> AsyncIterator[RedisClient]:
    client = create_redis(RedisSettings.from_env(Env(redis_env)))
    yield client
    await client.aclose()


@pytest.fixture
def make_binding(redis: RedisClient) -> BindingFactory:
    """Writes a committed binding (record + number history) through binding_records' write helper."""

    async def make(
        binding_id: str,
        *,
        tenant_id: str = "t1",
        out_order_id: str = "",
        party_a: str = TARGET,
        party_b: str = CALLER,
        virtual_number: str = X,
        create_ms: int | None = None,
        ttl_ms: int = 3_600_000,
    ) -> BindingRecord:
        created = now_ms() - 600_000 if create_ms is None else create_ms
        record = BindingRecord(
            binding_id=binding_id,
            tenant_id=tenant_id,
            out_order_id=out_order_id or f"order-{binding_id}",
            mode=MODE_AXB,
            party_a=party_a,
            party_b=party_b,
            virtual_number=virtual_number,
            extension="",
            city_code="010",
            call_restriction=RESTRICTION_NONE,
            recording_enabled=False,
            allow_any_caller=False,
            user_consent=True,
            create_ms=created,
            expire_ms=created + ttl_ms,
            update_ms=created,
            delete_ms=0,
        )
        store = BindingRecordStore(redis)
        assert await store.create(record, reservation_id="r-" + binding_id, city_fallback=False)
        assert await store.activate(binding_id)
        await store.add_to_history(virtual_number, binding_id, record.end_ms())
        return record

    return make


@pytest.fixture(name="now_ms")
def now_ms_fixture() -> int:
    return now_ms()
