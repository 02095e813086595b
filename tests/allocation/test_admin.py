"""AdminService on the allocation process: minting, listing, expiring and revoking API keys (revocation reaching
another process through its own reload), and the audit trail (listing, filters, paging, a regulator's own events,
the chain verifying and finding an edited or a deleted event)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from numprotect.admin.v1 import admin_pb2 as pb
from numprotect.admin.v1 import admin_pb2_grpc
from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.core.identity import api_keys, audit
from numprotect.core.identity.layer import UNAUTHENTICATED_MESSAGE
from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import create_redis, create_sync_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.allocation.admin import AuditTrail, EventFilter
from support.processes import ServiceProcess
from support.rpc import code_of, fails, violated_fields
from support.tls import channel_for

Svc = Any
ServiceFactory = Callable[..., AbstractAsyncContextManager[Svc]]
BLOCK = "70012345678"
REVOCATION_LIMIT_S = 3.0


def admin(channel: grpc.aio.Channel) -> Any:
    return admin_pb2_grpc.AdminServiceStub(channel)


def allocation(channel: grpc.aio.Channel) -> Any:
    return allocation_pb2_grpc.AllocationServiceStub(channel)


def timestamp_in(seconds: float) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(round((time.time() + seconds) * 1000))
    return value


def own_pool(channel: grpc.aio.Channel) -> Any:
    """A tenant's cheapest call: its own pool statistics."""
    return allocation(channel).GetPoolStats(allocation_pb2.GetPoolStatsRequest(), timeout=5)


async def test_a_minted_key_works_is_never_shown_again_and_revocation_reaches_another_process_within_3s(
    allocation_svc: ServiceFactory, redis_env: dict[str, str], redis_sync: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with allocation_svc() as svc:
        operator_token = svc.token(Role.OPERATOR)
        operator = admin(svc.channel_with(operator_token))
        created = await operator.CreateApiKey(
            pb.CreateApiKeyRequest(role=pb.ROLE_TENANT, tenant_id="t1", description="order system, production")
        )
        token, key = created.token, created.key
        assert token.startswith(f"npk_{key.key_id}_") and len(token) == 4 + 16 + 1 + 43
        assert (key.role, key.tenant_id, key.carrier_id, key.description) == (
            pb.ROLE_TENANT,
            "t1",
            "",
            "order system, production",
        )
        assert key.created_by == f"operator/key:{operator_token.split('_')[1]}"
        assert not key.HasField("expire_time") and not key.HasField("revoke_time")
        secret = token.split("_", 2)[2]
        # Never logged, never listed, never stored (only its keyed hash is).
        assert not [r for r in caplog.records if secret in r.getMessage() or secret in str(r.__dict__)]
        stored = redis_sync.hget(api_keys.KEYS_KEY, key.key_id)
        assert secret.encode() not in stored
        listed = await operator.ListApiKeys(pb.ListApiKeysRequest())
        assert key.key_id in [k.key_id for k in listed.keys]
        token_hash = api_keys.ApiKeyRecord.decode(stored).token_hash
        assert secret.encode() not in listed.SerializeToString()
        assert token_hash.encode() not in listed.SerializeToString()

        # Another process: it loads the key at start-up and learns of the revocation only by its own reload,
        # every NUMPROTECT_AUTH_REFRESH_SECONDS (the default, 1 s).
        process = await asyncio.to_thread(
            ServiceProcess, "allocation", {**redis_env, "NUMPROTECT_AUTH_REFRESH_SECONDS": "1"}
        )
        try:
            remote = channel_for(process.address, process.env, token)
            try:
                assert (await own_pool(remote)).total == 0
                revoked = await operator.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key.key_id))
                started = time.monotonic()
                assert revoked.key.HasField("revoke_time")
                while (code := await code_of(own_pool(remote))) == grpc.StatusCode.OK:
                    assert time.monotonic() - started < 10, "the revoked key still works after 10 s"
                    await asyncio.sleep(0.02)
                delay = time.monotonic() - started
                print(f"\nrevoked key refused by another process after {delay:.2f} s")
                assert code == grpc.StatusCode.UNAUTHENTICATED
                assert delay <= REVOCATION_LIMIT_S
                error = await fails(grpc.StatusCode.UNAUTHENTICATED, own_pool(remote))
                assert error.details() == UNAUTHENTICATED_MESSAGE
            finally:
                await remote.close(grace=None)
        finally:
            assert await asyncio.to_thread(process.stop) == 0
        assert not [line for line in process.lines if secret in line]

        again = await operator.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key.key_id))  # idempotent
        assert again.key.revoke_time == revoked.key.revoke_time
        await fails(grpc.StatusCode.NOT_FOUND, operator.RevokeApiKey(pb.RevokeApiKeyRequest(key_id="0" * 16)))
        malformed = await fails(
            grpc.StatusCode.INVALID_ARGUMENT, operator.RevokeApiKey(pb.RevokeApiKeyRequest(key_id="x"))
        )
        assert violated_fields(malformed) == ["key_id"]


