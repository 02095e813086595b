"""The multiplexing Redis client (numprotect.core.redis_mux) against redis-py on the same real Redis.

Every command binding, allocation and the shared libraries send through their asyncio client answers the same
Python values (and types) and raises the same exception classes through both clients; pipelines (plain and
MULTI/EXEC) too. Concurrent commands share one write (counted by the client, and by Redis's own read events);
NOSCRIPT loads the script; commands that cannot share a connection are refused by name, blocking ones run on a
connection of their own without holding the others up; TLS with an ACL user. Each comparison runs on a standalone
Redis and on a Redis Cluster (against redis-py's cluster client there).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvloop
from redis.exceptions import NoPermissionError, NoScriptError

from numprotect.core.redis_acl import ACL_USERS, ADMIN_USER, render_acl_file
from numprotect.core.redis_client import LuaScript, RedisClient, create_redis, redis_is_up, storage_unavailable
from numprotect.core.redis_mux import MuxRedis, NotMultiplexed, _Batch, _Connection, _Lost
from numprotect.core.replica_wait import ReplicaWait
from numprotect.core.settings import Env, RedisSettings, SettingsError
from support.redis_cluster import RedisClusterServers
from support.redis_server import RedisServer, ServerTls

Step = Callable[[RedisClient], Awaitable[Any]]

ECHO = LuaScript.from_source("mux_echo", "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}")
# Lua values of every RESP2 kind: integer, bulk, nil (false), nested table, status and error replies in a table.
KINDS = LuaScript.from_source(
    "mux_kinds",
    "return {1, 'two', false, {3, {'four'}}, redis.status_reply('FIVE'), redis.error_reply('SIX six')}",
)
FAILING = LuaScript.from_source("mux_failing", "return redis.call('INCR', KEYS[1])")


def _settings(env: dict[str, str], **extra: str) -> RedisSettings:
    return RedisSettings.from_env(Env({**env, **extra}))


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(masters=3, replicas=0)
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(params=["standalone", "cluster"])
def redis_target(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[tuple[dict[str, str], Any]]:
    """A standalone Redis and a Redis Cluster, emptied: the environment of the clients and a blocking admin client."""
    admin: Any
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("small_cluster")
        env = {"NUMPROTECT_REDIS_URL": cluster.url, "NUMPROTECT_REDIS_MODE": "cluster"}
        admin = redis.RedisCluster.from_url(cluster.url)
    else:
        env = {"NUMPROTECT_REDIS_URL": redis_server.url}
        admin = redis_server.client()
    _flush(admin)
    yield env, admin
    admin.close()


@pytest.fixture
async def clients(redis_target: tuple[dict[str, str], Any]) -> AsyncIterator[tuple[RedisClient, MuxRedis]]:
    """redis-py's client as the services had it, and the multiplexing one, on the same Redis."""
    settings = _settings(redis_target[0])
    reference = create_redis(settings)
    mux = create_redis(settings, write_path=True)
    assert isinstance(mux, MuxRedis)
    yield reference, mux
    await reference.aclose()
    await mux.aclose()


def _same(left: Any, right: Any, path: str = "reply") -> None:
    """Equal values of the same types, all the way down (an exception: same class and message)."""
    if isinstance(left, BaseException):
        assert type(left) is type(right) and str(left) == str(right), f"{path}: {left!r} != {right!r}"
        return
    assert type(left) is type(right), f"{path}: {type(left).__name__} != {type(right).__name__} ({left!r}, {right!r})"
    if isinstance(left, dict):
        assert left.keys() == right.keys(), path
        for key in left:
            _same(left[key], right[key], f"{path}[{key!r}]")
    elif isinstance(left, list | tuple):
        assert len(left) == len(right), f"{path}: {left!r} != {right!r}"
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            _same(a, b, f"{path}[{index}]")
    else:
        assert left == right, f"{path}: {left!r} != {right!r}"


K = "np:test:{mux}"  # every key in one slot: the cases run unchanged on a cluster


