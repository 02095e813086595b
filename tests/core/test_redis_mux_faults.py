"""The multiplexing Redis client through real faults: a Redis killed and restarted under load, a silent peer, an
AOF load (LOADING), and on a real Redis Cluster a slot migrated (MOVED), a slot being migrated (ASK) and a primary
killed (its replica promoted). Every call answers or fails with an error storage_unavailable makes UNAVAILABLE,
within its timeout; none hangs; the client recovers by itself."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
from redis.exceptions import BusyLoadingError

from numprotect.core.redis_client import LuaScript, as_text, storage_unavailable
from numprotect.core.redis_mux import MuxRedis
from numprotect.core.replica_wait import ReplicaWait
from numprotect.core.settings import Env, RedisSettings
from support.redis_cluster import RedisClusterServers
from support.redis_server import RedisServer, durable_loading_redis
from support.tcp_proxy import LatencyProxy

# Repeat-safe, as every script of the project: a member added twice is there once.
MARK = LuaScript.from_source("mux_mark", "redis.call('SADD', KEYS[1], ARGV[1]) return redis.call('SCARD', KEYS[1])")


def _mux(url: str, timeout: str = "2s", **env: str) -> MuxRedis:
    return MuxRedis(
        RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": url, "NUMPROTECT_REDIS_TIMEOUT": timeout, **env}))
    )


def _unavailable(outcome: Any) -> bool:
    return isinstance(outcome, BaseException) and storage_unavailable(outcome) is not None


async def _timed(call: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        outcome = await call()
    except Exception as exc:
        outcome = exc
    return outcome, time.monotonic() - started


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A Redis of its own with AOF fsync'd on every write (a kill -9 loses nothing acknowledged), loading slowly."""
    server = durable_loading_redis()
    try:
        yield server
    finally:
        server.stop()


async def test_a_restart_under_load_fails_calls_briefly_then_every_call_succeeds(durable_redis: RedisServer) -> None:
    mux = _mux(durable_redis.url, "1s")
    stop = asyncio.Event()
    outcomes: list[tuple[str, Any, float, float]] = []  # member, outcome, started, took

    async def writer(worker: int) -> None:
        n = 0
        while not stop.is_set():
            member = f"{worker}:{n}"
            n += 1
            started = time.monotonic()
            outcome, took = await _timed(lambda m=member: MARK(mux, ["np:test:{restart}"], [m]))  # type: ignore[misc]
            outcomes.append((member, outcome, started, took))
            if isinstance(outcome, BaseException):
                await asyncio.sleep(0.01)

    writers = [asyncio.ensure_future(writer(worker)) for worker in range(16)]
    deadline = time.monotonic() + 10  # load first: 16 calls answered (a loaded host may take more than 0.3 s)
    while sum(not isinstance(o[1], BaseException) for o in outcomes) < 16:
        assert time.monotonic() < deadline, outcomes[:3]
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    await asyncio.to_thread(durable_redis.kill)
    killed_at = time.monotonic()
    await asyncio.sleep(0.2)
    await asyncio.to_thread(durable_redis.restart)  # same port and folder; returns once it answers PING
    back_at = time.monotonic()
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*writers)
    await mux.aclose()

    failed = [o for o in outcomes if isinstance(o[1], BaseException)]
    assert failed, "the kill failed no call"
    assert all(_unavailable(o[1]) for o in failed), {type(o[1]).__name__ for o in failed}
    # None waited past its timeout (1 s) by much: a second wait of it would be 2 s; the rest is a loaded host's lag.
    assert max(took for *_, took in outcomes) < 2.0
    ok_before = [o for o in outcomes if o[2] + o[3] < killed_at and not isinstance(o[1], BaseException)]
    assert len(ok_before) >= 16
    # Once Redis answered again, every call started after that succeeded (no stale connection failed one).
    after = [o for o in outcomes if o[2] > back_at + 0.05]
    assert after and all(not isinstance(o[1], BaseException) for o in after), after[:3]
    # Nothing acknowledged was lost (AOF, fsync always).
    admin = durable_redis.client()
    stored = {as_text(member) for member in admin.smembers("np:test:{restart}")}
    admin.close()
    acknowledged = {member for member, outcome, *_ in outcomes if not isinstance(outcome, BaseException)}
    assert acknowledged <= stored


