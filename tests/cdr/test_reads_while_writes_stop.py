"""ListCdrs reads through a script (lua/list_page.lua, declared `#!lua flags=no-writes`): it answers while Redis
refuses writes after a failed save (MISCONF) and while writes are paused (CLIENT PAUSE WRITE, as in a failover),
where a script without the flag would wait (until the deadline: DEADLINE_EXCEEDED); the first listing loads the
script under MISCONF (SCRIPT LOAD is served)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from numprotect.cdr.v1 import cdr_pb2
from support.redis_server import RedisServer, fail_a_save, saving_redis, take_writes_again
from support.rpc import fails


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "redis-data"
    path.mkdir()
    return path


@pytest.fixture
def own_redis(data_dir: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, with a save point (a failed background save then stops writes: MISCONF)."""
    server = saving_redis(data_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_env(own_redis: RedisServer) -> dict[str, str]:
    return {"NUMPROTECT_REDIS_URL": own_redis.url, "NUMPROTECT_REDIS_MODE": "standalone"}


async def _listed(reader: Any) -> list[str]:
    reply = await reader.ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="t1", page_size=50), timeout=2)
    return sorted(record.call_id for record in reply.records)


async def test_list_cdrs_answers_under_misconf_and_client_pause_write(
    cdr_service: Any, make_record: Any, make_binding: Any, own_redis: RedisServer, data_dir: Path
) -> None:
    await make_binding("b1", tenant_id="t1", out_order_id="o1")
    records = [make_record(f"c{i}", binding_id="b1") for i in range(3)]
    admin = own_redis.client()
    async with cdr_service() as cdr:
        assert (await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))).accepted == 3
        reader = cdr.tenant("t1")  # its key is written now, while Redis takes writes
        fail_a_save(admin, data_dir)  # MISCONF for real (the service runs meanwhile)
        await fails(
            grpc.StatusCode.UNAVAILABLE,
            cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[make_record("c9", binding_id="b1")])),
        )
        assert await _listed(reader) == ["c0", "c1", "c2"]  # the first listing: NOSCRIPT, SCRIPT LOAD, EVALSHA
        take_writes_again(admin)

        # The script is loaded now (an EVALSHA of a script Redis does not know waits out the pause: its flags are
        # unknown until it is loaded).
        admin.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
        try:
            assert await _listed(reader) == ["c0", "c1", "c2"]
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
            admin.close()