async def _pipelined(client: RedisClient, transaction: bool) -> list[Any]:
    async with client.pipeline(transaction=transaction) as pipe:
        pipe.hset(f"{K}:h", "f", "v")
        pipe.hgetall(f"{K}:h")
        pipe.zadd(f"{K}:z", {"m": 1.5})
        pipe.zrangebyscore(f"{K}:z", "-inf", "+inf", withscores=True)
        pipe.get(f"{K}:missing")
        pipe.incr(f"{K}:n")
        return list(await pipe.execute())


async def _pipeline_errors(client: RedisClient) -> list[Any]:
    await client.set(f"{K}:s", "text")
    async with client.pipeline(transaction=False) as pipe:
        pipe.incr(f"{K}:s")  # WRONGTYPE... not an integer: an error in its place
        pipe.get(f"{K}:s")
        return list(await pipe.execute(raise_on_error=False))


async def _raised(step: Step, client: RedisClient) -> Any:
    try:
        return await step(client)
    except redis.RedisError as exc:
        return exc


# Every command the write path and the libraries send (grep of binding, allocation, libs), with options as used.
CASES: dict[str, list[Step]] = {
    "ping": [lambda c: c.ping()],
    "set get": [lambda c: c.set(f"{K}:a", "1"), lambda c: c.get(f"{K}:a"), lambda c: c.get(f"{K}:none")],
    "set nx px get": [
        lambda c: c.set(f"{K}:lock", "t1", nx=True, px=5000, get=True),
        lambda c: c.set(f"{K}:lock", "t2", nx=True, px=5000, get=True),
    ],
    "set px, pexpireat gt, ttl": [
        lambda c: c.set(f"{K}:e", "v", px=60_000),
        lambda c: c.pexpireat(f"{K}:e", 4_102_444_800_000, gt=True),
        lambda c: c.pexpireat(f"{K}:e", 1_000, gt=True),
        lambda c: c.exists(f"{K}:e"),
    ],
    "delete": [lambda c: c.set(f"{K}:d", "v"), lambda c: c.delete(f"{K}:d"), lambda c: c.delete(f"{K}:d")],
    "zadd zrem zrangebyscore": [
        lambda c: c.zadd(f"{K}:z", {"a": 1, "b": 2, "c": 3.5}),
        lambda c: c.zadd(f"{K}:z", {"a": 0}),
        lambda c: c.zrangebyscore(f"{K}:z", "-inf", "(3", start=0, num=10),
        lambda c: c.zrangebyscore(f"{K}:z", "-inf", "+inf", withscores=True),
        lambda c: c.zscore(f"{K}:z", "c"),
        lambda c: c.zmscore(f"{K}:z", ["a", "x"]),
        lambda c: c.zrem(f"{K}:z", "b"),
        lambda c: c.zcard(f"{K}:z"),
    ],
    "zrange bylex, zremrangebylex": [
        lambda c: c.zadd(f"{K}:lex", {"b1": 0, "b2": 0, "c1": 0}),
        lambda c: c.zrange(f"{K}:lex", "(b1", "+", bylex=True, offset=0, num=5),
        lambda c: c.zremrangebylex(f"{K}:lex", "-", "(c"),
        lambda c: c.zrange(f"{K}:lex", 0, -1),
    ],
    "hashes": [
        lambda c: c.hset(f"{K}:h", "rq", "x"),
        lambda c: c.hset(f"{K}:h", mapping={"a": "1", "b": 2}),
        lambda c: c.hget(f"{K}:h", "rq"),
        lambda c: c.hset(f"{K}:h", "名字", "值 ✓"),  # text beyond ASCII: encoded per argument
        lambda c: c.hget(f"{K}:h", "名字"),
        lambda c: c.hget(f"{K}:h", "none"),
        lambda c: c.hmget(f"{K}:h", ["a", "b", "none"]),
        lambda c: c.hgetall(f"{K}:h"),
        lambda c: c.hgetall(f"{K}:none"),
        lambda c: c.hscan(f"{K}:h", 0, count=10),
    ],
    "sets": [
        lambda c: c.sadd(f"{K}:s", "x", "y"),
        lambda c: c.smembers(f"{K}:s"),
        lambda c: c.smismember(f"{K}:s", ["x", "q"]),
        lambda c: c.sscan(f"{K}:s", 0, count=10),
    ],
    "streams": [
        lambda c: c.xadd(f"{K}:x", {"e": "1"}, id="1-1"),
        lambda c: c.xadd(f"{K}:x", {"e": "2"}, id="2-1"),
        lambda c: c.xrange(f"{K}:x", min="-", count=10),
        lambda c: c.xrevrange(f"{K}:x", max="+", min="-", count=1),
        lambda c: c.xlen(f"{K}:x"),
    ],
    "incr": [lambda c: c.incr(f"{K}:n"), lambda c: c.incr(f"{K}:n", 5)],
    "scripts": [
        ECHO.load,
        lambda c: ECHO(c, [f"{K}:k"], ["v", 41]),
        lambda c: KINDS(c, [f"{K}:k"]),
        lambda c: c.script_exists(ECHO.sha),
        lambda c: c.script_load("return 1"),
        lambda c: c.evalsha("0" * 40, 1, f"{K}:k"),
    ],
    "error replies": [
        lambda c: c.set(f"{K}:t", "text"),
        lambda c: c.incr(f"{K}:t"),
        lambda c: c.hget(f"{K}:t", "f"),
        lambda c: FAILING(c, [f"{K}:t"]),
        lambda c: c.execute_command("HSET", f"{K}:k", "field"),  # wrong number of arguments
    ],
    "execute_command": [
        lambda c: c.execute_command("SET", f"{K}:raw", b"\x00\xff bytes"),
        lambda c: c.execute_command("GET", f"{K}:raw"),
        lambda c: c.execute_command("ZADD", f"{K}:rz", 1.25, "m"),
        lambda c: c.execute_command("ZSCORE", f"{K}:rz", "m"),
    ],
    "blocking commands, answered at once": [
        lambda c: c.rpush(f"{K}:q", "a"),
        lambda c: c.blpop([f"{K}:q"], timeout=1),
        lambda c: c.xadd(f"{K}:x", {"e": "1"}, id="1-1"),
        lambda c: c.xread({f"{K}:x": "0"}, count=5, block=10),
    ],
    "pipeline": [lambda c: _pipelined(c, False)],
    "transaction": [lambda c: _pipelined(c, True)],
    "pipeline errors in place": [_pipeline_errors],
}


