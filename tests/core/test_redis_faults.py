"""Every transient Redis condition, produced on a real redis-server, becomes UNAVAILABLE with a retry hint.

Each fault is made for real (a stopped server, DEBUG SLEEP, a loading restart, a replica, a failed RDB save, a
script past busy-reply-threshold, maxmemory, min-replicas-to-write, a cluster node without slots, a slot being
migrated), then a command goes through the project's own clients (`create_redis`, asyncio, and `create_sync_redis`,
blocking) and the exception it raises through the one exception-to-status layer (`calls.status_for`). Required:
UNAVAILABLE (never INTERNAL), google.rpc.RetryInfo, and the ErrorInfo reason naming the cause. Where only writes are
refused (MISCONF, OOM, NOREPLICAS), reads and a read-only script go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.rpc import error_details_pb2, status_pb2
from redis.backoff import NoBackoff
from redis.retry import Retry

from numprotect.core.calls import status_for
from numprotect.core.health import HealthProbe
from numprotect.core.redis_client import (
    LuaScript,
    create_redis,
    create_sync_redis,
    storage_unavailable,
    sync_redis_is_up,
)
from numprotect.core.settings import Env, RedisSettings
from support.redis_server import RedisServer, cluster_ports, fail_a_save, free_port, saving_redis

METHOD = "/test.Faults/Call"
WRITE = LuaScript.from_source("fault_write", "return redis.call('SET', KEYS[1], ARGV[1])")
# Declared read-only (Redis 7 script flags): such a script runs where writes are refused or paused.
READ = LuaScript.from_source("fault_read", "#!lua flags=no-writes\nreturn redis.call('GET', KEYS[1])")


def _settings(url: str, timeout: str = "2s") -> RedisSettings:
    return RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": url, "NUMPROTECT_REDIS_TIMEOUT": timeout}))


def _assert_unavailable(exc: BaseException, reason: str) -> None:
    """`exc` through the call layer: UNAVAILABLE, a RetryInfo with a positive delay, ErrorInfo `reason`."""
    status = status_for(exc, METHOD)
    assert status.code == grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc} -> {status.code}"
    parsed = _parsed_details(status)
    retry = parsed.get("RetryInfo")
    assert isinstance(retry, error_details_pb2.RetryInfo), f"no RetryInfo for {exc!r}"
    assert retry.retry_delay.ToNanoseconds() > 0
    info = parsed.get("ErrorInfo")
    assert isinstance(info, error_details_pb2.ErrorInfo), f"no ErrorInfo for {exc!r}"
    assert info.reason == reason, f"{exc!r}: {info.reason}"


def _parsed_details(status: grpc.Status) -> dict[str, Any]:
    """The google.rpc details of a status built by grpcio-status (its grpc-status-details-bin trailer)."""
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    message = status_pb2.Status.FromString(raw)
    found: dict[str, Any] = {}
    for detail in message.details:
        for kind in (error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo):
            candidate = kind()
            if detail.Unpack(candidate):
                found[kind.__name__] = candidate
    return found


def _async_error(url: str, command: Callable[[Any], Awaitable[Any]], timeout: str = "2s") -> BaseException:
    """The exception a command raises on the asyncio client (the test fails if it succeeds)."""

    async def run() -> BaseException:
        client = create_redis(_settings(url, timeout))
        try:
            await command(client)
        except Exception as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("the command succeeded")

    return asyncio.run(run())


def _sync_error(url: str, command: Callable[[Any], Any], timeout: str = "2s") -> BaseException:
    client = create_sync_redis(_settings(url, timeout))
    try:
        command(client)
    except Exception as exc:
        return exc
    finally:
        client.close()
    raise AssertionError("the command succeeded")


def _both_unavailable(
    url: str,
    async_command: Callable[[Any], Awaitable[Any]],
    sync_command: Callable[[Any], Any],
    reason: str,
    timeout: str = "2s",
) -> None:
    _assert_unavailable(_async_error(url, async_command, timeout), reason)
    _assert_unavailable(_sync_error(url, sync_command, timeout), reason)


async def _async_write_script(client: Any) -> Any:
    return await WRITE(client, ["k"], ["v"])


def _reads_go_on(url: str) -> None:
    """Reads and a read-only script still answer (asyncio and blocking clients)."""

    async def read() -> tuple[Any, Any]:
        client = create_redis(_settings(url))
        try:
            return await client.get("seed"), await READ(client, ["seed"])
        finally:
            await client.aclose()

    assert asyncio.run(read()) == (b"1", b"1")
    client = create_sync_redis(_settings(url))
    try:
        assert client.get("seed") == b"1"
    finally:
        client.close()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A redis-server of this test alone (its faults must not reach other tests), with one key `seed`."""
    instance = RedisServer("--enable-debug-command", "local")
    _seeded(instance)
    yield instance
    instance.stop()


