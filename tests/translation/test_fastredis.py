"""translation.fastredis.ScriptClient: the sync hot path's EVALSHA client on standalone Redis and Redis Cluster."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from numprotect.core.errors import Unavailable
from numprotect.core.redis_client import LuaScript
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.translation.fastredis import ScriptClient
from support.redis_server import RedisServer


@pytest.fixture
def echo(tmp_path: Any) -> LuaScript:
    path = tmp_path / "lua" / "echo.lua"
    path.parent.mkdir()
    path.write_text("return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}\n")
    return LuaScript(path)


def _flush_scripts(redis_sync: Any) -> None:
    if isinstance(redis_sync, RedisCluster):
        for node in redis_sync.get_primaries():
            with redis.Redis(host=node.host, port=node.port) as client:
                client.script_flush()
    else:
        redis_sync.script_flush()


def test_evalsha_loads_the_script_on_noscript_and_routes_by_slot(
    redis_env: dict[str, str], redis_sync: Any, echo: LuaScript
) -> None:
    _flush_scripts(redis_sync)
    client = ScriptClient(RedisSettings.from_env(Env(redis_env)), echo)
    for i in range(50):  # 50 tags spread over every cluster node
        key = f"np:test:{{{i}}}"
        assert client.evalsha([key], [f"v{i}"], 2.0) == [key.encode(), f"v{i}".encode(), 1]
    assert redis_sync.get("np:test:{7}") == b"1"
    client.close()


def test_concurrent_combined_calls_each_get_their_own_reply(
    redis_env: dict[str, str], redis_sync: Any, echo: LuaScript
) -> None:
    client = ScriptClient(RedisSettings.from_env(Env(redis_env)), echo)
    barrier = threading.Barrier(16)

    def work(worker: int) -> list[bool]:
        barrier.wait()
        checks = []
        for n in range(100):
            key = f"np:test:{{{worker}-{n % 7}}}"
            reply = client.evalsha_combined([key], [f"{worker}:{n}"], 5.0)
            checks.append(reply[0] == key.encode() and reply[1] == f"{worker}:{n}".encode())
        return checks

    with futures.ThreadPoolExecutor(16) as pool:
        results = [check for checks in pool.map(work, range(16)) for check in checks]
    assert len(results) == 1600 and all(results)
    assert sum(int(redis_sync.get(f"np:test:{{{w}-{k}}}")) for w in range(16) for k in range(7)) == 1600


def test_an_unreachable_redis_is_unavailable(echo: LuaScript) -> None:
    settings = RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": "redis://127.0.0.1:1/0"}))
    client = ScriptClient(settings, echo)
    with pytest.raises(Unavailable):
        client.evalsha(["np:test:{x}"], ["a"], 0.5)
    with pytest.raises(Unavailable):
        client.evalsha_combined(["np:test:{x}"], ["a"], 0.5)


def test_commands_are_exact_resp_for_ascii_and_other_text(echo: LuaScript) -> None:
    import hiredis

    client = ScriptClient(RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": "redis://127.0.0.1:1/0"})), echo)
    for keys, args in (
        (("np:rt:{700100000000001}:c:13800000001", "np:lock:{700100000000001}"), ("13800000001", "", "60000")),
        (("np:x:{租户}",), ("租户-1,tenant-2", "ü")),  # multi-byte: byte lengths, not character counts
    ):
        command = client._command(keys, args)
        # Parse the command as a RESP array: exactly the parts, nothing left over.
        reader = hiredis.Reader(encoding="utf-8")
        reader.feed(command)
        assert reader.gets() == ["EVALSHA", echo.sha, str(len(keys)), *keys, *args]
        assert reader.gets() is False


def test_concurrent_combined_calls_share_pipelined_writes(tmp_path: Any) -> None:
    """While a leader waits for Redis, the others queue and go out together: fewer socket reads than calls.

    The script spins for 2 ms so the other threads surely arrive meanwhile; Redis's own INFO counters
    (total_reads_processed: reads from client sockets) show how many writes reached it.
    """
    path = tmp_path / "lua" / "slow.lua"
    path.parent.mkdir()
    path.write_text(
        "local t = redis.call('TIME') local until_us = t[1] * 1000000 + t[2] + 2000\n"
        "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= until_us\n"
        "return redis.call('INCR', KEYS[1])\n"
    )
    server = RedisServer()
    try:
        client = ScriptClient(RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": server.url})), LuaScript(path))
        client.evalsha(["np:test:{warm}"], [], 5.0)  # connects and loads the script outside the count
        admin = server.client()
        before = {**admin.info("stats"), **admin.info("commandstats")}
        barrier = threading.Barrier(8)

        def work(worker: int) -> list[int]:
            barrier.wait()
            return [client.evalsha_combined([f"np:test:{{{worker}}}"], [], 5.0) for _ in range(10)]

        with futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(work, range(8)))
        after = {**admin.info("stats"), **admin.info("commandstats")}
        assert replies == [list(range(1, 11))] * 8  # each caller got its own counter's replies, in order
        calls = after["cmdstat_evalsha"]["calls"] - before["cmdstat_evalsha"]["calls"]
        reads = after["total_reads_processed"] - before["total_reads_processed"] - 2  # minus the INFO commands
        assert calls == 80
        # Every call alone would be 80 reads; with 8 threads and a 2 ms script nearly all calls are batched.
        assert reads <= 40, f"{reads} socket reads for {calls} calls: the calls were not combined"
        admin.close()
    finally:
        server.stop()


@pytest.mark.parametrize("method", ["evalsha", "evalsha_combined"])
def test_a_budget_spent_before_the_send_is_unavailable_and_sends_nothing(
    redis_env: dict[str, str], redis_sync: Any, echo: LuaScript, method: str
) -> None:
    # The chaos run's INTERNAL: on a loaded host the thread reached the pooled socket after its deadline, and
    # settimeout(<negative>) raised ValueError. A budget of 1 ns is spent before the send, every time.
    client = ScriptClient(RedisSettings.from_env(Env(redis_env)), echo)
    call = getattr(client, method)
    key = "np:test:{spent}"
    assert call([key], ["a"], 2.0)[2] == 1  # the pooled connection has answered: the next call takes the hot path
    with pytest.raises(Unavailable, match="no time left for the translation storage") as info:
        call([key], ["b"], 1e-9)
    assert info.value.reason == "REDIS_UNREACHABLE"
    assert redis_sync.get(key) == b"1"  # nothing was sent
    assert call([key], ["c"], 2.0)[2] == 2  # and the socket is still in step
    client.close()


def test_a_budget_of_zero_never_makes_the_socket_non_blocking(redis_env: dict[str, str], echo: LuaScript) -> None:
    client = ScriptClient(RedisSettings.from_env(Env(redis_env)), echo)
    key = "np:test:{zero}"
    assert client.evalsha([key], ["a"], 2.0)[2] == 1
    conn = client._conns()[client._node_for(key, time.monotonic() + 2.0)]
    blocking = conn.sock.gettimeout()
    assert blocking is not None and blocking > 0
    with pytest.raises(Unavailable, match="no time left"):
        conn.send(client._command([key], ["b"]), 0.0)
    assert conn.sock.gettimeout() == blocking  # settimeout(0.0) would have made it non-blocking
    assert client.evalsha([key], ["c"], 2.0)[2] == 2
    client.close()