async def test_an_expiring_key_is_refused_once_expired(allocation_svc: ServiceFactory) -> None:
    async with allocation_svc() as svc:
        operator = admin(svc.channel_as(Role.OPERATOR))
        expire = timestamp_in(1.5)
        created = await operator.CreateApiKey(
            pb.CreateApiKeyRequest(role=pb.ROLE_TENANT, tenant_id="t1", expire_time=expire)
        )
        assert created.key.expire_time == expire
        directory = svc.runtime.identity.directory
        await asyncio.to_thread(directory.reload)
        channel = svc.channel_with(created.token)
        assert await code_of(own_pool(channel)) == grpc.StatusCode.OK
        for _ in range(200):  # polls every 50 ms for up to 10 s
            if (code := await code_of(own_pool(channel))) != grpc.StatusCode.OK:
                break
            await asyncio.sleep(0.05)
        refused_at_ms = time.time_ns() // 1_000_000
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert expire.ToMilliseconds() <= refused_at_ms < expire.ToMilliseconds() + 1000


async def test_create_api_key_names_the_field_and_rule_of_bad_input(allocation_svc: ServiceFactory) -> None:
    async with allocation_svc() as svc:
        operator = admin(svc.channel_as(Role.OPERATOR))
        cases: list[tuple[pb.CreateApiKeyRequest, list[str], str]] = [
            (pb.CreateApiKeyRequest(), ["role"], "ROLE_OPERATOR"),
            (pb.CreateApiKeyRequest(role=pb.ROLE_TENANT), ["tenant_id"], "is required"),
            (pb.CreateApiKeyRequest(role=pb.ROLE_TENANT, tenant_id="a:b"), ["tenant_id"], "letters, digits"),
            (pb.CreateApiKeyRequest(role=pb.ROLE_CARRIER), ["carrier_id"], "is required"),
            (pb.CreateApiKeyRequest(role=pb.ROLE_CARRIER, carrier_id="c m"), ["carrier_id"], "letters, digits"),
            (pb.CreateApiKeyRequest(role=pb.ROLE_SERVICE, service="billing"), ["service"], "binding"),
            (
                pb.CreateApiKeyRequest(role=pb.ROLE_OPERATOR, tenant_id="t1", carrier_id="cm"),
                ["tenant_id", "carrier_id"],
                "must be empty for ROLE_OPERATOR",
            ),
            (pb.CreateApiKeyRequest(role=pb.ROLE_REGULATOR, description="x" * 257), ["description"], "256"),
            (
                pb.CreateApiKeyRequest(role=pb.ROLE_REGULATOR, description="ops\x1b[2J\x00"),
                ["description"],
                "control characters",
            ),
            (
                pb.CreateApiKeyRequest(role=pb.ROLE_REGULATOR, expire_time=timestamp_in(-1)),
                ["expire_time"],
                "future",
            ),
            (
                pb.CreateApiKeyRequest(role=pb.ROLE_REGULATOR, expire_time=Timestamp(seconds=253_402_300_800)),
                ["expire_time"],
                "9999-12-31",
            ),
            (pb.CreateApiKeyRequest(role=pb.ROLE_REGULATOR, expire_time=Timestamp(nanos=-1)), ["expire_time"], "nanos"),
            (pb.CreateApiKeyRequest(role=99), ["role"], "ROLE_OPERATOR"),  # type: ignore[arg-type]
            (pb.CreateApiKeyRequest(role=pb.ROLE_TENANT, tenant_id="\uff54\uff11"), ["tenant_id"], "letters"),
        ]
        for request, fields, rule in cases:
            error = await fails(grpc.StatusCode.INVALID_ARGUMENT, operator.CreateApiKey(request))
            assert violated_fields(error) == fields, request
            assert rule in (error.details() or ""), (request, error.details())
        assert await asyncio.to_thread(lambda: svc.redis.hlen(api_keys.KEYS_KEY)) == 1  # only the operator's
        binding = await operator.CreateApiKey(pb.CreateApiKeyRequest(role=pb.ROLE_SERVICE, service="binding"))
        assert (binding.key.role, binding.key.service) == (pb.ROLE_SERVICE, "binding")
        events = await operator.CreateApiKey(pb.CreateApiKeyRequest(role=pb.ROLE_SERVICE, service="events"))
        assert (events.key.role, events.key.service) == (pb.ROLE_SERVICE, "events")  # the fifth service
        carrier = await operator.CreateApiKey(pb.CreateApiKeyRequest(role=pb.ROLE_CARRIER, carrier_id="cm"))
        assert carrier.key.carrier_id == "cm" and not carrier.key.tenant_id


