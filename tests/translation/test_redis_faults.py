"""The hot path's own Redis client through Redis faults: a restart (stale pooled connections), an AOF load
(LOADING), a replica (READONLY, MASTERDOWN), a slot being migrated (ASK, TRYAGAIN). Every call answers or is
UNAVAILABLE within its deadline; never a raw Redis error (INTERNAL)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from numprotect.core.errors import Unavailable
from numprotect.core.redis_client import LuaScript
from numprotect.core.routes import MODE_AXN
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.translation.fastredis import ScriptClient
from numprotect.translation.v1 import translation_pb2 as pb
from support.redis_cluster import RedisClusterServers
from support.redis_server import RedisServer, free_port

CALLER = "13700000003"
# Redis slows its data load down by this much per key (a debug setting): with POPULATED_KEYS the LOADING window
# after a restart lasts about a second or more, as a real data set of several GB does.
KEY_LOAD_DELAY_US = "100"
POPULATED_KEYS = 6000


@pytest.fixture
def counter(tmp_path: Path) -> LuaScript:
    path = tmp_path / "lua" / "counter.lua"
    path.parent.mkdir()
    path.write_text("return redis.call('INCR', KEYS[1])\n")
    return LuaScript(path)


def _client(url: str, script: LuaScript, **env: str) -> ScriptClient:
    return ScriptClient(RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": url, **env})), script)


def _respawn(server: RedisServer) -> None:
    """Starts the killed server again on its port and folder without waiting for it (it may be LOADING)."""
    server.process = server._spawn()


# --- a restart: stale pooled connections -------------------------------------------------------------------


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A standalone Redis of its own with AOF fsync'd on every write, so a kill -9 loses nothing."""
    server = RedisServer(
        "--appendfsync",
        "always",
        "--enable-debug-command",
        "yes",
        "--key-load-delay",
        KEY_LOAD_DELAY_US,
        "--loading-process-events-interval-bytes",
        "1024",
        appendonly=True,
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_env(durable_redis: RedisServer) -> dict[str, str]:
    """The translation fixtures (conftest) run on this module's own Redis, which the tests restart."""
    return {"NUMPROTECT_REDIS_URL": durable_redis.url, "NUMPROTECT_REDIS_MODE": "standalone"}


def test_after_a_restart_no_pooled_connection_fails_a_call(durable_redis: RedisServer, counter: LuaScript) -> None:
    """Every handler thread holds a connection; Redis is killed and started again on the same port: once it
    answers PING, every call succeeds (each stale connection is replaced on its first use, the call sent again)."""
    client = _client(durable_redis.url, counter)
    threads = 8
    barrier = threading.Barrier(threads)

    def calls(worker: int, combined: bool) -> list[str]:
        barrier.wait()  # all threads at once: each has (or gets) its own connection
        outcomes = []
        for n in range(20):
            try:
                if combined:
                    client.evalsha_combined([f"np:test:{{{worker}}}"], [], 2.0)
                else:
                    client.evalsha([f"np:test:{{{worker}}}"], [], 2.0)
                outcomes.append("ok")
            except Exception as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
            if n % 5 == 0:
                time.sleep(0.001)
        return outcomes

    with futures.ThreadPoolExecutor(threads) as pool:
        for combined in (False, True):
            warm = [o for result in pool.map(calls, range(threads), [combined] * threads) for o in result]
            assert warm == ["ok"] * threads * 20
            durable_redis.kill()
            durable_redis.restart()  # same port and folder; returns once it answers PING
            after = [o for result in pool.map(calls, range(threads), [combined] * threads) for o in result]
            assert after == ["ok"] * threads * 20, sorted(set(after))
    # Nothing was lost (AOF, fsync always) and no call ran twice: 4 rounds of 20 per key.
    admin = durable_redis.client()
    assert [admin.get(f"np:test:{{{w}}}") for w in range(threads)] == [b"80"] * threads
    admin.close()
    client.close()


async def test_translate_after_a_restart_succeeds_on_every_call(tr: Any, durable_redis: RedisServer) -> None:
    """The service: unary Translate from many concurrent callers and a TranslateStream, before and after a kill -9
    and restart of Redis; after it answers PING again, no call fails."""
    await tr.put(tr.route("n1", MODE_AXN))

    async def burst() -> list[str]:
        calls = [tr.translate(f"1370000{i:04d}", deadline=2.0) for i in range(48)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return [pb.Decision.Name(r.decision) if isinstance(r, pb.TranslateResponse) else repr(r) for r in results]

    async def stream() -> list[str]:
        requests = [
            pb.TranslateStreamRequest(
                request=pb.TranslateRequest(call_id=f"s{i}", calling_number=CALLER, called_number="700100000000001")
            )
            for i in range(100)
        ]
        return [m.error or pb.Decision.Name(m.response.decision) async for m in tr.stub.TranslateStream(iter(requests))]

    assert set(await burst()) == {"DECISION_CONNECT"}
    assert set(await stream()) == {"DECISION_CONNECT"}
    await asyncio.to_thread(durable_redis.kill)
    await asyncio.to_thread(durable_redis.restart)
    assert set(await burst()) == {"DECISION_CONNECT"}
    assert set(await stream()) == {"DECISION_CONNECT"}


# --- LOADING after a restart ---------------------------------------------------------------------------------


async def test_translate_while_redis_loads_its_aof_is_unavailable_then_answers(
    tr: Any, durable_redis: RedisServer
) -> None:
    """kill -9, start again: while Redis loads its AOF (LOADING) Translate answers UNAVAILABLE within its deadline,
    never INTERNAL, and answers as soon as the data set is loaded."""
    await tr.put(tr.route("n1", MODE_AXN))
    admin = durable_redis.client()
    admin.execute_command("DEBUG", "POPULATE", str(POPULATED_KEYS), "np:filler")
    admin.bgrewriteaof()  # the AOF's base becomes an RDB, whose load is slowed per key
    while admin.info("persistence")["aof_rewrite_in_progress"]:  # noqa: ASYNC110 (Redis's state, no event)
        await asyncio.sleep(0.02)
    admin.close()
    assert (await tr.translate(CALLER)).decision == pb.DECISION_CONNECT

    await asyncio.to_thread(durable_redis.kill)
    _respawn(durable_redis)
    seen: list[tuple[float, grpc.StatusCode, str]] = []
    reasons: dict[str, set[str]] = {}  # the ErrorInfo reasons of the UNAVAILABLE answers, by the message's cause
    started = time.monotonic()
    while time.monotonic() - started < 60:
        call_started = time.monotonic()
        code, message = grpc.StatusCode.OK, ""
        try:
            await tr.translate(CALLER, deadline=1.0)
        except grpc.aio.AioRpcError as error:
            code, message = error.code(), error.details() or ""
            reasons.setdefault("LOADING" if "LOADING" in message else "other", set()).add(_reason(error))
        elapsed = time.monotonic() - call_started
        seen.append((elapsed, code, message))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), seen[-1]
        assert elapsed < 1.0, seen[-1]
        if code == grpc.StatusCode.OK:
            break
        await asyncio.sleep(0.01)
    assert seen[-1][1] == grpc.StatusCode.OK, seen[-3:]
    loading = [s for s in seen if "LOADING" in s[2]]
    assert loading, f"the load was never caught: {seen}"
    assert reasons["LOADING"] == {"REDIS_LOADING"}, reasons  # google.rpc.ErrorInfo, with a RetryInfo (_reason)
    # From then on it answers.
    for i in range(20):
        assert (await tr.translate(f"1370000{i:04d}")).decision == pb.DECISION_CONNECT


def _reason(error: grpc.aio.AioRpcError) -> str:
    """The google.rpc.ErrorInfo reason of an answer that also carries a google.rpc.RetryInfo."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error.details()
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details) and retry.retry_delay.ToNanoseconds() > 0, status
    assert any(d.Unpack(info) for d in status.details), status
    return str(info.reason)


def test_script_client_retries_loading_within_its_budget(durable_redis: RedisServer, counter: LuaScript) -> None:
    """The client itself: a call that starts while Redis loads and whose budget outlasts the load succeeds
    (retried after short pauses); one with a short budget is Unavailable naming LOADING."""
    admin = durable_redis.client()
    admin.execute_command("DEBUG", "POPULATE", str(POPULATED_KEYS), "np:filler")
    admin.bgrewriteaof()
    while admin.info("persistence")["aof_rewrite_in_progress"]:
        time.sleep(0.02)
    admin.close()
    client = _client(durable_redis.url, counter)
    assert client.evalsha(["np:test:{loading}"], [], 2.0) == 1
    durable_redis.kill()
    _respawn(durable_redis)
    probe = socket_reply(durable_redis.port)
    deadline = time.monotonic() + 10
    while not probe().startswith(b"-LOADING") and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Unavailable, match="LOADING"):
        client.evalsha(["np:test:{loading}"], [], 0.3)
    assert client.evalsha(["np:test:{loading}"], [], 30.0) == 2
    client.close()


def socket_reply(port: int) -> Any:
    """A function that sends PING on a new connection and returns the first bytes of the reply (b"" if none)."""
    import socket

    def ping() -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64)
        except OSError:
            return b""

    return ping


# --- a replica: READONLY, MASTERDOWN ---------------------------------------------------------------------------


@pytest.fixture
def replica_of_nothing() -> Iterator[RedisServer]:
    """A replica whose master is not there, configured not to serve stale data: MASTERDOWN for every command."""
    server = RedisServer()
    try:
        admin = server.client()
        admin.config_set("replica-serve-stale-data", "no")
        admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        admin.close()
        yield server
    finally:
        server.stop()


def test_a_replica_is_unavailable_until_promoted(replica_of_nothing: RedisServer, counter: LuaScript) -> None:
    client = _client(replica_of_nothing.url, counter)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="MASTERDOWN"):
        client.evalsha(["np:test:{replica}"], [], 0.2)
    assert time.monotonic() - started < 0.5
    admin = replica_of_nothing.client()
    admin.config_set("replica-serve-stale-data", "yes")  # now it serves reads and refuses writes: READONLY
    with pytest.raises(Unavailable, match="READONLY"):
        client.evalsha(["np:test:{replica}"], [], 0.2)
    (streamed,) = client.evalsha_many([(["np:test:{replica}"], [])], 0.2)
    assert isinstance(streamed, Unavailable) and "READONLY" in streamed.message
    # Promoted while a call waits: the call succeeds.
    timer = threading.Timer(0.2, lambda: admin.execute_command("REPLICAOF", "NO", "ONE"))
    timer.start()
    assert client.evalsha(["np:test:{replica}"], [], 5.0) == 1
    timer.join()
    admin.close()
    client.close()


# --- a slot being migrated: ASK, TRYAGAIN ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(masters=3, replicas=0)
    try:
        yield servers
    finally:
        servers.stop()


class Migration:
    """Slot `slot` of `key` being moved from `source` to `target` (CLUSTER SETSLOT MIGRATING / IMPORTING)."""

    def __init__(self, cluster: RedisClusterServers, key: str) -> None:
        self.slot = int(cluster.client().keyslot(key))
        self.source = cluster.master_of(key)
        self.target = next(n for n in cluster.nodes if n.port != self.source.port)
        self.source_id = self.source.client().execute_command("CLUSTER", "MYID")
        self.target_id = self.target.client().execute_command("CLUSTER", "MYID")
        self.target.client().execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source_id)
        self.source.client().execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target_id)
        self.nodes = cluster.nodes

    def finish(self) -> None:
        """Moves the slot's keys left on the source, then gives the slot to the target everywhere."""
        source = self.source.client()
        while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100):
            source.execute_command("MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000, "KEYS", *keys)
        for node in (self.target, self.source, *self.nodes):
            node.client().execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)


