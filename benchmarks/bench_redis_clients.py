"""Why the hot paths have their own Redis clients: CPU per command of redis-py against ours.

`python -m benchmarks.bench_redis_clients` (part of `make bench`). One fresh redis-server.

Blocking (translation): the same script (the real translate.lua on a number with no route) called BENCH_CALLS
times (20,000) from one thread by redis-py's blocking client and by ScriptClient, in BENCH_ROUNDS (5) interleaved
rounds. Reports the process CPU time per call (user + system of this process: what a translation worker pays,
Redis's own time excluded) and the ratio redis-py / ScriptClient, per round and of the medians.

asyncio (binding, allocation; on uvloop, as the services run): redis.asyncio as create_redis makes it against the
multiplexing client (numprotect.core.redis_mux), EVALSHA of the same script and a ZADD, BENCH_ASYNC_CALLS (10,000)
calls per measure, from one coroutine after another (sequential) and from 64 at once; interleaved rounds. Reports
this process's CPU per call, Redis's CPU per call (redis-server's /proc counters) and Redis's read events per
call (INFO total_reads_processed: a coalesced write is one read). docs/architecture.md quotes the results.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
import uvloop

from benchmarks.harness import cpu_seconds, free_port, redis_server_args, wait_redis
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.translation.core import SCRIPT
from numprotect.services.translation.fastredis import ScriptClient

CALLS = int(os.environ.get("BENCH_CALLS", "20000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
ASYNC_CALLS = int(os.environ.get("BENCH_ASYNC_CALLS", "10000"))
CONCURRENT = 64
NUMBER = "700100000000001"
CALLER = "13800000001"
# translate.lua's keys and arguments (see its header) for a number with no route: its shortest path.
KEYS = [
    f"np:lock:{{{NUMBER}}}",
    f"np:rt:{{{NUMBER}}}:c:{CALLER}",
    f"np:rt:{{{NUMBER}}}:n",
    f"np:rt:{{{NUMBER}}}:axe",
    f"np:rt:{{{NUMBER}}}:e:",
    f"np:rl:{{{NUMBER}}}:c:{CALLER}",
]
ARGS = [CALLER, "0", "1000", "100", "100", "", f"np:rl:{{{NUMBER}}}:b:"]


def _per_call_us(call: Callable[[], Any]) -> float:
    began = time.process_time()
    for _ in range(CALLS):
        call()
    return (time.process_time() - began) / CALLS * 1e6


def _blocking(url: str) -> None:
    """redis-py's blocking client against ScriptClient (translation's hot path)."""
    plain = redis.Redis.from_url(url)
    own = ScriptClient(RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": url})), SCRIPT)
    sha = plain.script_load(SCRIPT.source)
    keys, args = KEYS, ARGS
    plain.evalsha(sha, len(keys), *keys, *args)
    own.evalsha(keys, args, 2.0)
    rounds: list[tuple[float, float]] = []
    for _ in range(ROUNDS):
        redis_py = _per_call_us(lambda: plain.evalsha(sha, len(keys), *keys, *args))
        script_client = _per_call_us(lambda: own.evalsha(keys, args, 2.0))
        rounds.append((redis_py, script_client))
    for index, (redis_py, script_client) in enumerate(rounds, 1):
        print(
            f"round {index}: redis-py {redis_py:.1f} us/call, ScriptClient {script_client:.1f} us/call, "
            f"ratio {redis_py / script_client:.2f}"
        )
    median_py = statistics.median(r[0] for r in rounds)
    median_own = statistics.median(r[1] for r in rounds)
    print(f"calls per round: {CALLS}, rounds: {ROUNDS}, load average {os.getloadavg()[0]:.1f}")
    print(
        f"median CPU per EVALSHA: redis-py {median_py:.1f} us, ScriptClient {median_own:.1f} us "
        f"(redis-py costs {median_py / median_own:.2f}x)"
    )
    own.close()
    plain.close()


# One asyncio measure: (this process's CPU, Redis's CPU, Redis's read events) per call.
Cost = tuple[float, float, float]


async def _measure(call: Callable[[int], Awaitable[Any]], concurrency: int, admin: redis.Redis, redis_pid: int) -> Cost:
    per_task = ASYNC_CALLS // concurrency

    async def worker(first: int) -> None:
        for n in range(first, first + per_task):
            await call(n)

    reads = int(admin.info("stats")["total_reads_processed"])
    redis_cpu = cpu_seconds(redis_pid)
    began = time.process_time()
    await asyncio.gather(*(worker(w * per_task) for w in range(concurrency)))
    own = time.process_time() - began
    redis_cpu = cpu_seconds(redis_pid) - redis_cpu
    reads = int(admin.info("stats")["total_reads_processed"]) - reads - 1  # the first INFO's read
    calls = per_task * concurrency
    return own / calls * 1e6, redis_cpu / calls * 1e6, reads / calls


async def _asyncio_rounds(url: str, admin: redis.Redis, redis_pid: int) -> dict[tuple[str, str, str], list[Cost]]:
    # A long timeout: a stall of the shared host must not end the run (what is measured is CPU, not latency).
    settings = RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": url, "NUMPROTECT_REDIS_TIMEOUT": "30s"}))
    clients: dict[str, RedisClient] = {
        "redis.asyncio": create_redis(settings),
        "mux": create_redis(settings, write_path=True),
    }
    sha = SCRIPT.sha
    keys, args = KEYS, ARGS
    operations: dict[str, Callable[[RedisClient], Callable[[int], Awaitable[Any]]]] = {
        "EVALSHA": lambda client: lambda n: client.evalsha(sha, len(keys), *keys, *args),  # type: ignore[misc]
        "ZADD": lambda client: lambda n: client.zadd("np:bench:pending", {f"b{n % 4096}": n}),
    }
    for client in clients.values():  # connected, the script loaded, every connection of the pool open
        await SCRIPT.load(client)
        await asyncio.gather(*(client.ping() for _ in range(CONCURRENT)))
    results: dict[tuple[str, str, str], list[Cost]] = {}
    for _ in range(ROUNDS):
        for operation, make in operations.items():
            for mode, concurrency in (("sequential", 1), (f"{CONCURRENT} at once", CONCURRENT)):
                for name, client in clients.items():
                    cost = await _measure(make(client), concurrency, admin, redis_pid)
                    results.setdefault((operation, mode, name), []).append(cost)
    for client in clients.values():
        await client.aclose()
    return results


def _asyncio(url: str, admin: redis.Redis, redis_pid: int) -> None:
    """redis.asyncio against the multiplexing client (binding's and allocation's), on uvloop."""
    results = uvloop.run(_asyncio_rounds(url, admin, redis_pid))
    print(
        f"\nasyncio (uvloop), {ASYNC_CALLS} calls per measure, {ROUNDS} rounds, load average {os.getloadavg()[0]:.1f}"
    )
    print("median per call: this process's CPU, Redis's CPU, Redis's read events")
    for operation in ("EVALSHA", "ZADD"):
        for mode in ("sequential", f"{CONCURRENT} at once"):
            medians = {
                name: tuple(statistics.median(cost[i] for cost in results[operation, mode, name]) for i in range(3))
                for name in ("redis.asyncio", "mux")
            }
            (py_cpu, py_redis, py_reads), (mux_cpu, mux_redis, mux_reads) = medians["redis.asyncio"], medians["mux"]
            print(
                f"{operation:8s} {mode:12s} redis.asyncio {py_cpu:6.1f} us, Redis {py_redis:5.1f} us, "
                f"{py_reads:4.2f} reads | mux {mux_cpu:6.1f} us, Redis {mux_redis:5.1f} us, {mux_reads:4.2f} reads "
                f"| redis.asyncio costs {py_cpu / mux_cpu:.2f}x"
            )
            rounds = ", ".join(
                f"{a[0] / b[0]:.2f}"
                for a, b in zip(results[operation, mode, "redis.asyncio"], results[operation, mode, "mux"], strict=True)
            )
            print(f"{'':21s} per-round ratios: {rounds}")


def main() -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (make system-deps)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-clients-"))
    port = free_port()
    server = subprocess.Popen(redis_server_args(binary, port, workdir), stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        admin = wait_redis(port)
        sections = os.environ.get("BENCH_REDIS_CLIENTS", "blocking,asyncio").split(",")
        if "blocking" in sections:
            _blocking(url)
        if "asyncio" in sections:
            _asyncio(url, admin, server.pid)
        admin.close()
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