async def test_a_silent_peer_fails_the_command_within_the_timeout(durable_redis: RedisServer) -> None:
    mux = _mux(durable_redis.url, "1s")
    assert await mux.set("np:test:{silent}", "1") is True
    os.kill(durable_redis.process.pid, signal.SIGSTOP)
    try:
        outcomes = await asyncio.gather(*(_timed(lambda: mux.get("np:test:{silent}")) for _ in range(8)))
    finally:
        os.kill(durable_redis.process.pid, signal.SIGCONT)
    for outcome, took in outcomes:
        assert isinstance(outcome, redis.TimeoutError) and _unavailable(outcome), outcome
        # Its timeout, and a loaded host's lag (a 0.5 s stall was seen at load ~20), below a second timeout's 2 s.
        assert 0.95 < took < 1.8, took
    assert await mux.get("np:test:{silent}") == b"1"  # a new connection, in step
    await mux.aclose()


async def test_a_link_slower_than_the_timeout_fails_every_command_within_it(redis_url: str) -> None:
    """+1 s each way (a round trip twice the 1 s timeout): every command fails with TimeoutError within
    its timeout, the connection is replaced; without the delay commands are answered again."""
    proxy = LatencyProxy("127.0.0.1", urlparse(redis_url).port or 6379)
    mux = _mux(f"redis://{proxy.address}/0", "1s")
    try:
        assert await mux.set("np:test:{slow}", "1") is True
        proxy.delay = 1.0

        async def steady(i: int) -> tuple[Any, float]:
            await asyncio.sleep(i * 0.05)
            return await _timed(lambda: mux.get("np:test:{slow}"))

        outcomes = await asyncio.gather(*(steady(i) for i in range(16)))
        for outcome, took in outcomes:
            assert isinstance(outcome, redis.TimeoutError) and _unavailable(outcome), outcome
            assert took < 1.6, [round(t, 3) for _, t in outcomes]  # 1 s and a busy host's lag; the reply: 2 s
        proxy.delay = 0.0
        assert await mux.get("np:test:{slow}") == b"1"
    finally:
        await mux.aclose()
        proxy.close()


async def test_a_command_queued_past_its_timeout_fails_while_the_peer_still_answers(redis_url: str) -> None:
    """Two scripts of 1 s, written 20 ms apart: Redis answers the first at 1 s; the second, behind it, would be
    answered at 2 s, past its 1.5 s timeout: it fails then with TimeoutError, as with a socket timeout of its own,
    while the connection (which answered 0.5 s before) stays, in step for what follows (on a busy host the second
    script may run long enough for the connection to fall silent and be replaced later: not asserted). Half a second
    on each side: a loaded host's lag is not mistaken for either outcome."""
    slow = "local t = redis.call('TIME') while true do local n = redis.call('TIME') "
    slow += "if (n[1] - t[1]) * 1000000 + n[2] - t[2] > 1000000 then return ARGV[1] end end"
    mux = _mux(redis_url, "1500ms")
    assert await mux.set("np:test:{queued}", "warm") is True
    conn = mux._seed.conns[0]  # the writes' connection (EVAL is a write)

    async def later(index: int) -> tuple[Any, float]:
        await asyncio.sleep(index * 0.02)
        return await _timed(lambda: mux.eval(slow, 1, "np:test:{queued}", index))

    (first, first_took), (second, second_took) = await asyncio.gather(later(0), later(1))
    assert first == b"0" and first_took < 1.5, (first, first_took)
    assert isinstance(second, redis.TimeoutError) and 1.45 < second_took < 1.95, (second, second_took)
    assert mux._seed.conns[0] is conn and conn is not None and not conn.closed
    # Redis answers another client once the second script ended: its reply has gone out, to nobody.
    admin = redis.Redis.from_url(redis_url)
    assert await asyncio.to_thread(admin.ping)
    admin.close()
    assert await mux.eval("return ARGV[1]", 1, "np:test:{queued}", "after") == b"after"
    await mux.aclose()