@pytest.mark.parametrize("case", list(CASES))
async def test_replies_and_errors_are_redis_py_s(
    case: str, clients: tuple[RedisClient, MuxRedis], redis_target: tuple[dict[str, str], Any]
) -> None:
    reference, mux = clients
    outcomes = []
    for client in (reference, mux):
        _flush(redis_target[1])
        outcomes.append([await _raised(step, client) for step in CASES[case]])
    _same(outcomes[0], outcomes[1])


def _flush(admin: Any) -> None:
    if isinstance(admin, redis.RedisCluster):
        admin.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    else:
        admin.flushall()
    admin.script_flush()  # on a cluster, every primary


async def test_info_time_and_health_probe_answer_like_redis_py(clients: tuple[RedisClient, MuxRedis]) -> None:
    reference, mux = clients
    ours, theirs = await mux.info(), await reference.info()
    assert type(ours) is type(theirs) is dict and ours["redis_version"] == theirs["redis_version"]
    seconds, micros = await mux.time()
    assert abs(seconds + micros / 1e6 - time.time()) < 5
    assert await redis_is_up(mux) is True


async def test_concurrent_commands_share_one_write(redis_url: str) -> None:
    """64 coroutines' commands in one loop pass: one write by the client, one or two reads by Redis; each gets its
    own reply. redis-py makes a connection, a write and a read per command."""
    # Counts are measured, not speed: redis-py's 64 connections at once must not time out on a loaded host.
    settings = _settings({"NUMPROTECT_REDIS_URL": redis_url}, NUMPROTECT_REDIS_TIMEOUT="10s")
    admin = redis.Redis.from_url(redis_url)
    for client in (MuxRedis(settings), create_redis(settings)):
        await client.incr("np:test:warm")  # connected
        await ECHO.load(client)
        for step in ("script", "zadd"):
            reads = admin.info("stats")["total_reads_processed"]
            writes = client.writes() if isinstance(client, MuxRedis) else 0
            if step == "script":
                replies = await asyncio.gather(*(ECHO(client, [f"np:test:{i}"], ["v", i]) for i in range(64)))
                assert replies == [[f"np:test:{i}".encode(), b"v", i + 1] for i in range(64)]
            else:
                key = f"np:test:z:{type(client).__name__}"
                added = await asyncio.gather(*(client.zadd(key, {f"m{i}": i}) for i in range(64)))
                assert added == [1] * 64
            redis_reads = admin.info("stats")["total_reads_processed"] - reads - 1  # INFO's own read
            if isinstance(client, MuxRedis):
                assert client.writes() - writes == 1, step
                assert redis_reads <= 2, step
            else:
                assert redis_reads >= 32, step
        await client.aclose()
    admin.close()


