"""Binding benchmark: creations per second against the health-check ceiling, and Redis memory per live AXB binding.

Starts a redis-server, the allocation and the binding service as processes (one each), imports number blocks,
then, with the same client concurrency against the same binding server:
  1. Health/Check for HEALTH_SECONDS: the ceiling of this server, client and machine (no work behind it);
  2. CreateBinding (AXB, distinct parties and orders) for CREATE_SECONDS: creations per second;
  3. more creations until MEMORY_TARGET live bindings exist (or MEMORY_BUDGET_SECONDS pass), then
     INFO memory used_memory delta / live bindings, with a per-key-family breakdown (MEMORY USAGE).
Run: python -m benchmarks.bench_binding  (or make bench BENCH_ARGS=binding). Environment overrides:
NUMPROTECT_BENCH_CONCURRENCY, NUMPROTECT_BENCH_MEMORY_TARGET, NUMPROTECT_BENCH_MEMORY_BUDGET.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.harness import cpu_seconds, free_port, process, redis_server_args, wait_redis, wait_serving
from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.common.v1 import common_pb2

TENANT = "bench"
CITY = "010"
BLOCKS = ("70020000000", "70020000001", "70020000002")
HEALTH_SECONDS = 6.0
CREATE_SECONDS = 12.0
ROUNDS = 3
CHANNELS = 4


@dataclass
class Counter:
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


async def run_for(
    seconds: float | None, concurrency: int, call: Callable[[int], Awaitable[Any]], *, limit: int | None = None
) -> tuple[Counter, float]:
    """Runs `call(i)` from `concurrency` workers until `seconds` pass or `limit` calls started."""
    counter = Counter()
    started = time.perf_counter()
    stop_at = started + seconds if seconds is not None else float("inf")
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while time.perf_counter() < stop_at and (limit is None or next_index < limit):
            index = next_index
            next_index += 1
            begin = time.perf_counter()
            try:
                await call(index)
            except grpc.aio.AioRpcError as exc:
                counter.errors[exc.code().name] = counter.errors.get(exc.code().name, 0) + 1
                continue
            counter.ok += 1
            counter.latencies.append(time.perf_counter() - begin)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counter, time.perf_counter() - started


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def key_family(key: bytes) -> str:
    text = key.decode()
    for prefix, name in (
        ("np:b:", "binding record np:b"),
        ("np:rt:", "routes np:rt"),
        ("np:nh:", "number history np:nh"),
        ("np:ord:", "order keys np:ord"),
        ("np:tl:", "tenant index np:tl"),
        ("np:alloc:", "allocation np:alloc"),
    ):
        if text.startswith(prefix):
            return name
    return "other"


def memory_by_family(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """(keys, MEMORY USAGE bytes) per key family, over every key."""
    totals: dict[str, list[int]] = {}
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
        for key, used in zip(batch, pipe.execute(), strict=True):
            family = totals.setdefault(key_family(key), [0, 0])
            family[0] += 1
            family[1] += int(used or 0)
        batch.clear()

    for key in client.scan_iter(count=5000):
        batch.append(key)
        if len(batch) >= 2000:
            flush()
    if batch:
        flush()
    return {name: (v[0], v[1]) for name, v in totals.items()}


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class CpuMeter:
    """CPU seconds used by the binding server, the allocation server and Redis over the measured phases."""

    binding_pid: int
    allocation_pid: int
    redis_client: redis.Redis
    used: dict[str, list[float]] = field(default_factory=dict)

    def sample(self) -> tuple[float, float, float]:
        return cpu_seconds(self.binding_pid), cpu_seconds(self.allocation_pid), redis_cpu_seconds(self.redis_client)

    def add(self, phase: str, before: tuple[float, float, float]) -> None:
        after = self.sample()
        totals = self.used.setdefault(phase, [0.0, 0.0, 0.0])
        for i in range(3):
            totals[i] += after[i] - before[i]


async def bench(
    binding_address: str, allocation_address: str, redis_client: redis.Redis, binding_pid: int, allocation_pid: int
) -> None:
    concurrency = int(os.environ.get("NUMPROTECT_BENCH_CONCURRENCY", "64"))
    memory_target = int(os.environ.get("NUMPROTECT_BENCH_MEMORY_TARGET", "100000"))
    memory_budget = float(os.environ.get("NUMPROTECT_BENCH_MEMORY_BUDGET", "80"))
    channels = [grpc.aio.insecure_channel(binding_address) for _ in range(CHANNELS)]
    async with grpc.aio.insecure_channel(allocation_address) as alloc_channel:
        allocation: Any = allocation_pb2_grpc.AllocationServiceStub(alloc_channel)
        for block in BLOCKS:
            await allocation.ImportBlock(
                allocation_pb2.ImportBlockRequest(
                    block=block, tenant_id=TENANT, city_code=CITY, actor="bench", carrier_id="bench-carrier"
                )
            )
    health: list[Any] = [health_pb2_grpc.HealthStub(c) for c in channels]
    stubs: list[Any] = [binding_pb2_grpc.BindingServiceStub(c) for c in channels]
    check = health_pb2.HealthCheckRequest()

    async def health_call(i: int) -> None:
        await health[i % CHANNELS].Check(check, timeout=10)

    async def create_call(i: int) -> None:
        request = binding_pb2.CreateBindingRequest(
            tenant_id=TENANT,
            out_order_id=f"order-{i}",
            mode=common_pb2.BINDING_MODE_AXB,
            party_a=f"138{i:08d}",
            party_b=f"139{i:08d}",
            city_code=CITY,
            user_consent=True,
        )
        await stubs[i % CHANNELS].CreateBinding(request, timeout=30)

    async def create_call_at(start: int, i: int) -> None:
        await create_call(start + i)

    await run_for(1.0, concurrency, health_call)  # warm-up
    baseline = int(redis_client.info("memory")["used_memory"])
    baseline_keys = memory_by_family(redis_client)

    # Interleaved rounds, so that a change of machine load (the box is shared) hits both rates alike.
    health_counter, create_counter = Counter(), Counter()
    health_elapsed = create_elapsed = 0.0
    offset = 0
    rounds = []
    meter = CpuMeter(binding_pid, allocation_pid, redis_client)
    for _ in range(ROUNDS):
        before = meter.sample()
        h, h_elapsed = await run_for(HEALTH_SECONDS / ROUNDS, concurrency, health_call)
        meter.add("health", before)
        before = meter.sample()
        c, c_elapsed = await run_for(CREATE_SECONDS / ROUNDS, concurrency, functools.partial(create_call_at, offset))
        meter.add("create", before)
        offset += c.ok + sum(c.errors.values())
        rounds.append((h.ok / h_elapsed, c.ok / c_elapsed))
        for total, part in ((health_counter, h), (create_counter, c)):
            total.ok += part.ok
            total.latencies += part.latencies
            for code, count in part.errors.items():
                total.errors[code] = total.errors.get(code, 0) + count
        health_elapsed += h_elapsed
        create_elapsed += c_elapsed
    health_rate = health_counter.ok / health_elapsed
    create_rate = create_counter.ok / create_elapsed
    total_created = create_counter.ok

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"client concurrency {concurrency} over {CHANNELS} channels; 1 binding + 1 allocation process; "
        f"{os.cpu_count()} CPUs shared by Redis, both services and this client; load average {load}"
    )
    print(
        f"health checks/s (binding server, {HEALTH_SECONDS:g}s in {ROUNDS} rounds): {health_rate:,.0f}  "
        f"p50 {percentile(health_counter.latencies, 0.5) * 1000:.2f} ms"
    )
    print(
        f"binding creations/s (AXB, {CREATE_SECONDS:g}s in {ROUNDS} rounds): {create_rate:,.0f}  "
        f"p50 {percentile(create_counter.latencies, 0.5) * 1000:.2f} ms  "
        f"p99 {percentile(create_counter.latencies, 0.99) * 1000:.2f} ms  errors {create_counter.errors or 0}"
    )
    print(f"ratio creations / health-check ceiling: {create_rate / health_rate:.3f}")
    # CPU per call does not depend on how busy the shared machine is: the capacity ratio it implies is the
    # load-independent figure (a create needs the binding server's CPU plus allocation's and Redis's).
    b_health = meter.used["health"][0] / max(1, health_counter.ok)
    b_create, a_create, r_create = (x / max(1, create_counter.ok) for x in meter.used["create"])
    print(
        f"CPU per health check (binding server): {b_health * 1e6:,.0f} us; per create: binding server "
        f"{b_create * 1e6:,.0f} us, allocation server {a_create * 1e6:,.0f} us, Redis {r_create * 1e6:,.0f} us"
    )
    print(
        f"CPU-bound ratio on the binding server (health CPU / create CPU): {b_health / b_create:.3f}; "
        f"whole create path (binding + allocation + Redis, one core each): "
        f"{b_health / max(b_create, a_create, r_create):.3f}"
    )
    per_round = "; ".join(f"{h:,.0f}, {c:,.0f}, {c / h:.3f}" for h, c in rounds)
    print(f"  per round (health/s, creations/s, ratio): {per_round}")

    remaining = max(0, memory_target - total_created)
    fill_counter, fill_elapsed = await run_for(
        memory_budget, concurrency, lambda i: create_call(offset + i), limit=remaining
    )
    total_created += fill_counter.ok
    used = int(redis_client.info("memory")["used_memory"])
    families = memory_by_family(redis_client)
    per_binding = (used - baseline) / total_created
    print(
        f"\nlive AXB bindings created through the service: {total_created:,} "
        f"(fill phase {fill_counter.ok:,} in {fill_elapsed:.0f}s, errors {fill_counter.errors or 0})"
    )
    print(
        f"used_memory delta: {used - baseline:,} bytes -> {per_binding:,.0f} bytes per live AXB binding "
        "(all its keys: record, routes, history, order key, tenant index, allocation reservation)"
    )
    if total_created < memory_target:
        print(
            f"(target was {memory_target:,}; {total_created:,} created in the time budget; "
            f"linear extrapolation to {memory_target:,}: {per_binding * memory_target / 2**20:,.0f} MiB)"
        )
    else:
        print(f"for {total_created:,} bindings: {(used - baseline) / 2**20:,.1f} MiB")
    print("MEMORY USAGE by key family (delta over the imported pools; bytes per binding):")
    for name in sorted(families):
        keys, size = families[name]
        base_keys, base_size = baseline_keys.get(name, (0, 0))
        print(
            f"  {name:24s} keys +{keys - base_keys:>8,}  bytes +{size - base_size:>12,}  "
            f"per binding {(size - base_size) / total_created:8.1f}"
        )
    for channel in channels:
        await channel.close(None)


def main() -> int:
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        print("redis-server not found: run `make system-deps`", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="numprotect-bench-binding-"))
    redis_port, allocation_port, binding_port = free_port(), free_port(), free_port()
    common = {
        **os.environ,
        # What this bench measures is the service's own work: plaintext and no identity checks (TLS and
        # token checks have their comparison in bench_translation, the hot path).
        "NUMPROTECT_TLS": "off",
        "NUMPROTECT_AUTH": "off",
        "NUMPROTECT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "NUMPROTECT_LOG_LEVEL": "WARNING",
        "NUMPROTECT_ALLOCATION_PORT": str(allocation_port),
        "NUMPROTECT_BINDING_PORT": str(binding_port),
        "NUMPROTECT_ALLOCATION_ADDR": f"127.0.0.1:{allocation_port}",
    }
    redis_args = redis_server_args(redis_binary, redis_port, workdir, "--appendonly", "no")
    try:
        with process(redis_args, common, workdir / "redis.log"):
            redis_client = wait_redis(redis_port)
            allocation_log, binding_log = workdir / "allocation.log", workdir / "binding.log"
            with process(
                [sys.executable, "-m", "numprotect.services.allocation"], common, allocation_log
            ) as allocation:
                wait_serving(f"127.0.0.1:{allocation_port}", allocation, allocation_log)
                with process([sys.executable, "-m", "numprotect.services.binding"], common, binding_log) as binding:
                    wait_serving(f"127.0.0.1:{binding_port}", binding, binding_log)
                    try:
                        import uvloop

                        uvloop.install()
                    except ImportError:  # pragma: no cover
                        pass
                    asyncio.run(
                        bench(
                            f"127.0.0.1:{binding_port}",
                            f"127.0.0.1:{allocation_port}",
                            redis_client,
                            binding.pid,
                            allocation.pid,
                        )
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
