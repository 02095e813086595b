"""Closed-loop load from asyncio workers, its outcome (calls, errors by code, latencies), and the CPU that processes
and Redis used meanwhile: the pieces a benchmark of gRPC calls against service processes needs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis

from benchmarks.harness import cpu_seconds


class Exhausted(Exception):
    """Raised by a call when it has nothing left to work on (e.g. no binding left to delete): its worker stops."""


@dataclass
class Outcome:
    """Successful calls, failed calls by status code (with the first failure's details), latencies of successes."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def fail(self, exc: grpc.aio.AioRpcError) -> None:
        code = exc.code().name
        self.errors[code] = self.errors.get(code, 0) + 1
        self.first_error.setdefault(code, str(exc.details())[:200])

    def add(self, other: Outcome) -> None:
        self.ok += other.ok
        self.latencies += other.latencies
        for code, count in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + count
        for code, details in other.first_error.items():
            self.first_error.setdefault(code, details)

    @property
    def calls(self) -> int:
        return self.ok + sum(self.errors.values())

    def percentile_ms(self, fraction: float) -> float:
        return percentile(self.latencies, fraction) * 1000


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def run_for(
    seconds: float | None, concurrency: int, call: Callable[[int], Awaitable[Any]], *, limit: int | None = None
) -> tuple[Outcome, float]:
    """Runs `call(i)` from `concurrency` workers until `seconds` pass, `limit` calls started or the calls raise
    Exhausted; returns the outcome and the seconds it took."""
    outcome = Outcome()
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
                outcome.fail(exc)
                continue
            except Exhausted:
                return
            outcome.ok += 1
            outcome.latencies.append(time.perf_counter() - begin)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcome, time.perf_counter() - started


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class CpuMeter:
    """CPU seconds of named processes (/proc) and of Redis (INFO cpu), summed per phase over its measured windows."""

    processes: dict[str, int]
    redis_client: redis.Redis
    used: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.processes, "Redis")

    def sample(self) -> dict[str, float]:
        sample = {name: cpu_seconds(pid) for name, pid in self.processes.items()}
        sample["Redis"] = redis_cpu_seconds(self.redis_client)
        return sample

    def add(self, phase: str, before: dict[str, float]) -> None:
        after = self.sample()
        totals = self.used.setdefault(phase, dict.fromkeys(self.names, 0.0))
        for name in self.names:
            totals[name] += after[name] - before[name]

    def per_call(self, phase: str, calls: int) -> dict[str, float]:
        """Seconds per call of each process in `phase` (0 for a phase never measured)."""
        totals = self.used.get(phase, dict.fromkeys(self.names, 0.0))
        return {name: seconds / max(1, calls) for name, seconds in totals.items()}