async def test_noscript_loads_the_script_and_runs_it(clients: tuple[RedisClient, MuxRedis]) -> None:
    _, mux = clients
    with pytest.raises(NoScriptError):
        await mux.evalsha(ECHO.sha, 1, f"{K}:k", "v", 1)
    assert await ECHO(mux, [f"{K}:k"], ["v", 1]) == [f"{K}:k".encode(), b"v", 2]  # NOSCRIPT, load, again


async def test_commands_holding_connection_state_are_refused_by_name(clients: tuple[RedisClient, MuxRedis]) -> None:
    _, mux = clients
    for command in (("WATCH", f"{K}:k"), ("SELECT", 1), ("MULTI",), ("SUBSCRIBE", "c"), ("MONITOR",)):
        with pytest.raises(NotMultiplexed, match=str(command[0])):
            await mux.execute_command(*command)
    with pytest.raises(NotMultiplexed, match="pub/sub"):
        mux.pubsub()
    with pytest.raises(NotMultiplexed, match="WATCH"):
        await mux.transaction(lambda pipe: None, f"{K}:k")
    pipe = mux.pipeline()
    with pytest.raises(NotMultiplexed, match="WATCH"):
        await pipe.watch(f"{K}:k")
    with pytest.raises(NotMultiplexed, match="NUMPROTECT_REDIS_TIMEOUT"):
        await mux.execute_command("WAIT", 1, 0)  # would block the shared connection for ever
    assert storage_unavailable(NotMultiplexed("x")) is None  # a bug, never UNAVAILABLE


async def test_a_blocking_command_holds_up_no_other(clients: tuple[RedisClient, MuxRedis]) -> None:
    _, mux = clients
    popping = asyncio.ensure_future(mux.blpop([f"{K}:queue"], timeout=5))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert await mux.set(f"{K}:other", "1") is True  # not behind the BLPOP
    assert time.monotonic() - started < 0.5
    await mux.rpush(f"{K}:queue", "item")
    assert await popping == (f"{K}:queue".encode(), b"item")
    entries = await mux.xread({f"{K}:stream": "$"}, block=50)
    assert entries == []


async def test_a_cancelled_caller_leaves_the_connection_in_step(clients: tuple[RedisClient, MuxRedis]) -> None:
    _, mux = clients
    await mux.set(f"{K}:a", "1")
    script = "local t = redis.call('TIME') while true do local n = redis.call('TIME') "
    script += "if (n[1] - t[1]) * 1000000 + n[2] - t[2] > 100000 then return 'slow' end end"
    slow = asyncio.ensure_future(mux.eval(script, 1, f"{K}:a"))
    await asyncio.sleep(0.01)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert await mux.get(f"{K}:a") == b"1"  # the slow script's reply went to nobody, this one to us
    assert await mux.incr(f"{K}:n") == 1


def test_the_services_event_loop_uvloop(redis_url: str) -> None:
    """The services run on uvloop, whose transports are not asyncio's classes."""

    async def commands() -> list[Any]:
        mux = MuxRedis(_settings({"NUMPROTECT_REDIS_URL": redis_url}))
        try:
            together = await asyncio.gather(*(mux.incr(f"{K}:uv") for _ in range(8)))
            return [sorted(together), await ECHO(mux, [f"{K}:k"], ["v", 1]), mux.writes()]
        finally:
            await mux.aclose()

    assert uvloop.run(commands()) == [list(range(1, 9)), [f"{K}:k".encode(), b"v", 2], 4]


