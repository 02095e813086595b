"""Tracing benchmark: the throughput cost of tracing on Translate, as ratios against tracing off in the same run.

Starts a redis-server, seeds SEED_ROUTES AXB routes with RouteTable, starts an OTLP/gRPC trace receiver in
this process and translation processes in five configurations that differ only in tracing:
  off      no OTEL_EXPORTER_OTLP_ENDPOINT (no provider, no interceptor, no Redis instrumentation);
  none_sampled  endpoint set, OTEL_TRACES_SAMPLER=parentbased_always_off: what every call pays for the
           sampling decision and the interceptor alone, with nothing recorded or exported;
  default  endpoint set, no sampler variable: our default parentbased_traceidratio at 0.01;
  ten_percent  the same sampler at 0.1 (OTEL_TRACES_SAMPLER_ARG), the default before 2026-11-28;
  full     endpoint set, OTEL_TRACES_SAMPLER=always_on (100%).
Each configuration runs in NUMPROTECT_BENCH_TRACING_PROCESSES processes (default 3: identical processes differ
by a few percent here, as much as the cost measured). Then h2load drives Translate (body = 0x00 + 4-byte
big-endian length + serialized TranslateRequest, headers content-type: application/grpc and te: trailers)
against each process, in interleaved rounds so that a change of machine load hits all of them alike; the report
gives the median req/s and the median server CPU time per call of each configuration, as ratios to off.
Every request is a CONNECT (rate limits raised so one repeated request is never limited; checked after).

Run: python -m benchmarks.bench_tracing (or make bench BENCH_ARGS=tracing). Environment overrides:
NUMPROTECT_BENCH_TRACING_SECONDS (per round and process, default 5), NUMPROTECT_BENCH_TRACING_ROUNDS (3),
NUMPROTECT_BENCH_CLIENTS (h2load -c, 4), NUMPROTECT_BENCH_STREAMS (h2load -m, 16).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import redis
import redis.asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from benchmarks.harness import cpu_seconds, free_port, process, redis_server_args, wait_redis, wait_serving
from numprotect.core.routes import MODE_AXB, RESTRICTION_NONE, Route, RouteTable
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc

SEED_ROUTES = 3000
TRANSLATE_PATH = "/numprotect.translation.v1.TranslationService/Translate"
CONFIGS = ("off", "none_sampled", "default", "ten_percent", "full")
_RATE = re.compile(r"finished in [\d.]+\w*, ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed")


def virtual_number(i: int) -> str:
    return f"7003{i:011d}"


def party(prefix: str, i: int) -> str:
    return f"{prefix}{i:08d}"


class SpanCounter(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that counts spans per service.name (what a collector would receive)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(  # noqa: N802
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                name = next(
                    (kv.value.string_value for kv in resource_spans.resource.attributes if kv.key == "service.name"), ""
                )
                spans = sum(len(scope.spans) for scope in resource_spans.scope_spans)
                self.counts[name] = self.counts.get(name, 0) + spans
        return trace_service_pb2.ExportTraceServiceResponse()

    def count(self, name: str) -> int:
        with self._lock:
            return self.counts.get(name, 0)


async def seed(url: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    table = RouteTable(client)
    expire_ms = int(time.time() * 1000) + 3_600_000
    semaphore = asyncio.Semaphore(64)

    async def put(i: int) -> None:
        route = Route(
            f"bench-{i}", "bench", MODE_AXB, party("138", i), party("139", i), RESTRICTION_NONE, False, False, expire_ms
        )
        async with semaphore:
            await table.put(virtual_number(i), route)

    await asyncio.gather(*(put(i) for i in range(SEED_ROUTES)))
    await client.aclose()


def grpc_frame(message: Any) -> bytes:
    payload: bytes = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def h2load(address: str, body: Path, seconds: float, clients: int, streams: int) -> tuple[float, int, int]:
    """(req/s, requests done, requests failed) of one h2load run against Translate."""
    result = subprocess.run(
        [
            "h2load",
            "-D",
            f"{seconds:g}",
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-t",
            "1",
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"http://{address}{TRANSLATE_PATH}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    rate = _RATE.search(result.stdout)
    requests = _REQUESTS.search(result.stdout)
    if result.returncode != 0 or rate is None or requests is None:
        raise RuntimeError(f"h2load failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return float(rate.group(1)), int(requests.group(3)), int(requests.group(5))


def check_connects(address: str, index: int) -> None:
    """One Translate through grpcio: the benchmarked request still CONNECTs (not rate limited, not rejected)."""
    with grpc.insecure_channel(address) as channel:
        stub: Any = translation_pb2_grpc.TranslationServiceStub(channel)
        reply = stub.Translate(
            translation_pb2.TranslateRequest(
                calling_number=party("138", index), called_number=virtual_number(index), call_id="check"
            ),
            timeout=10,
        )
    if reply.decision != translation_pb2.DECISION_CONNECT:
        raise RuntimeError(f"Translate at {address} answered {reply}")


def main() -> int:
    if shutil.which("redis-server") is None or shutil.which("h2load") is None:
        print("redis-server and h2load are needed: run `make system-deps`", file=sys.stderr)
        return 2
    seconds = float(os.environ.get("NUMPROTECT_BENCH_TRACING_SECONDS", "5"))
    rounds = int(os.environ.get("NUMPROTECT_BENCH_TRACING_ROUNDS", "3"))
    processes = int(os.environ.get("NUMPROTECT_BENCH_TRACING_PROCESSES", "3"))
    clients = int(os.environ.get("NUMPROTECT_BENCH_CLIENTS", "4"))
    streams = int(os.environ.get("NUMPROTECT_BENCH_STREAMS", "16"))
    work = Path(tempfile.mkdtemp(prefix="numprotect-bench-tracing-"))
    receiver = SpanCounter()
    try:
        with ExitStack() as stack:
            redis_port = free_port()
            redis_args = redis_server_args("redis-server", redis_port, work)
            stack.enter_context(process(redis_args, dict(os.environ), work / "redis.log"))
            wait_redis(redis_port)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            asyncio.run(seed(redis_url))

            base = {
                key: value
                for key, value in os.environ.items()
                if not key.startswith("OTEL_") and not key.startswith("NUMPROTECT_")
            }
            base.update(
                {
                    # What this bench measures is the service's own work: plaintext and no identity checks (TLS and
                    # token checks have their comparison in bench_translation, the hot path).
                    "NUMPROTECT_TLS": "off",
                    "NUMPROTECT_AUTH": "off",
                    "NUMPROTECT_REDIS_URL": redis_url,
                    "NUMPROTECT_LOG_LEVEL": "WARNING",
                    "NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "1000000",
                    "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "1000000",
                    "NUMPROTECT_TRANSLATION_RATE_WINDOW": "1s",
                }
            )
            tracing = {
                "off": {},
                "none_sampled": {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                    "OTEL_SERVICE_NAME": "bench-none_sampled",
                    "OTEL_TRACES_SAMPLER": "parentbased_always_off",
                },
                "default": {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                    "OTEL_SERVICE_NAME": "bench-default",
                },
                "ten_percent": {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                    "OTEL_SERVICE_NAME": "bench-ten_percent",
                    "OTEL_TRACES_SAMPLER_ARG": "0.1",
                },
                "full": {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                    "OTEL_SERVICE_NAME": "bench-full",
                    "OTEL_TRACES_SAMPLER": "always_on",
                },
            }
            # Several processes per configuration: identical processes differ by a few percent here (hash seeds,
            # memory layout, scheduling), as much as the cost being measured; a median over processes evens it out.
            units = [(config, n) for n in range(processes) for config in CONFIGS]
            addresses: dict[tuple[str, int], str] = {}
            pids: dict[tuple[str, int], int] = {}
            for unit in units:
                config, n = unit
                port = free_port()
                env = {**base, **tracing[config], "NUMPROTECT_TRANSLATION_PORT": str(port)}
                log = work / f"translation-{config}-{n}.log"
                child = stack.enter_context(
                    process([sys.executable, "-m", "numprotect.services.translation"], env, log)
                )
                addresses[unit] = f"127.0.0.1:{port}"
                pids[unit] = child.pid
                wait_serving(addresses[unit], child, log)

            index = 7
            body = work / "translate.bin"
            body.write_bytes(
                grpc_frame(
                    translation_pb2.TranslateRequest(
                        calling_number=party("138", index), called_number=virtual_number(index), call_id="bench-call"
                    )
                )
            )
            for unit in units:
                check_connects(addresses[unit], index)
                h2load(addresses[unit], body, 1, clients, streams)  # warm-up: connections, script cache, pools

            rates: dict[str, list[float]] = {config: [] for config in CONFIGS}
            done: dict[str, int] = dict.fromkeys(CONFIGS, 0)
            failed: dict[str, int] = dict.fromkeys(CONFIGS, 0)
            time.sleep(6)  # the warm-up's spans leave (the batch span processor exports every 5 s by default)
            spans_before = {config: receiver.count(f"bench-{config}") for config in CONFIGS}
            cpu: dict[str, float] = dict.fromkeys(CONFIGS, 0.0)
            cpu_runs: dict[str, list[float]] = {config: [] for config in CONFIGS}
            for round_number in range(rounds):
                # Rotate the order each round, so no configuration always runs first after a pause.
                shift = round_number % len(units)
                for unit in units[shift:] + units[:shift]:
                    config = unit[0]
                    cpu_before = cpu_seconds(pids[unit])
                    rate, completed, errors = h2load(addresses[unit], body, seconds, clients, streams)
                    used = cpu_seconds(pids[unit]) - cpu_before
                    cpu[config] += used
                    cpu_runs[config].append(used / max(1, completed) * 1e6)
                    rates[config].append(rate)
                    done[config] += completed
                    failed[config] += errors
            for unit in units:
                check_connects(addresses[unit], index)
            time.sleep(6)  # the batch span processor exports every 5 s by default
            spans = {config: receiver.count(f"bench-{config}") - spans_before[config] for config in CONFIGS}
    finally:
        receiver.server.stop(grace=None)
        shutil.rmtree(work, ignore_errors=True)

    off = statistics.median(rates["off"])
    cpu_per_call = {config: statistics.median(cpu_runs[config]) for config in CONFIGS}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"Translate throughput with tracing off, on with nothing sampled, at the default sampler "
        f"(parentbased_traceidratio 0.01), at 10% and at 100%: {processes} translation processes per configuration "
        f"(thread-pool server), h2load -c {clients} -m {streams}, {rounds} interleaved rounds of "
        f"{seconds:g}s on each process, {SEED_ROUTES} routes seeded; {os.cpu_count()} CPUs shared by Redis, the "
        f"{len(units)} translation processes, h2load and the OTLP receiver; load average {load}"
    )
    print("throughput: median req/s of all runs of a configuration (every process, every round)")
    for config in CONFIGS:
        median = statistics.median(rates[config])
        per_run = ", ".join(f"{r:,.0f}" for r in rates[config])
        cost = "" if config == "off" else f"  ratio to off {median / off:.3f} (cost {100 * (1 - median / off):+.1f}%)"
        print(f"  {config:12s} median {median:,.0f} req/s{cost}   runs: {per_run}")
    print("server CPU time per call, median of the runs (user+system of the translation process):")
    for config in CONFIGS:
        ratio = "" if config == "off" else f"  ratio to off {cpu_per_call[config] / cpu_per_call['off']:.3f}"
        per_run = ", ".join(f"{c:,.0f}" for c in cpu_runs[config])
        print(f"  {config:12s} {cpu_per_call[config]:,.0f} us/call{ratio}   runs: {per_run}")
    for config in CONFIGS[1:]:
        received = spans[config]
        share = received / max(1, done[config])
        print(
            f"  {config}: {received:,} spans received for {done[config]:,} calls "
            f"({share:.2f} spans per call; failed h2load requests {failed[config]})"
        )
    print(f"  off: failed h2load requests {failed['off']}")
    print("(every configuration answered CONNECT before and after the rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
