"""One hot pool: how many allocations one tenant x city pool gets per CPU-second of its busiest Redis primary, as one
pool of one slot and as a pool of N sub-pools, on one Redis and on a 3-primary Redis Cluster started here.

Setup: a redis-server, and a Redis Cluster of 3 primaries with a replica each (tests/support, as `make test`'s
cluster pass runs it). On each, two pools of BLOCKS blocks are imported through `NumberPools.import_block` (the
service's code): one of 1 sub-pool (every pool before sub-pools) and one of SUBPOOLS.

Load: CLIENTS client processes send the real allocate.lua (EVALSHA, the arguments AllocateNumber sends with the
default settings; 4 AXB : 1 AXN, RIDERS x CUSTOMERS parties, 600 s leases) straight to the primaries over raw
sockets, DEPTH commands per primary pipelined per round, RATE allocations/s in all: each primary gets the same
pipeline depth whatever the pool, so what a command costs Redis is comparable, and the rate leaves the 2 cores
room for every busy Redis process. The sub-pool of each command rotates, as NumberPools does; an
'exhausted' reply is counted (none is expected: the pools are far from full). Gaining wall-clock throughput from 3
primaries needs 3 cores for them alone; this machine has 2 and runs the clients too, so the figure is Redis CPU:

  allocations per CPU-second of the busiest primary = allocations / max over primaries (INFO cpu user+sys delta)

given two ways: the CPU delta as read, and the delta less what the primary spends idle over the same time
(serverCron, the cluster bus, replica pings: measured for IDLE_SECONDS before the rounds), which a saturated
primary would not spend again per allocation. A third figure does not depend on the machine's load: allocations
per 1,000 commands the busiest primary executed (INFO stats total_commands_processed, which counts the commands
run inside scripts too): the share of the work. Capacity ratio = the figure for the pool of SUBPOOLS on the
cluster / for the pool of 1 on one Redis, and / for the pool of 1 on the same cluster. Per primary: the share of
the pool's EVALSHA calls, its CPU and commands, and the EVALSHA time of INFO commandstats (the time inside the
scripts as the clock runs: under CPU contention it includes the time the process waited for a core, so it is no
measure of cost here). Configurations are measured in alternating rounds; per-round figures and the sums are
printed.

Run: python -m benchmarks hot_pool   (or python -m benchmarks.bench_hot_pool; BENCH_ROUNDS, BENCH_ALLOCATIONS)
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import hiredis
import redis
from redis.asyncio import Redis, RedisCluster

from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.pool_keys import PoolLayout
from numprotect.core.redis_client import RedisClient
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.allocation.pools import NumberPools
from numprotect.services.allocation.scripts import Scripts
from numprotect.services.allocation.settings import AllocationSettings
from support.redis_cluster import RedisClusterServers
from support.redis_server import RedisServer

SUBPOOLS = 3
BLOCKS = 3  # 30,000 numbers per pool
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "8"))
ALLOCATIONS = int(os.environ.get("BENCH_ALLOCATIONS", "6000"))  # per configuration per round
CLIENTS = 2
DEPTH = 16  # commands per primary per round trip
# Allocations/s all clients send together, the same for every configuration: well below what the 2 cores could run,
# so the Redis processes (up to 3 primaries and 3 replicas busy at once) are not starved of CPU, which would inflate
# what each command costs them (cold caches, preemption in the middle of a script).
RATE = int(os.environ.get("BENCH_RATE", "2000"))
IDLE_SECONDS = 5.0
CITY = "010"
RIDERS = [f"138{i:08d}" for i in range(300)]
CUSTOMERS = [f"139{i:08d}" for i in range(3_000)]
SETTINGS = AllocationSettings.from_env(Env({}))
RETENTION_MS = round(SETTINGS.history_retention_seconds * 1000)
LEASE_MS = 600_000


@dataclass(frozen=True)
class Target:
    """One configuration: a pool on a Redis, and which primary (index into `primaries`) serves each sub-pool."""

    name: str
    tenant: str
    primaries: tuple[tuple[str, int], ...]  # (host, port) of every primary of the Redis
    keys: tuple[str, ...]  # the pool's sub-pool base keys
    served_by: tuple[int, ...]  # primary index of each sub-pool


@dataclass
class Tally:
    allocations: int = 0
    exhausted: int = 0
    wall: float = 0.0
    cpu: list[float] = field(default_factory=list)  # per primary
    busy: list[float] = field(default_factory=list)  # per primary, less its idle CPU over the same time
    replica_cpu: float = 0.0
    calls: list[int] = field(default_factory=list)  # EVALSHA per primary
    usec: list[int] = field(default_factory=list)  # EVALSHA microseconds per primary
    commands: list[int] = field(default_factory=list)  # commands executed per primary (scripts' inner ones too)

    def add(self, other: Tally) -> None:
        self.allocations += other.allocations
        self.exhausted += other.exhausted
        self.wall += other.wall
        self.replica_cpu += other.replica_cpu
        self.cpu = [a + b for a, b in zip(self.cpu or [0.0] * len(other.cpu), other.cpu, strict=True)]
        self.busy = [a + b for a, b in zip(self.busy or [0.0] * len(other.busy), other.busy, strict=True)]
        self.calls = [a + b for a, b in zip(self.calls or [0] * len(other.calls), other.calls, strict=True)]
        self.usec = [a + b for a, b in zip(self.usec or [0] * len(other.usec), other.usec, strict=True)]
        self.commands = [a + b for a, b in zip(self.commands or [0] * len(other.commands), other.commands, strict=True)]

    @property
    def per_busiest_cpu_second(self) -> float:
        return self.allocations / max(self.cpu)

    @property
    def per_busiest_busy_second(self) -> float:
        return self.allocations / max(self.busy)

    @property
    def per_busiest_thousand_commands(self) -> float:
        return self.allocations / (max(self.commands) / 1000)


def _command(*parts: str | int) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode() if isinstance(part, str) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _client(target: Target, sha: str, seed: int, count: int, queue: Any) -> None:
    """One client process: `count` allocations, DEPTH per primary per round trip; puts (made, exhausted, errors)."""
    rng = random.Random(seed)
    used = sorted(set(target.served_by))
    sockets = {}
    readers = {}
    for index in used:
        sock = socket.create_connection(target.primaries[index])
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sockets[index] = sock
        readers[index] = hiredis.Reader()
    keys_of = {index: [k for k, s in zip(target.keys, target.served_by, strict=True) if s == index] for index in used}
    turn = rng.randrange(SUBPOOLS)
    made = exhausted = errors = 0
    first_error = ""
    sent = 0
    started = time.perf_counter()
    while sent < count:
        ahead = started + sent / (RATE / CLIENTS) - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
        batch = {}
        for index in used:
            commands = []
            for _ in range(min(DEPTH, count - sent)):
                keys = keys_of[index]
                key = keys[turn % len(keys)]
                turn += 1
                mode = "AXN" if rng.random() < 0.2 else "AXB"
                a = rng.choice(RIDERS)
                b = "" if mode == "AXN" else rng.choice(CUSTOMERS)
                rid = f"{rng.getrandbits(64):016x}"
                args = (target.tenant, CITY, RETENTION_MS, mode, a, b, LEASE_MS)
                settings = (SETTINGS.max_bindings_per_number, SETTINGS.target_bindings_per_number, rid)
                tail = (rng.randrange(10_000), SETTINGS.candidates, SETTINGS.sweep_batch)
                commands.append(_command("EVALSHA", sha, 1, key, *args, *settings, *tail))
                sent += 1
            if commands:
                batch[index] = len(commands)
                sockets[index].sendall(b"".join(commands))
        for index, expected in batch.items():
            reader = readers[index]
            got = 0
            while got < expected:
                reply = reader.gets()
                if reply is False:
                    reader.feed(sockets[index].recv(1 << 16))
                    continue
                got += 1
                if isinstance(reply, list) and reply[0] == b"ok":
                    made += 1
                elif isinstance(reply, list) and reply[0] == b"exhausted":
                    exhausted += 1
                else:
                    errors += 1
                    first_error = first_error or repr(reply)[:200]
    for sock in sockets.values():
        sock.close()
    queue.put((made, exhausted, errors, first_error))


def _cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def _evalsha(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def idle_rates(clients: Sequence[redis.Redis]) -> list[float]:
    """CPU-seconds per second each Redis spends with no commands to run."""
    before = [_cpu(c) for c in clients]
    time.sleep(IDLE_SECONDS)
    return [(_cpu(c) - b) / IDLE_SECONDS for c, b in zip(clients, before, strict=True)]


def measure(
    target: Target,
    sha: str,
    primaries: Sequence[redis.Redis],
    replicas: Sequence[redis.Redis],
    idle: Sequence[float],
) -> Tally:
    for client in primaries:
        client.config_resetstat()
    cpu_before = [_cpu(c) for c in primaries]
    commands_before = [_commands(c) for c in primaries]
    replica_before = sum(_cpu(c) for c in replicas)
    queue: Any = multiprocessing.Queue()
    share = ALLOCATIONS // CLIENTS
    children = [
        multiprocessing.Process(target=_client, args=(target, sha, random.randrange(1 << 30), share, queue))
        for _ in range(CLIENTS)
    ]
    started = time.perf_counter()
    for child in children:
        child.start()
    results = [queue.get(timeout=600) for _ in children]
    wall = time.perf_counter() - started
    for child in children:
        child.join()
    made = sum(r[0] for r in results)
    errors = sum(r[2] for r in results)
    if errors:
        raise SystemExit(f"{target.name}: {errors} allocate.lua calls failed, e.g. {[r[3] for r in results if r[3]]}")
    cpu = [_cpu(c) - before for c, before in zip(primaries, cpu_before, strict=True)]
    # Less the INFO commands of this measurement (2 before, 1 after on each primary; the resetstat is before).
    commands = [_commands(c) - before - 3 for c, before in zip(primaries, commands_before, strict=True)]
    evalsha = [_evalsha(c) for c in primaries]
    return Tally(
        allocations=made,
        exhausted=sum(r[1] for r in results),
        wall=wall,
        cpu=cpu,
        busy=[used - rate * wall for used, rate in zip(cpu, idle, strict=True)],
        replica_cpu=sum(_cpu(c) for c in replicas) - replica_before,
        calls=[calls for calls, _ in evalsha],
        commands=commands,
        usec=[usec for _, usec in evalsha],
    )


async def import_pool(client: RedisClient, mode: str, tenant: str, subpools: int, prefix: str) -> None:
    settings = AllocationSettings.from_env(
        Env({"NUMPROTECT_REDIS_MODE": mode, "NUMPROTECT_ALLOCATION_SUBPOOLS": str(subpools)})
    )
    limit = ConcurrencyLimit.for_redis(RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": "redis://127.0.0.1/0"})))
    pools = NumberPools(client, settings, Scripts.load(), redis_limit=limit)
    for b in range(BLOCKS):
        await pools.import_block(f"700{prefix}{b:06d}", tenant, CITY, "bench-carrier", "bench")
    assert (await pools.stats(tenant, CITY)).total == BLOCKS * 10_000
    # A few allocations through the service's code first: scripts loaded on every primary, the pool's record read.
    for i in range(20):
        await pools.allocate(tenant, "AXB", [RIDERS[i], CUSTOMERS[i]], CITY, True, 600.0)


def _targets(name: str, tenants: dict[int, str], primaries: list[tuple[str, int]], node_of: Any) -> list[Target]:
    out = []
    for subpools, tenant in tenants.items():
        keys = PoolLayout.of(tenant, CITY, subpools).keys
        served = tuple(node_of(key) for key in keys)
        out.append(Target(f"{name}, pool of {subpools}", tenant, tuple(primaries), keys, served))
    return out


MEASURES = (
    ("INFO cpu", "per_busiest_cpu_second", "CPU-second"),
    ("INFO cpu less idle", "per_busiest_busy_second", "CPU-second"),
    ("commands executed", "per_busiest_thousand_commands", "1,000 commands"),
)


def _report(tallies: dict[str, Tally], targets: dict[str, Target]) -> None:
    for name, tally in tallies.items():
        target = targets[name]
        figures = "; ".join(f"{label} {getattr(tally, attr):,.0f} per {unit}" for label, attr, unit in MEASURES)
        print(
            f"\n{name}: {tally.allocations:,} allocations ({tally.exhausted} exhausted) in {tally.wall:.1f}s wall "
            f"({tally.allocations / tally.wall:,.0f}/s); allocations of the busiest primary by {figures}"
        )
        total_calls = sum(tally.calls) or 1
        for index, (host, port) in enumerate(target.primaries):
            subpools = [k for k, s in enumerate(target.served_by) if s == index]
            calls = tally.calls[index]
            if calls:
                per_call = (
                    f"per call {1e6 * tally.cpu[index] / calls:5.1f} / {1e6 * tally.busy[index] / calls:5.1f} us CPU "
                    f"(as read / less idle), {tally.commands[index] / calls:4.1f} commands, "
                    f"{tally.usec[index] / calls:6.1f} us EVALSHA time"
                )
            else:
                per_call = f"{tally.commands[index]} commands"
            print(
                f"  primary {host}:{port}: sub-pools {subpools or '-'}, {100 * calls / total_calls:5.1f} % of the "
                f"EVALSHA calls, CPU {tally.cpu[index]:5.2f}s ({tally.busy[index]:5.2f}s less idle); {per_call}"
            )
        if tally.replica_cpu:
            print(f"  replicas: CPU {tally.replica_cpu:.2f}s together")
    best = tallies[f"3-primary cluster, pool of {SUBPOOLS}"]
    bases = (
        ("pool of 1 on one Redis", tallies["one Redis, pool of 1"]),
        ("pool of 1 on the same cluster", tallies["3-primary cluster, pool of 1"]),
    )
    print(f"\ncapacity ratio, pool of {SUBPOOLS} on the 3-primary cluster (allocations of its busiest primary)")
    for label, attr, unit in MEASURES:
        ratios = "; ".join(f"/ {base} {getattr(best, attr) / getattr(tally, attr):.2f}" for base, tally in bases)
        one = tallies[f"one Redis, pool of {SUBPOOLS}"]
        alone = getattr(one, attr) / getattr(tallies["one Redis, pool of 1"], attr)
        print(f"  per {unit:14} ({label}): {ratios}   (pool of {SUBPOOLS} / pool of 1 on one Redis: {alone:.2f})")


def _per_round(rounds: list[dict[str, Tally]]) -> None:
    """The ratios of each round (its four configurations measured within seconds of each other, so under about the
    same load from the rest of the machine): median and range over the rounds."""
    best, one, same = f"3-primary cluster, pool of {SUBPOOLS}", "one Redis, pool of 1", "3-primary cluster, pool of 1"
    print(f"\nper round, pool of {SUBPOOLS} on the cluster / pool of 1 (median, min-max over {len(rounds)} rounds):")
    for label, attr, _ in MEASURES:
        shown = []
        for base_label, base in (("one Redis", one), ("same cluster", same)):
            ratios = sorted(getattr(r[best], attr) / getattr(r[base], attr) for r in rounds)
            shown.append(f"/ {base_label} {statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})")
        print(f"  {label:18}: {'; '.join(shown)}")


def main() -> None:
    multiprocessing.set_start_method("fork")
    sha = hashlib.sha1(Scripts.load().allocate.source.encode()).hexdigest()
    standalone = RedisServer()
    cluster = RedisClusterServers()
    for node in cluster.nodes:
        # A primary starved of CPU by the loaded host must not be failed over in the middle of a round (the tests'
        # cluster gives a node 2 s).
        node.client().config_set("cluster-node-timeout", 30_000)
    try:
        one = standalone.client()
        masters = [n for n in cluster.nodes if n.client().info("replication")["role"] == "master"]
        replicas = [n for n in cluster.nodes if n not in masters]
        tenants = {1: "hot1", SUBPOOLS: "hot3"}

        async def imports() -> None:
            standalone_async = Redis.from_url(standalone.url)
            cluster_async = RedisCluster.from_url(cluster.url)
            for subpools, tenant in tenants.items():
                await import_pool(standalone_async, "standalone", tenant, subpools, f"1{subpools}")
                await import_pool(cluster_async, "cluster", tenant, subpools, f"2{subpools}")
            await standalone_async.aclose()
            await cluster_async.aclose()

        asyncio.run(imports())
        one_master = _targets("one Redis", tenants, [("127.0.0.1", standalone.port)], lambda key: 0)
        master_ports = [m.port for m in masters]

        def primary_of(key: str) -> int:
            return master_ports.index(cluster.master_of(key).port)

        on_cluster = _targets("3-primary cluster", tenants, [("127.0.0.1", port) for port in master_ports], primary_of)
        targets = {t.name: t for t in [*one_master, *on_cluster]}
        master_clients = [m.client() for m in masters]
        clients = {
            **{t.name: ([one], []) for t in one_master},
            **{t.name: (master_clients, [r.client() for r in replicas]) for t in on_cluster},
        }
        idle = dict(zip(["one", "masters"], [idle_rates([one]), idle_rates(master_clients)], strict=True))
        print(
            f"idle CPU (ms per second): one Redis {1000 * idle['one'][0]:.1f}; cluster primaries "
            + ", ".join(f"{1000 * rate:.1f}" for rate in idle["masters"]),
            flush=True,
        )
        tallies: dict[str, Tally] = {name: Tally() for name in targets}
        rounds: list[dict[str, Tally]] = []
        order = list(targets)
        for round_no in range(ROUNDS):
            rounds.append({})
            for name in order if round_no % 2 == 0 else reversed(order):
                primaries, replica_clients = clients[name]
                rates = idle["one"] if primaries == [one] else idle["masters"]
                tally = measure(targets[name], sha, primaries, replica_clients, rates)
                print(
                    f"round {round_no + 1} {name}: {tally.allocations:,} in {tally.wall:.1f}s, busiest primary "
                    f"{max(tally.cpu):.2f} CPU-s ({max(tally.busy):.2f} less idle) -> "
                    f"{tally.per_busiest_cpu_second:,.0f} ({tally.per_busiest_busy_second:,.0f}) allocations/CPU-s",
                    flush=True,
                )
                tallies[name].add(tally)
                rounds[-1][name] = tally
    finally:
        cluster.stop()
        standalone.stop()
    print(
        f"\none hot pool: {BLOCKS * 10_000:,} numbers, redis-server {redis_version()}, {CLIENTS} client processes x "
        f"pipelines of {DEPTH} per primary, {RATE:,} allocations/s, {ROUNDS} alternating rounds of "
        f"{ALLOCATIONS:,} allocations per configuration (4 AXB : 1 AXN), load average {os.getloadavg()[0]:.1f} at "
        "the end"
    )
    _report(tallies, targets)
    _per_round(rounds)


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else "?"


if __name__ == "__main__":
    main()