async def test_reads_go_on_while_redis_holds_writes_back(redis_url: str) -> None:
    """CLIENT PAUSE WRITE (what a failover does for a moment): a write waits and fails at its timeout; reads sent
    meanwhile are answered at once (they have a connection of their own, not behind the held write); writes go on
    once the pause ends."""
    mux = _mux(redis_url, "500ms")
    assert await mux.set("np:test:{paused}", "1") is True and await mux.get("np:test:{paused}") == b"1"
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("CLIENT", "PAUSE", 800, "WRITE")
    try:
        writing = asyncio.ensure_future(_timed(lambda: mux.set("np:test:{paused}", "2")))
        await asyncio.sleep(0.05)
        reads = await asyncio.gather(*(_timed(lambda: mux.get("np:test:{paused}")) for _ in range(8)))
        assert all(reply == b"1" and took < 0.2 for reply, took in reads), reads
        written, took = await writing
        assert isinstance(written, redis.TimeoutError) and 0.4 < took < 0.8, (written, took)
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    assert await mux.set("np:test:{paused}", "3") is True
    await mux.aclose()


async def test_loading_is_retried_within_the_timeout_then_unavailable(durable_redis: RedisServer) -> None:
    admin = durable_redis.client()
    admin.execute_command("DEBUG", "POPULATE", "6000", "np:filler")
    admin.bgrewriteaof()
    while admin.info("persistence")["aof_rewrite_in_progress"]:  # noqa: ASYNC110 (Redis's state, no event)
        await asyncio.sleep(0.02)
    admin.close()
    short, long = _mux(durable_redis.url, "300ms"), _mux(durable_redis.url, "30s")
    assert await short.incr("np:test:{loading}") == 1 and await long.ping()
    durable_redis.kill()
    durable_redis.process = durable_redis._spawn()  # started again, not waited for: it loads its AOF
    deadline = time.monotonic() + 10
    while True:
        outcome, took = await _timed(lambda: short.get("np:test:{loading}"))
        if isinstance(outcome, BusyLoadingError):
            break
        assert time.monotonic() < deadline, f"no LOADING seen: {outcome!r}"
        await asyncio.sleep(0.01)
    assert _unavailable(outcome) and took >= 0.25  # retried after short pauses for its whole timeout first
    assert await long.incr("np:test:{loading}") == 2  # a timeout longer than the load: answered
    await short.aclose()
    await long.aclose()


# --- Redis Cluster -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    """3 masters with a replica each, the replicas' first sync done (else a replica refuses to fail over)."""
    servers = RedisClusterServers(masters=3, replicas=1)
    try:
        deadline = time.monotonic() + 30
        while not all(
            info["role"] == "master" or info["master_link_status"] == "up"
            for info in (node.client().info("replication") for node in servers.nodes)
        ):
            assert time.monotonic() < deadline, "the replicas did not sync"
            time.sleep(0.1)
        yield servers
    finally:
        servers.stop()


def _node_id(node: RedisServer) -> Any:
    return node.client().execute_command("CLUSTER", "MYID")


def _masters(cluster: RedisClusterServers) -> list[RedisServer]:
    alive = [n for n in cluster.nodes if n.process.poll() is None]
    return [n for n in alive if n.client().info("replication")["role"] == "master"]


def _start_moving(cluster: RedisClusterServers, key: str) -> tuple[int, RedisServer, RedisServer]:
    """Slot of `key` marked IMPORTING on another master and MIGRATING on its own: (slot, source, target)."""
    slot = int(cluster.client().keyslot(key))
    source = cluster.master_of(key)
    target = next(n for n in _masters(cluster) if n.port != source.port)
    target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", _node_id(source))
    source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", _node_id(target))
    return slot, source, target


def _finish_moving(cluster: RedisClusterServers, slot: int, source: RedisServer, target: RedisServer) -> None:
    admin = source.client()
    while keys := admin.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        admin.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    owner = _node_id(target)
    for node in (target, source, *_masters(cluster)):
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)


async def test_moved_after_a_slot_migration_follows_the_slot(cluster: RedisClusterServers) -> None:
    cluster.flushall()
    mux = _mux(cluster.url, NUMPROTECT_REDIS_MODE="cluster")
    key = "np:test:{moved}"
    assert await MARK(mux, [key], ["a"]) == 1  # the slot map is loaded, the slot's owner known
    slot, source, target = _start_moving(cluster, key)
    _finish_moving(cluster, slot, source, target)
    assert await MARK(mux, [key], ["b"]) == 2  # MOVED: sent to the new owner
    assert await mux.scard(key) == 2
    await asyncio.sleep(0.1)  # the map reloaded in the background: no more MOVED
    moved_before = target.client().info("stats").get("total_commands_processed")
    assert await mux.sadd(key, "c") == 1
    assert target.client().info("stats")["total_commands_processed"] > moved_before
    await mux.aclose()


