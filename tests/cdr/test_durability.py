"""Exactly once across restarts: the service process killed between (and during) sends of the same batch, and
Redis killed and restarted from its append-only file: nothing acknowledged is lost, nothing is stored twice."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from cdr.conftest import bucket_of

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core.identity.principal import Role
from numprotect.services.cdr.app import build
from support.inprocess import running_service
from support.processes import ServiceProcess
from support.redis_server import RedisServer
from support.tls import sync_secure_channel


def _ingest(address: str, token: str, records: list[cdr_pb2.CallDetailRecord], timeout: float = 60) -> Any:
    """Sends the batch as a carrier does: again after UNAVAILABLE (a busy machine can make the enrichment's wait
    for a Redis place time out), never after anything else."""
    with sync_secure_channel(address, token) as channel:
        stub = cdr_pb2_grpc.CdrServiceStub(channel)
        for _ in range(10):
            try:
                return stub.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records), timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    raise
                time.sleep(0.5)
        raise AssertionError("still UNAVAILABLE after 10 attempts")


def test_service_restart_between_two_sends_of_the_same_batch(
    redis_env: dict[str, str], make_record: Any, redis_sync: Any, carrier_token: str
) -> None:
    records = [make_record(f"r{i}") for i in range(500)]
    first = ServiceProcess("cdr", redis_env, timeout=60)
    try:
        reply = _ingest(first.address, carrier_token, records)
        assert (reply.accepted, reply.duplicates) == (500, 0)
    finally:
        first.process.kill()  # a crash, not a drain
        first.stop()
    second = ServiceProcess("cdr", redis_env, timeout=60)
    try:
        again = _ingest(second.address, carrier_token, records)
    finally:
        second.stop()
    assert (again.accepted, again.duplicates) == (0, 500)
    assert redis_sync.xlen(bucket_of(redis_sync, "").stream) == 500
    assert redis_sync.zcard(bucket_of(redis_sync, "").time_index) == 500


def test_service_killed_in_the_middle_of_a_batch_then_the_batch_is_resent(
    redis_env: dict[str, str], make_record: Any, redis_sync: Any, carrier_token: str
) -> None:
    records = [make_record(f"k{i}") for i in range(1000)]
    first = ServiceProcess("cdr", redis_env, timeout=60)
    try:
        with first.channel(carrier_token) as channel:
            stub = cdr_pb2_grpc.CdrServiceStub(channel)
            future = stub.IngestCdrs.future(cdr_pb2.IngestCdrsRequest(records=records), timeout=30)
            deadline = time.monotonic() + 20
            while (
                redis_sync.xlen(bucket_of(redis_sync, "").stream) == 0
                and not future.done()
                and time.monotonic() < deadline
            ):
                time.sleep(0.001)
            first.process.kill()  # as soon as part of the batch is stored
            outcome: object = "no answer"
            try:
                outcome = future.result()  # whatever the carrier saw, it retries the whole batch
            except grpc.RpcError as error:
                outcome = error
    finally:
        first.stop()
    stored_before = redis_sync.xlen(bucket_of(redis_sync, "").stream)
    print("stored before the resend:", stored_before)
    assert stored_before > 0, f"nothing stored before the kill; the call ended with: {outcome!r}"
    second = ServiceProcess("cdr", redis_env, timeout=60)
    try:
        again = _ingest(second.address, carrier_token, records)
    finally:
        second.stop()
    assert again.accepted == 1000 - stored_before
    assert again.duplicates == stored_before
    assert redis_sync.xlen(bucket_of(redis_sync, "").stream) == 1000
    unmatched = bucket_of(redis_sync, "")
    ids = [entry[0] for entry in redis_sync.xrange(unmatched.stream)]
    carrier = records[0].carrier_id  # the carrier_token's own: what the service stores
    assert {redis_sync.get(unmatched.dedup(carrier, f"k{i}")) for i in range(1000)} == set(ids)


@pytest.mark.parametrize("fsync", ["always", "everysec"])
async def test_redis_killed_and_restarted_from_its_aof(fsync: str, make_record: Any) -> None:
    """always: nothing acknowledged is lost. everysec: Redis may reply before its AOF write when a background fsync
    is slow (a busy disk), so a kill can lose up to ~2 s of acknowledged records; the carrier's resend then stores
    exactly what was lost, nothing twice."""
    server = RedisServer("--appendfsync", fsync, appendonly=True)
    records = [make_record(f"a{i}") for i in range(300)]
    environ = {"NUMPROTECT_REDIS_URL": server.url, "NUMPROTECT_REDIS_TIMEOUT": "5s"}
    try:
        async with running_service("cdr", build, environ) as svc:
            svc.route(records[0].carrier_id, records[0].called_number)
            stub = cdr_pb2_grpc.CdrServiceStub(svc.channel_as(Role.CARRIER, records[0].carrier_id))
            # Once a reply comes, all 300 are acknowledged (accepted now or by an earlier, failed attempt).
            reply = await _send_until_answered(stub, records)
            assert reply.accepted + reply.duplicates == 300
            server.kill()  # SIGKILL right after the acknowledgement
            server.restart()
            survived = server.client().xlen(bucket_of(server.client(), "").stream)
            if fsync == "always":
                assert survived == 300
            # The first call after the restart may meet a dead pooled connection (UNAVAILABLE): resent.
            again = await _send_until_answered(stub, records)
            assert (again.accepted, again.duplicates) == (300 - survived, survived)
        assert server.client().xlen(bucket_of(server.client(), "").stream) == 300
        assert server.client().zcard(bucket_of(server.client(), "").time_index) == 300
    finally:
        server.stop()


async def _send_until_answered(stub: Any, records: list[cdr_pb2.CallDetailRecord]) -> Any:
    for _ in range(50):
        try:
            return await stub.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records), timeout=60)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.1)
    raise AssertionError("no answer after 50 attempts")