async def test_list_api_keys_filters_and_pages_newest_first(allocation_svc: ServiceFactory) -> None:
    async with allocation_svc() as svc:
        operator = admin(svc.channel_as(Role.OPERATOR))
        made = []
        for request in [pb.CreateApiKeyRequest(role=pb.ROLE_TENANT, tenant_id=f"t{i % 2}") for i in range(5)] + [
            pb.CreateApiKeyRequest(role=pb.ROLE_CARRIER, carrier_id="cm")
        ]:
            made.append((await operator.CreateApiKey(request)).key)
            await asyncio.sleep(0.002)  # distinct create times
        await operator.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=made[0].key_id))

        async def every(request: pb.ListApiKeysRequest) -> list[str]:
            ids: list[str] = []
            while True:
                page = await operator.ListApiKeys(request)
                assert len(page.keys) <= max(request.page_size, 1)
                ids.extend(k.key_id for k in page.keys)
                if not page.next_page_token:
                    return ids
                request.page_token = page.next_page_token

        active = [k.key_id for k in reversed(made[1:])]
        everything = await every(pb.ListApiKeysRequest(page_size=2))
        assert everything[: len(active)] == active and len(everything) == len(active) + 1  # + the operator's
        assert await every(pb.ListApiKeysRequest(page_size=2, tenant_id="t0")) == [made[4].key_id, made[2].key_id]
        revoked_too = await every(pb.ListApiKeysRequest(page_size=2, tenant_id="t0", show_revoked=True))
        assert revoked_too == [made[4].key_id, made[2].key_id, made[0].key_id]
        assert await every(pb.ListApiKeysRequest(role=pb.ROLE_CARRIER)) == [made[5].key_id]
        assert await every(pb.ListApiKeysRequest(carrier_id="cm")) == [made[5].key_id]
        first = await operator.ListApiKeys(pb.ListApiKeysRequest(page_size=1, tenant_id="t0"))
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            operator.ListApiKeys(pb.ListApiKeysRequest(page_size=1, tenant_id="t1", page_token=first.next_page_token)),
        )
        assert violated_fields(error) == ["page_token"]
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT, operator.ListApiKeys(pb.ListApiKeysRequest(page_size=1001))
        )
        assert violated_fields(error) == ["page_size"]