def test_a_write_the_closed_transport_refuses_leaves_its_commands_unsent() -> None:
    """uvloop raises on a write to a transport closed before connection_lost was called: those commands never left,
    so they may be sent again on a new connection whatever they are (a connection lost after them may not)."""

    class ClosedTransport(asyncio.Transport):
        def write(self, data: Any) -> None:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

        def abort(self) -> None:
            pass

    loop = asyncio.new_event_loop()
    try:
        conn = _Connection(loop, "127.0.0.1:1", 1.0, None)
        conn.connection_made(ClosedTransport())
        future = loop.create_future()
        conn.send(b"*1\r\n$4\r\nINCR\r\n", future)
        conn._flush()
        lost = future.exception()
        assert isinstance(lost, _Lost) and lost.sent is False and conn.closed
        assert isinstance(lost.error, redis.ConnectionError)
    finally:
        loop.close()


def test_a_command_sent_on_a_connection_dropped_before_its_turn_fails_unsent() -> None:
    """The waiters of a connection being opened resume a loop pass after it opened: a peer gone in between has
    closed it. What they then queue on it was never sent, and fails at once as such (the caller tries a new
    connection) rather than waiting for a flush and a timer that a closed connection never runs."""

    class OpenTransport(asyncio.Transport):
        def write(self, data: Any) -> None:
            raise AssertionError("nothing is written to a closed connection")

        def abort(self) -> None:
            pass

    loop = asyncio.new_event_loop()
    try:
        conn = _Connection(loop, "127.0.0.1:1", 1.0, None)
        conn.connection_made(OpenTransport())
        conn.connection_lost(None)
        single, batched = loop.create_future(), loop.create_future()
        conn.send(b"*1\r\n$4\r\nPING\r\n", single)
        conn.send(b"*1\r\n$4\r\nPING\r\n", _Batch(batched, 1))
        for future in (single, batched):
            lost = future.exception()
            assert isinstance(lost, _Lost) and lost.sent is False, lost
            assert isinstance(lost.error, redis.ConnectionError)
        assert not conn.pending and not conn.buffer and conn.timer is None
    finally:
        loop.close()


def test_the_client_setting_is_checked_at_start_up(redis_url: str) -> None:
    env = {"NUMPROTECT_REDIS_URL": redis_url}
    assert _settings(env).client == "mux"
    assert _settings(env, NUMPROTECT_REDIS_CLIENT="redis-py").client == "redis-py"
    with pytest.raises(SettingsError, match="NUMPROTECT_REDIS_CLIENT='fast': must be one of mux, redis-py"):
        _settings(env, NUMPROTECT_REDIS_CLIENT="fast")
    assert isinstance(create_redis(_settings(env), write_path=True), MuxRedis)
    assert not isinstance(create_redis(_settings(env, NUMPROTECT_REDIS_CLIENT="redis-py"), write_path=True), MuxRedis)
    assert not isinstance(create_redis(_settings(env)), MuxRedis)  # the other services keep redis-py


# --- WAIT ----------------------------------------------------------------------------------------------------


@pytest.fixture
def primary_and_replica() -> Any:
    primary = RedisServer()
    replica = RedisServer("--replicaof", "127.0.0.1", str(primary.port))
    deadline = time.monotonic() + 10
    while replica.client().info("replication")["master_link_status"] != "up":
        assert time.monotonic() < deadline, "the replica did not connect"
        time.sleep(0.05)
    yield primary, replica
    replica.stop()
    primary.stop()