def _seeded(instance: RedisServer) -> redis.Redis:
    """Key `seed` set and the read script loaded, as a running service has it before a fault (SCRIPT LOAD is
    refused under MISCONF and paused by CLIENT PAUSE WRITE, like any write)."""
    client = instance.client()
    client.set("seed", "1")
    client.script_load(READ.source)
    return client


def test_stopped_redis_is_unavailable(server: RedisServer) -> None:
    url = server.url
    server.kill()
    _both_unavailable(url, lambda c: c.get("k"), lambda c: c.get("k"), "REDIS_UNREACHABLE")


def test_a_redis_slower_than_the_timeout_is_unavailable(server: RedisServer) -> None:
    sleeper = threading.Thread(target=lambda: server.client().execute_command("DEBUG", "SLEEP", "1.5"))
    sleeper.start()
    try:
        time.sleep(0.1)
        _both_unavailable(server.url, lambda c: c.get("k"), lambda c: c.get("k"), "REDIS_UNREACHABLE", "200ms")
    finally:
        sleeper.join()


def test_client_pause_write_times_writes_out_as_unavailable_and_reads_go_on(server: RedisServer) -> None:
    server.client().execute_command("CLIENT", "PAUSE", "3000", "WRITE")
    try:
        _both_unavailable(server.url, _async_write_script, lambda c: c.set("k", "v"), "REDIS_UNREACHABLE", "300ms")
        _reads_go_on(server.url)
    finally:
        server.client().execute_command("CLIENT", "UNPAUSE")


@pytest.mark.parametrize(
    ("setting", "reason"),
    [("maxmemory", "REDIS_OUT_OF_MEMORY"), ("min-replicas-to-write", "REDIS_NOREPLICAS")],
)
def test_oom_and_noreplicas_refuse_writes_as_unavailable_and_reads_go_on(
    server: RedisServer, setting: str, reason: str
) -> None:
    """maxmemory 1 (noeviction): OOM; min-replicas-to-write 1 on a master without replicas: NOREPLICAS."""
    server.client().config_set(setting, "1")
    try:
        _both_unavailable(server.url, _async_write_script, lambda c: c.set("k", "v"), reason)
        _both_unavailable(server.url, lambda c: c.set("k", "v"), lambda c: c.incr("n"), reason)
        _reads_go_on(server.url)
    finally:
        server.client().config_set(setting, "0")


def test_misconf_after_a_failed_save_refuses_writes_as_unavailable_and_reads_go_on(tmp_path: Path) -> None:
    """A save that fails for real (Redis's folder is gone: the snapshot cannot be created) sets MISCONF."""
    gone = tmp_path / "redis-data"
    gone.mkdir()
    instance = saving_redis(gone)
    try:
        fail_a_save(_seeded(instance), gone)
        _both_unavailable(instance.url, _async_write_script, lambda c: c.set("k", "v"), "REDIS_PERSISTENCE_FAILED")
        _reads_go_on(instance.url)
        # Redis refuses PING too then; the health probe still reports it up (reads are served).
        probe = create_sync_redis(_settings(instance.url))
        try:
            with pytest.raises(redis.ResponseError, match=r"^MISCONF"):
                probe.ping()
            assert sync_redis_is_up(probe)
        finally:
            probe.close()
    finally:
        instance.stop()


def test_a_write_to_a_replica_is_readonly_and_unavailable(server: RedisServer) -> None:
    replica = RedisServer("--replicaof", "127.0.0.1", str(server.port))
    try:
        _both_unavailable(replica.url, lambda c: c.set("k", "v"), lambda c: c.set("k", "v"), "REDIS_READONLY")
        _both_unavailable(replica.url, _async_write_script, lambda c: c.incr("n"), "REDIS_READONLY")
    finally:
        replica.stop()