async def _some_events(svc: Svc) -> tuple[str, str]:
    """Operator imports, locks and unlocks; a tenant is denied a lock; the regulator reads a history. Returns the
    operator's and the regulator's subjects."""
    operator_token, regulator_token = svc.token(Role.OPERATOR), svc.token(Role.REGULATOR)
    operator, tenant = allocation(svc.channel_with(operator_token)), allocation(svc.channel_as(Role.TENANT, "t1"))
    regulator = allocation(svc.channel_with(regulator_token))
    x = BLOCK + "0001"
    await operator.ImportBlock(
        allocation_pb2.ImportBlockRequest(block=BLOCK, tenant_id="t1", city_code="010", carrier_id="cm")
    )
    await operator.LockNumber(allocation_pb2.LockNumberRequest(virtual_number=x, reason="complaint"))
    await operator.UnlockNumber(allocation_pb2.UnlockNumberRequest(virtual_number=x))
    assert await code_of(tenant.LockNumber(allocation_pb2.LockNumberRequest(virtual_number=x, reason="no"))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    await regulator.ListNumberHistory(allocation_pb2.ListNumberHistoryRequest(virtual_number=x, reason="case 9"))
    return f"operator/key:{operator_token.split('_')[1]}", f"regulator/key:{regulator_token.split('_')[1]}"


async def test_list_audit_events_filters_pages_and_shows_a_regulator_only_its_own(
    allocation_svc: ServiceFactory, audit_events: Any
) -> None:
    async with allocation_svc() as svc:
        operator_subject, regulator_subject = await _some_events(svc)
        await asyncio.sleep(0.01)
        boundary = timestamp_in(0)
        await asyncio.sleep(0.01)
        lock = allocation_pb2.LockNumberRequest(virtual_number=BLOCK + "0002", reason="later")
        await allocation(svc.channel_with(svc.token(Role.OPERATOR))).LockNumber(lock)
        stored = await audit_events(svc)
        assert len(stored) == 6
        operator = admin(svc.channel_as(Role.OPERATOR))

        async def every(request: pb.ListAuditEventsRequest, stub: Any = operator) -> list[pb.AuditEvent]:
            events: list[pb.AuditEvent] = []
            while True:
                page = await stub.ListAuditEvents(request)
                events.extend(page.events)
                if not page.next_page_token:
                    return events
                request.page_token = page.next_page_token

        listed = await every(pb.ListAuditEventsRequest(page_size=2))
        assert [e.event_id for e in listed] == [i for i, _ in reversed(stored)]  # newest first, all, paged
        lock_event = listed[-2]
        assert (lock_event.principal, lock_event.role, lock_event.outcome, lock_event.reason) == (
            operator_subject,
            pb.ROLE_OPERATOR,
            "OK",
            "complaint",
        )
        assert lock_event.method == "/numprotect.allocation.v1.AllocationService/LockNumber"
        exact = await every(pb.ListAuditEventsRequest(principal=operator_subject))
        assert [e.method.rsplit("/", 1)[1] for e in exact] == ["UnlockNumber", "LockNumber", "ImportBlock"]
        every_operator_key = await every(pb.ListAuditEventsRequest(principal="operator"))
        assert len(every_operator_key) == 4 and {e.role for e in every_operator_key} == {pb.ROLE_OPERATOR}
        locks = await every(pb.ListAuditEventsRequest(method=lock_event.method))
        assert [e.reason for e in locks] == ["later", "no", "complaint"]
        later = await every(pb.ListAuditEventsRequest(start_time=boundary))
        assert [e.reason for e in later] == ["later"]
        earlier = await every(pb.ListAuditEventsRequest(end_time=boundary, method=lock_event.method))
        assert [e.reason for e in earlier] == ["no", "complaint"]
        first = await operator.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1, principal="operator"))
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            operator.ListAuditEvents(pb.ListAuditEventsRequest(page_token=first.next_page_token)),
        )
        assert violated_fields(error) == ["page_token"]

        regulator = admin(svc.channel_as(Role.REGULATOR))
        own = await every(pb.ListAuditEventsRequest(), regulator)
        assert [(e.principal, e.reason) for e in own] == [(regulator_subject, "case 9")]
        await fails(
            grpc.StatusCode.PERMISSION_DENIED,
            regulator.ListAuditEvents(pb.ListAuditEventsRequest(principal="operator")),
        )
        tenant = admin(svc.channel_as(Role.TENANT, "t1"))
        await fails(grpc.StatusCode.PERMISSION_DENIED, tenant.ListAuditEvents(pb.ListAuditEventsRequest()))


async def test_a_page_of_audit_events_scans_a_bounded_number_of_entries(
    allocation_svc: ServiceFactory, redis_env: dict[str, str], audit_events: Any
) -> None:
    async with allocation_svc() as svc:
        await _some_events(svc)
        stored = await audit_events(svc)
    settings = RedisSettings.from_env(Env(redis_env))
    redis, sync_redis = create_redis(settings), create_sync_redis(settings)
    try:
        trail = AuditTrail(redis, sync_redis, None, scan_limit=2)
        only_the_oldest = EventFilter(method="/numprotect.allocation.v1.AllocationService/ImportBlock")
        pages: list[list[str]] = []
        before: str | None = None
        while True:
            found, before = await trail.events(only_the_oldest, 10, before)
            pages.append([i for i, _ in found])
            if before is None:
                break
        # Five entries, two per page: three pages, the match on the last one.
        assert pages == [[], [], [stored[0][0]]]
    finally:
        await redis.aclose()
        sync_redis.close()


