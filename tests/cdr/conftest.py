"""Fixtures of the cdr tests: the real service in-process on a real Redis (standalone or cluster) over TLS with
API keys, records, and bindings written through the shared binding-record schema.

`cdr_service()` yields a `CdrClients`: `carrier` reports as carrier "cmcc", which routes X's block (`route`
records blocks for other carriers), `tenant(id)` and `operator` read, `anonymous` has no key.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core.binding_records import BindingRecord, BindingRecordStore
from numprotect.core.cdr_keys import Bucket, Buckets, count_key
from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.routes import MODE_AXB, RESTRICTION_NONE
from numprotect.core.server import AioServiceApp, Runtime
from numprotect.core.settings import Env, RedisSettings
from numprotect.core.telemetry import Telemetry
from numprotect.services.cdr.app import build
from numprotect.services.cdr.servicer import CdrServiceServicer
from support.identity import mint, record_blocks
from support.inprocess import RunningService, running_service

X = "700100000000001"
CARRIER = "cmcc"  # routes X's block (that of every virtual number of the tests but OTHER_BLOCK's)
OTHER_BLOCK_NUMBER = "700100000010001"  # in another block, which no carrier routes unless a test says so
CALLER = "13800000001"
TARGET = "13900000002"

Stub = Any  # cdr_pb2_grpc.CdrServiceStub (its methods are untyped)
BUCKETS_SETTING = "NUMPROTECT_CDR_STREAM_BUCKETS"


@dataclass
class CdrClients:
    """One served cdr service and stubs of its callers (each principal's token minted once, on first use)."""

    svc: RunningService[AioServiceApp, Runtime]
    _stubs: dict[tuple[Role, str], Stub] = field(default_factory=dict)
    carrier_id = CARRIER

    def stub_as(self, role: Role, principal_id: str = "") -> Stub:
        key = (role, principal_id)
        if key not in self._stubs:
            self._stubs[key] = cdr_pb2_grpc.CdrServiceStub(self.svc.channel_as(role, principal_id))
        return self._stubs[key]

    @property
    def carrier(self) -> Stub:
        """Carrier CARRIER, which routes X's block."""
        return self.stub_as(Role.CARRIER, CARRIER)

    @property
    def operator(self) -> Stub:
        return self.stub_as(Role.OPERATOR)

    @property
    def anonymous(self) -> Stub:
        return cdr_pb2_grpc.CdrServiceStub(self.svc.channel)

    def tenant(self, tenant_id: str) -> Stub:
        return self.stub_as(Role.TENANT, tenant_id)

    def as_carrier(self, carrier_id: str) -> Stub:
        return self.stub_as(Role.CARRIER, carrier_id)

    def route(self, carrier_id: str, *numbers: str) -> None:
        """Records `carrier_id` as the carrier of the numbers' blocks (one another carrier routes stays its)."""
        self.svc.route(carrier_id, *numbers)

    @property
    def servicer(self) -> CdrServiceServicer:
        servicer = self.svc.app.registrations[0].servicer
        assert isinstance(servicer, CdrServiceServicer)
        return servicer


ServiceFactory = Callable[..., AbstractAsyncContextManager[CdrClients]]
RecordFactory = Callable[..., cdr_pb2.CallDetailRecord]
BindingFactory = Callable[..., Any]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def bucket_of(redis_sync: Any, tenant_id: str, number: str = X) -> Bucket:
    """The bucket of an owner's records on `number` (tenant_id "": the unmatched records), by the owner's stored
    bucket count (none stored: bucket 0, where everything is then)."""
    count = redis_sync.get(count_key(tenant_id))
    return Buckets.of(tenant_id, int(count or 1)).for_number(number)


@pytest.fixture
def cdr_service(redis_env: dict[str, str]) -> ServiceFactory:
    """`async with cdr_service(NUMPROTECT_CDR_MAX_BATCH="10") as cdr:` a served cdr service whose carrier CARRIER
    routes X's block (`telemetry=`: the service's telemetry)."""

    @asynccontextmanager
    async def start(telemetry: Telemetry | None = None, **settings: str) -> AsyncIterator[CdrClients]:
        environ: Mapping[str, str] = {
            **redis_env,
            "NUMPROTECT_CDR_WATCH_BLOCK": "200ms",
            # NUMPROTECT_CDR_STREAM_BUCKETS=4 pytest tests/cdr: the whole suite with new owners' records in buckets.
            **{name: os.environ[name] for name in [BUCKETS_SETTING] if name in os.environ},
            **settings,
        }
        async with running_service("cdr", build, environ, telemetry=telemetry) as svc:
            svc.route(CARRIER, X)
            yield CdrClients(svc)

    return start


@pytest.fixture
def carrier_token(redis_sync: Any) -> str:
    """A token of carrier CARRIER, which routes X's block: both in Redis before any service process starts."""
    record_blocks(redis_sync, CARRIER, X)
    return mint(redis_sync, Role.CARRIER, CARRIER)


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
