"""Why translation's hot path has its own Redis client: CPU per EVALSHA, redis-py's blocking client vs ScriptClient.

`python -m benchmarks.bench_redis_clients` (part of `make bench`). One fresh redis-server; the same script (the
real translate.lua on a seeded route) called BENCH_CALLS times (20,000) from one thread by each client, in
BENCH_ROUNDS (5) interleaved rounds. Reports the process CPU time per call (user + system of this process:
what a translation worker pays, Redis's own time excluded) and the ratio redis-py / ScriptClient, per round and
of the medians. docs/architecture.md quotes the result.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from benchmarks.harness import free_port, redis_server_args, wait_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.translation.core import SCRIPT
from numprotect.services.translation.fastredis import ScriptClient

CALLS = int(os.environ.get("BENCH_CALLS", "20000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
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


def main() -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (make system-deps)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-clients-"))
    port = free_port()
    server = subprocess.Popen(redis_server_args(binary, port, workdir), stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_redis(port).close()
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
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