def test_a_replica_without_its_master_is_masterdown_and_unavailable() -> None:
    replica = RedisServer()
    try:
        replica.client().config_set("replica-serve-stale-data", "no")
        replica.client().replicaof("127.0.0.1", str(free_port()))  # a master that is not there
        _both_unavailable(replica.url, lambda c: c.get("k"), lambda c: c.get("k"), "REDIS_MASTERDOWN")
    finally:
        replica.stop()


def test_a_script_past_the_busy_threshold_is_busy_and_unavailable(server: RedisServer) -> None:
    server.client().config_set("busy-reply-threshold", "50")
    spinner = threading.Thread(
        target=lambda: _ignore(lambda: server.client().eval("while true do end", 0)), daemon=True
    )
    spinner.start()
    try:
        time.sleep(0.3)
        _both_unavailable(server.url, lambda c: c.get("k"), lambda c: c.get("k"), "REDIS_BUSY")
    finally:
        redis.Redis(port=server.port).script_kill()
        spinner.join(5)


def _ignore(call: Callable[[], Any]) -> None:
    with contextlib.suppress(redis.RedisError):
        call()


def test_loading_after_a_restart_is_unavailable(tmp_path: Path) -> None:
    """A restarted Redis reading its snapshot answers LOADING (kept loading ~2 s by key-load-delay)."""
    port = free_port()
    base = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""]
    base += ["--enable-debug-command", "local"]
    first = subprocess.Popen(base, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        _wait(client.ping)
        client.execute_command("DEBUG", "POPULATE", "2000")
        client.save()
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # SHUTDOWN closes the connection
    first.wait(10)
    loading = subprocess.Popen(
        [*base, "--key-load-delay", "1000", "--loading-process-events-interval-bytes", "1024"],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        _wait(lambda: _loading(port))
        # A loading Redis serves its clients only between chunks of the load: a roomy timeout, so that a slow
        # answer on the shared test machine is not taken for the LOADING answer under test.
        _both_unavailable(url, lambda c: c.get("k"), lambda c: c.get("k"), "REDIS_LOADING", "5s")
        _both_unavailable(url, _async_write_script, lambda c: c.set("k", "v"), "REDIS_LOADING", "5s")
        assert _loading(port), "the load ended before every check ran: raise key-load-delay"
    finally:
        loading.kill()
        loading.wait()


def _restart(server: RedisServer) -> None:
    server.kill()
    server.restart()


def _loading(port: int) -> bool:
    try:
        # No retries: redis-py's default client would wait (with backoff) until the load is over.
        redis.Redis(port=port, retry=Retry(NoBackoff(), 0)).ping()
    except redis.BusyLoadingError:
        return True
    except redis.ConnectionError:
        return False
    return False


def _wait(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.fixture
def cluster_pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    """Two cluster-enabled nodes that know each other; no slot assigned yet."""
    nodes = tuple(
        RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", port=port)
        for port in cluster_ports(2)
    )
    try:
        nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", str(nodes[1].port))
        _wait(lambda: len(nodes[0].client().execute_command("CLUSTER", "NODES").splitlines()) == 2)
        _wait(lambda: len(nodes[1].client().execute_command("CLUSTER", "NODES").splitlines()) == 2)
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            node.stop()


def test_a_cluster_node_without_the_slot_is_clusterdown_and_unavailable(
    cluster_pair: tuple[RedisServer, RedisServer],
) -> None:
    node, _ = cluster_pair
    _both_unavailable(node.url, lambda c: c.get("k"), lambda c: c.get("k"), "REDIS_CLUSTERDOWN")
    # The cluster client cannot even load a slot map then: a topology failure, also UNAVAILABLE.
    cluster_settings = RedisSettings.from_env(
        Env({"NUMPROTECT_REDIS_URL": node.url, "NUMPROTECT_REDIS_MODE": "cluster", "NUMPROTECT_REDIS_TIMEOUT": "1s"})
    )
    try:
        create_sync_redis(cluster_settings).get("k")
    except Exception as exc:
        _assert_unavailable(exc, "REDIS_CLUSTERDOWN")
    else:
        raise AssertionError("a cluster without slots answered")


def test_a_multi_key_read_during_a_slot_migration_is_tryagain_and_unavailable(
    cluster_pair: tuple[RedisServer, RedisServer],
) -> None:
    source, target = cluster_pair
    admin = source.client()
    admin.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
    slot = admin.execute_command("CLUSTER", "KEYSLOT", "{t}a")
    target_id = target.client().execute_command("CLUSTER", "MYID").decode()
    _wait(lambda: b"cluster_state:ok" in admin.execute_command("CLUSTER", "INFO"))
    admin.set("{t}a", "1")  # one key here, the other not: the command cannot be served whole
    admin.execute_command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    _both_unavailable(source.url, lambda c: c.mget("{t}a", "{t}b"), lambda c: c.mget("{t}a", "{t}b"), "REDIS_TRYAGAIN")


def test_errors_a_retry_cannot_fix_are_not_storage_unavailability(server: RedisServer) -> None:
    """A wrong-type reply or a script bug is no outage: it stays a bug (INTERNAL, logged), not UNAVAILABLE."""
    client = server.client()
    client.lpush("list", "x")
    try:
        client.get("list")
    except redis.ResponseError as exc:
        assert storage_unavailable(exc) is None
        assert status_for(exc, METHOD).code == grpc.StatusCode.INTERNAL
    else:
        raise AssertionError("GET on a list answered")


def test_a_closed_transport_while_reconnecting_is_unavailable_and_other_runtime_errors_stay_bugs() -> None:
    """redis-py reconnecting on a transport uvloop has closed raises RuntimeError while it handles the connection
    failure (seen in the chaos suite's Redis kill -9): that is the outage, UNAVAILABLE; a RuntimeError of its own
    is a bug."""
    try:
        try:
            raise redis.ConnectionError("Connection has data")
        except redis.ConnectionError:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")  # noqa: B904 (as raised inside redis-py: the failure is only its __context__)
    except RuntimeError as exc:
        unavailable = storage_unavailable(exc)
        assert unavailable is not None and unavailable.reason == "REDIS_UNREACHABLE"
        assert status_for(exc, METHOD).code == grpc.StatusCode.UNAVAILABLE
    bug = RuntimeError("a bug")
    assert storage_unavailable(bug) is None
    assert status_for(bug, METHOD).code == grpc.StatusCode.INTERNAL


def test_pooled_connections_survive_a_redis_restart(server: RedisServer) -> None:
    """Redis restarted on the same port under clients holding N pooled connections each: once Redis answers PING
    again, no call fails (the pool drops the connections Redis closed instead of failing a call on each), and the
    health probe, once SERVING again, stays SERVING."""
    connections = 16
    settings = _settings(server.url)
    sync_client = create_sync_redis(settings)
    probe_client = create_sync_redis(settings, max_connections=2)
    published: list[tuple[float, bool]] = []
    probe = HealthProbe(
        lambda: sync_redis_is_up(probe_client), lambda up: published.append((time.monotonic(), up)), 0.05
    )

    async def run() -> tuple[float, int, list[str]]:
        client = create_redis(settings)
        gate = asyncio.Semaphore(connections)
        failures: list[str] = []

        async def incr() -> None:
            async with gate:
                try:
                    await client.incr("n")
                except Exception as exc:
                    failures.append(f"asyncio {exc!r}")

        def sync_incr(_: int) -> None:
            try:
                sync_client.incr("n")
            except Exception as exc:
                failures.append(f"blocking {exc!r}")

        with futures.ThreadPoolExecutor(connections) as pool:
            await asyncio.gather(*(incr() for _ in range(400)))
            list(pool.map(sync_incr, range(400)))
            pooled = (
                len(client.connection_pool._available_connections),  # type: ignore[union-attr]
                len(sync_client.connection_pool._available_connections),  # type: ignore[union-attr]
            )
            # Several idle pooled connections per client (a loaded machine may not run all 16 threads at once).
            assert not failures and min(pooled) >= connections // 2, (failures, pooled)
            await asyncio.to_thread(_restart, server)  # returns once PING answers
            back = time.monotonic()
            await asyncio.gather(*(incr() for _ in range(400)))
            await asyncio.to_thread(lambda: list(pool.map(sync_incr, range(400))))
            await asyncio.sleep(0.5)  # a few more probes
        await client.aclose()
        return back, len(failures), failures

    probe.start()
    try:
        back, failed, failures = asyncio.run(run())
    finally:
        probe.stop()
        sync_client.close()
        probe_client.close()
    assert failed == 0, failures[:5]
    assert published[-1][1] is True
    assert not [at for at, up in published if not up and at > back + 0.2], published