async def test_ask_during_a_migration_goes_to_the_importing_node(cluster: RedisClusterServers) -> None:
    cluster.flushall()
    mux = _mux(cluster.url, NUMPROTECT_REDIS_MODE="cluster")
    key = "np:test:{ask}"
    assert await mux.ping()  # the slot map is loaded
    slot, source, target = _start_moving(cluster, key)
    try:
        # The key is not on the source: ASK, then ASKING and the command on the target.
        assert await MARK(mux, [key], ["a"]) == 1
        async with mux.pipeline(transaction=False) as pipe:
            pipe.sadd(key, "b")
            pipe.scard(key)
            assert await pipe.execute() == [1, 2]
        assert source.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    finally:
        _finish_moving(cluster, slot, source, target)
    assert await mux.scard(key) == 2
    await mux.aclose()


async def test_waiting_for_replicas_on_a_cluster_covers_each_master_written(cluster: RedisClusterServers) -> None:
    """ReplicaWait over the multiplexing client in cluster mode: one marker and WAIT per master whose keys were
    written, each on a connection of that master; every master's replica acknowledges."""
    cluster.flushall()
    env = {"NUMPROTECT_REDIS_MODE": "cluster", "NUMPROTECT_REDIS_WAIT_REPLICAS": "1"}
    mux = _mux(cluster.url, **env)
    settings = RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": cluster.url, **env}))
    keys = [f"np:test:{{w{i}}}" for i in range(12)]  # spread over the three masters
    assert len({cluster.master_of(key).port for key in keys}) == 3
    for key in keys:
        await mux.set(key, "1")
    await ReplicaWait.of(mux, settings).after(keys)  # raises Unavailable when a master's replica does not confirm
    admin = cluster.client()
    markers = [f"np:wait:{{w{i}}}" for i in range(12)]  # one per hash tag written, each on its keys' master
    assert [admin.exists(marker) for marker in markers] == [1] * 12
    admin.close()
    await mux.aclose()


async def test_a_killed_primary_is_unavailable_until_its_replica_takes_over(cluster: RedisClusterServers) -> None:
    """The last of the module: the cluster loses a master. Calls to its slot fail fast (ConnectionError: the
    node refuses, the map still names it) or with CLUSTERDOWN while the cluster notices; once the replica is
    promoted, the client's reloaded map sends them there. No call outlives its timeout by much."""
    cluster.flushall()
    mux = _mux(cluster.url, "1s", NUMPROTECT_REDIS_MODE="cluster")
    key = "np:test:{victim}"
    victim = cluster.master_of(key)
    assert await MARK(mux, [key], ["before"]) == 1
    stop = asyncio.Event()
    outcomes: list[tuple[float, Any, float]] = []

    async def caller(worker: int) -> None:
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            outcome, took = await _timed(lambda m=f"{worker}:{n}": MARK(mux, [key], [m]))  # type: ignore[misc]
            outcomes.append((started, outcome, took))
            n += 1
            await asyncio.sleep(0.01)

    callers = [asyncio.ensure_future(caller(worker)) for worker in range(4)]
    await asyncio.sleep(0.2)
    await asyncio.to_thread(victim.kill)
    killed_at = time.monotonic()
    recovered_at = None
    while time.monotonic() < killed_at + 20:
        await asyncio.sleep(0.1)
        recent = [o for o in outcomes if o[0] > killed_at][-8:]
        if len(recent) == 8 and all(not isinstance(o[1], BaseException) for o in recent):
            recovered_at = time.monotonic()
            break
    stop.set()
    await asyncio.gather(*callers)
    await mux.aclose()
    after_kill = [o for o in outcomes if o[0] > killed_at]
    failed = [o for o in after_kill if isinstance(o[1], BaseException)]
    assert recovered_at is not None, sorted({repr(o[1]) for o in failed})[:5]
    assert failed, "the kill failed no call"
    assert all(_unavailable(o[1]) for o in failed), sorted({repr(o[1]) for o in failed})[:5]
    assert max(took for *_, took in after_kill) < 2.5
    assert cluster.master_of(key).port != victim.port  # the replica owns the slot now