async def test_waiting_for_a_replica_holds_up_no_other_command(primary_and_replica: Any) -> None:
    """ReplicaWait's marker and WAIT go on a connection of their own: while WAIT waits for a stopped replica, the
    shared connection's commands are answered; with the replica back the wait is acknowledged."""
    primary, replica = primary_and_replica
    settings = _settings(
        {"NUMPROTECT_REDIS_URL": primary.url},
        NUMPROTECT_REDIS_WAIT_REPLICAS="1",
        NUMPROTECT_REDIS_WAIT_TIMEOUT="2s",
        NUMPROTECT_REDIS_TIMEOUT="5s",
    )
    mux = MuxRedis(settings)
    replicas = ReplicaWait.of(mux, settings)
    # A running replica acknowledges; on a loaded host its answer may take a while, so this wait is a patient one.
    acknowledged = ReplicaWait(mux, 1, 10.0)
    admin = primary.client()
    await mux.set("np:test:{w}:a", "1")
    await acknowledged.after(["np:test:{w}:a"])
    replica.process.send_signal(19)  # SIGSTOP: the replica stops acknowledging
    try:
        waiting = asyncio.ensure_future(replicas.after(["np:test:{w}:a"]))
        deadline = time.monotonic() + 5
        while admin.info("clients")["blocked_clients"] == 0:
            assert time.monotonic() < deadline and not waiting.done(), "WAIT never blocked"
            await asyncio.sleep(0.01)
        for i in range(20):
            await mux.set(f"np:test:{{w}}:{i}", "v")
        # Answered while WAIT still blocks its own connection (behind it they would come after its 2 s timeout).
        assert not waiting.done()
        with pytest.raises(Exception, match="0 of 1 replica"):
            await waiting
    finally:
        replica.process.send_signal(18)  # SIGCONT
        admin.close()
    await acknowledged.after(["np:test:{w}:a"])
    await mux.aclose()


# --- TLS and an ACL user ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import trustme

    folder = tmp_path_factory.mktemp("mux-tls")
    ca, other = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    leaf.private_key_pem.write_to_path(str(folder / "server.key"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    acl = folder / "users.acl"
    acl.write_text(render_acl_file({user.name: user.name[::-1] for user in ACL_USERS}))
    tls = ServerTls(folder / "server.pem", folder / "server.key", folder / "ca.pem")
    server = RedisServer("--aclfile", str(acl), auth=(ADMIN_USER, ADMIN_USER[::-1]), tls=tls)
    yield server, folder
    server.stop()


async def test_tls_and_an_acl_user(tls_acl_redis: Any, tmp_path: Path) -> None:
    server, folder = tls_acl_redis
    user = "numprotect-binding"
    (tmp_path / "password").write_text(user[::-1])
    env = {
        "NUMPROTECT_REDIS_URL": server.url,
        "NUMPROTECT_REDIS_USERNAME": user,
        "NUMPROTECT_REDIS_PASSWORD_FILE": str(tmp_path / "password"),
        "NUMPROTECT_REDIS_CA_FILE": str(folder / "ca.pem"),
    }
    mux = MuxRedis(_settings(env))
    # binding's keys and a script, as its user, inside TLS; other keys are not its own
    assert await ECHO(mux, ["np:b:{mux}"], ["v", 1]) == [b"np:b:{mux}", b"v", 2]
    assert await mux.hset("np:b:{mux}", "f", "v") == 1
    assert await mux.hgetall("np:b:{mux}") == {b"f": b"v"}
    with pytest.raises(NoPermissionError, match="no permissions to access one of the keys"):
        await mux.set("np:cdr:{mux}", "v")
    with pytest.raises(NoPermissionError, match=r"no permissions to run the 'config\|get' command"):
        await mux.execute_command("CONFIG", "GET", "maxmemory")
    await mux.aclose()
    # Another CA: the handshake fails; a wrong password: AUTH fails. Both are UNAVAILABLE, neither names it.
    untrusting = MuxRedis(_settings({**env, "NUMPROTECT_REDIS_CA_FILE": str(folder / "other-ca.pem")}))
    with pytest.raises(redis.ConnectionError, match="certificate verify failed") as refused:
        await untrusting.ping()
    assert storage_unavailable(refused.value) is not None
    (tmp_path / "password").write_text("wrong")
    wrong = MuxRedis(_settings(env))
    with pytest.raises(redis.AuthenticationError) as denied:
        await wrong.ping()
    assert "wrong" not in str(denied.value) and storage_unavailable(denied.value) is not None
    with pytest.raises(SettingsError, match="TLS settings do not match"):  # never plaintext for rediss://
        MuxRedis(RedisSettings(url=server.url, mode="standalone", timeout_seconds=1.0, max_connections=1))