def test_ask_is_followed_to_the_importing_node(small_cluster: RedisClusterServers, counter: LuaScript) -> None:
    small_cluster.flushall()
    client = _client(small_cluster.url, counter, NUMPROTECT_REDIS_MODE="cluster")
    key = "np:test:{ask}"
    assert client.evalsha(["np:test:{elsewhere}"], [], 2.0) == 1  # the slot map is loaded
    migration = Migration(small_cluster, key)
    try:
        # The key is not on the source: ASK to the target, which runs it after ASKING; the map is unchanged.
        assert client.evalsha([key], [], 2.0) == 1
        assert client.evalsha_many([([key], [])], 2.0) == [2]
        with migration.target.client().pipeline(transaction=False) as pipe:  # one connection: ASKING, then GET
            assert pipe.execute_command("ASKING").get(key).execute() == [True, b"2"]
        assert migration.source.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", migration.slot) == 0
    finally:
        migration.finish()
    assert client.evalsha([key], [], 2.0) == 3  # MOVED now: the map follows
    client.close()


def test_tryagain_is_retried_until_the_migration_ends(small_cluster: RedisClusterServers, tmp_path: Path) -> None:
    """A call on two keys of a migrating slot, one still on the source and one already moved, gets TRYAGAIN: it is
    sent again after short pauses, Unavailable when its budget ends first, the answer once the slot has moved."""
    small_cluster.flushall()
    path = tmp_path / "lua" / "two.lua"
    path.parent.mkdir()
    path.write_text("return redis.call('INCR', KEYS[1]) + redis.call('INCR', KEYS[2])\n")
    client = _client(small_cluster.url, LuaScript(path), NUMPROTECT_REDIS_MODE="cluster")
    keys = ["np:test:{try}:a", "np:test:{try}:b"]
    assert client.evalsha(keys, [], 2.0) == 2
    migration = Migration(small_cluster, keys[0])
    try:
        source = migration.source.client()
        source.execute_command("MIGRATE", "127.0.0.1", migration.target.port, keys[1], 0, 5000)
        started = time.monotonic()
        with pytest.raises(Unavailable, match="TRYAGAIN"):
            client.evalsha(keys, [], 0.2)
        assert 0.15 < time.monotonic() - started < 0.5
        timer = threading.Timer(0.2, migration.finish)
        timer.start()
        assert client.evalsha(keys, [], 5.0) == 4
        timer.join()
    finally:
        migration.finish()
    client.close()