async def test_the_audit_chain_verifies_and_an_edited_or_deleted_event_is_found(
    allocation_svc: ServiceFactory, audit_events: Any
) -> None:
    async with allocation_svc() as svc:
        await _some_events(svc)
        operator = admin(svc.channel_as(Role.OPERATOR))
        stored = await audit_events(svc)
        head = svc.redis.get(audit.HEAD_KEY).decode()  # before VerifyAuditChain's own event moves it
        report = await operator.VerifyAuditChain(pb.VerifyAuditChainRequest())
        assert (report.ok, report.events_checked, report.first_bad_event_id, report.head) == (
            True,
            len(stored),
            "",
            head,
        )

        stored = await audit_events(svc)  # VerifyAuditChain is audited too
        target_id = stored[2][0]
        original: dict[bytes, bytes] = dict(svc.redis.xrange(audit.LOG_KEY, min=target_id, max=target_id)[0][1])
        assert b'"outcome":"OK"' in original[b"e"]

        async def rewrite(body: bytes) -> None:
            """What someone with write access to Redis can do: rebuild the stream, same ids, one event's body set."""
            await audit_events(svc)  # nothing queued: the writer appends nothing in between
            rows: Any = svc.redis.xrange(audit.LOG_KEY)
            svc.redis.delete(audit.LOG_KEY)
            for entry_id, fields in rows:
                changed = {**fields, b"e": body} if entry_id.decode() == target_id else fields
                svc.redis.xadd(audit.LOG_KEY, changed, id=entry_id)

        await rewrite(original[b"e"].replace(b'"outcome":"OK"', b'"outcome":"NOT_FOUND"'))
        report = await operator.VerifyAuditChain(pb.VerifyAuditChainRequest())
        assert (report.ok, report.first_bad_event_id, report.events_checked) == (False, target_id, 3)
        assert "edited" in report.problem

        await rewrite(original[b"e"])  # the original again: the chain verifies
        assert (await operator.VerifyAuditChain(pb.VerifyAuditChainRequest())).ok

        await audit_events(svc)
        svc.redis.xdel(audit.LOG_KEY, target_id)
        report = await operator.VerifyAuditChain(pb.VerifyAuditChainRequest())
        assert (report.ok, report.first_bad_event_id) == (False, stored[3][0])  # the event after the gap


async def test_list_audit_events_refuses_times_before_1970_and_outside_timestamps(
    allocation_svc: ServiceFactory,
) -> None:
    """Audit events are ordered by Unix-millisecond stream ids: 0001-01-01 (a valid Timestamp) once reached Redis as
    a negative id and answered INTERNAL."""
    async with allocation_svc() as svc:
        operator = admin(svc.channel_as(Role.OPERATOR))
        for field, stamp in (
            ("start_time", Timestamp(seconds=-62_135_596_800)),
            ("end_time", Timestamp(seconds=-1)),
            ("start_time", Timestamp(seconds=253_402_300_800)),
            ("end_time", Timestamp(seconds=1, nanos=-1)),
        ):
            request = pb.ListAuditEventsRequest()
            getattr(request, field).CopyFrom(stamp)
            error = await fails(grpc.StatusCode.INVALID_ARGUMENT, operator.ListAuditEvents(request))
            assert violated_fields(error) == [field]
        await operator.CreateApiKey(pb.CreateApiKeyRequest(role=pb.ROLE_TENANT, tenant_id="t1"))  # audited
        deadline = time.monotonic() + 5
        while not (everything := await operator.ListAuditEvents(pb.ListAuditEventsRequest())).events:
            assert time.monotonic() < deadline, "the audit event was never written"
            await asyncio.sleep(0.05)  # events are written by a background writer
        epoch = await operator.ListAuditEvents(pb.ListAuditEventsRequest(start_time=Timestamp(seconds=0)))
        assert list(epoch.events) == list(everything.events)
