"""CDR benchmark: records per second ingested, against the health-check ceiling of the same server.

Starts a redis-server (AOF on, appendfsync everysec, as `make run`) and the cdr service as a process, writes
binding records for the call_refs, then, against the same cdr server:
  1. Health/Check for HEALTH_SECONDS with HEALTH_CONCURRENCY calls in flight: calls/s, the ceiling of this
     server, client and machine with no work behind a call;
  2. IngestCdrs, 100 records per batch, every record with a call_ref (enrichment: one pipelined lookup of
     the bindings not in the service's binding cache); the same on a second process with the cache off;
  3. IngestCdrs, 1000 records per batch, same;
  4. StreamCdrs, STREAM_RECORDS records per client stream;
  5. IngestCdrs, 100 per batch, without call_ref: enrichment through the binding history (trace_number);
  6. the same batches of 2. sent again: all duplicates.
Each phase sends fresh call_ids (pre-serialised, so the client spends little CPU) for at most PHASE_SECONDS.

Then the spread of one tenant's stream (docs/cdr.md "Buckets"): a 3-master Redis Cluster (no replicas, AOF
everysec) and two tenants, one of one stream (NUMPROTECT_CDR_STREAM_BUCKETS=1) and one of SPREAD_BUCKETS buckets,
each ingested by a cdr process of its setting (IngestCdrs, 100 per batch, call_ref, on BINDINGS numbers,
SPREAD_CONCURRENCY in flight) in SPREAD_ROUNDS interleaved rounds of SPREAD_SECONDS: per primary, the share of the
tenant's records written there (XLEN of its bucket streams, by the primary that serves each) and the Redis CPU it
used meanwhile (INFO cpu, user + sys, deltas); records/s and CPU per record of the cdr process (/proc) and of Redis
(all primaries).

Run: python -m benchmarks.bench_cdr [ingest] [spread]  (both by default; or make bench BENCH_ARGS=cdr);
NUMPROTECT_BENCH_FSYNC=always measures Redis with appendfsync always instead;
NUMPROTECT_BENCH_SPREAD_CONCURRENCY sets SPREAD_CONCURRENCY (default BATCH_CONCURRENCY).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.redis_cluster, for the spread

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.harness import cpu_seconds, free_port, process, redis_server_args, wait_redis, wait_serving
from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.binding_records import BindingRecord, BindingRecordStore
from numprotect.core.call_ref import CallRef
from numprotect.core.cdr_keys import Buckets
from numprotect.core.redis_client import create_redis
from numprotect.core.routes import MODE_AXB, RESTRICTION_NONE
from numprotect.core.settings import Env, RedisSettings

HEALTH_SECONDS = 5.0
HEALTH_CONCURRENCY = 16
PHASE_SECONDS = 10.0
BATCH_CONCURRENCY = 4
STREAM_CONCURRENCY = 2
STREAM_RECORDS = 5_000
BINDINGS = 1000
TENANT = "bench"
SPREAD_BUCKETS = 3
SPREAD_ROUNDS = 3
SPREAD_SECONDS = 5.0
SPREAD_CONCURRENCY = int(os.environ.get("NUMPROTECT_BENCH_SPREAD_CONCURRENCY", str(BATCH_CONCURRENCY)))
INGEST = "/numprotect.cdr.v1.CdrService/IngestCdrs"
STREAM = "/numprotect.cdr.v1.CdrService/StreamCdrs"


class Records:
    """Fresh, valid records: AXB calls from party B to party A through X, within the last hour."""

    def __init__(self, bindings: list[BindingRecord]) -> None:
        self.bindings = bindings
        self.next = 0
        self.now_ms = time.time_ns() // 1_000_000

    def make(self, prefix: str, *, with_ref: bool) -> cdr_pb2.CallDetailRecord:
        i = self.next
        self.next += 1
        binding = self.bindings[i % len(self.bindings)]
        start = self.now_ms - 600_000 + i % 500_000
        record = cdr_pb2.CallDetailRecord(
            call_id=f"{prefix}-{i}",
            calling_number=binding.party_b,
            called_number=binding.virtual_number,
            target_number=binding.party_a,
            display_number=binding.virtual_number,
            call_type=cdr_pb2.CALL_TYPE_PEER_TO_A,
            release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
            release_cause=16,
            unconnected_cause=cdr_pb2.UNCONNECTED_CAUSE_NONE,
            carrier_id="bench",
        )
        if with_ref:
            record.call_ref = CallRef(binding.binding_id, binding.virtual_number, start).encode()
        record.call_time.FromMilliseconds(start)
        record.ring_time.FromMilliseconds(start + 2000)
        if i % 4:
            record.answer_time.FromMilliseconds(start + 5000)
            record.release_time.FromMilliseconds(start + 5000 + (i % 300) * 1000)
        else:
            record.release_time.FromMilliseconds(start + 20_000)
        return record

    def batches(self, prefix: str, size: int, count: int, *, with_ref: bool = True) -> list[bytes]:
        return [
            cdr_pb2.IngestCdrsRequest(
                records=[self.make(prefix, with_ref=with_ref) for _ in range(size)]
            ).SerializeToString()
            for _ in range(count)
        ]


async def write_bindings(
    redis_url: str, *, mode: str = "standalone", tenant_id: str = TENANT, numbers: str = "7002000"
) -> list[BindingRecord]:
    """BINDINGS committed bindings of `tenant_id`, on the numbers `numbers` + 8 digits."""
    client = create_redis(
        RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": redis_url, "NUMPROTECT_REDIS_MODE": mode}))
    )
    store = BindingRecordStore(client)
    now = time.time_ns() // 1_000_000
    bindings = []
    for i in range(BINDINGS):
        record = BindingRecord(
            binding_id=f"{tenant_id}-b{i}",
            tenant_id=tenant_id,
            out_order_id=f"bench-o{i}",
            mode=MODE_AXB,
            party_a=f"138{i:08d}",
            party_b=f"139{i:08d}",
            virtual_number=f"{numbers}{i:08d}",
            extension="",
            city_code="010",
            call_restriction=RESTRICTION_NONE,
            recording_enabled=False,
            allow_any_caller=False,
            user_consent=True,
            create_ms=now - 3_600_000,
            expire_ms=now + 3_600_000,
            update_ms=now - 3_600_000,
            delete_ms=0,
        )
        await store.create(record, reservation_id=f"r{i}", city_fallback=False)
        await store.activate(record.binding_id)
        await store.add_to_history(record.virtual_number, record.binding_id, record.end_ms())
        bindings.append(record)
    await client.aclose()
    return bindings


async def drive(
    concurrency: int, items: list[Any], call: Callable[[Any], Awaitable[tuple[int, int]]], seconds: float
) -> tuple[int, int, float]:
    """Sends `items` from `concurrency` workers until done or `seconds` pass: (accepted, duplicates, elapsed)."""
    accepted = duplicates = 0
    queue = list(reversed(items))
    started = time.perf_counter()
    stop_at = started + seconds

    async def worker() -> None:
        nonlocal accepted, duplicates
        while queue and time.perf_counter() < stop_at:
            item = queue.pop()
            ok, dup = await call(item)
            accepted += ok
            duplicates += dup

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted, duplicates, time.perf_counter() - started


async def bench(address: str, uncached_address: str, bindings: list[BindingRecord]) -> None:
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    uncached_channel = grpc.aio.insecure_channel(uncached_address)
    uncached = uncached_channel.unary_unary(
        INGEST, request_serializer=bytes, response_deserializer=cdr_pb2.IngestCdrsResponse.FromString
    )
    health = [health_pb2_grpc.HealthStub(c) for c in channels]
    raw = bytes
    ingest = [
        c.unary_unary(INGEST, request_serializer=raw, response_deserializer=cdr_pb2.IngestCdrsResponse.FromString)
        for c in channels
    ]
    stream = [
        c.stream_unary(STREAM, request_serializer=raw, response_deserializer=cdr_pb2.StreamCdrsResponse.FromString)
        for c in channels
    ]
    records = Records(bindings)
    check = health_pb2.HealthCheckRequest()
    calls = 0
    started = time.perf_counter()
    stop_at = started + HEALTH_SECONDS

    async def health_worker(n: int) -> None:
        nonlocal calls
        while time.perf_counter() < stop_at:
            await health[n % len(health)].Check(check, timeout=10)
            calls += 1

    await asyncio.gather(*(health_worker(n) for n in range(HEALTH_CONCURRENCY)))
    ceiling = calls / (time.perf_counter() - started)
    print(
        f"health ceiling: {ceiling:,.0f} calls/s (Health/Check, {HEALTH_CONCURRENCY} in flight, {HEALTH_SECONDS:.0f}s)"
    )
    print(f"{'phase':<52} {'records':>8} {'dups':>7} {'seconds':>7} {'records/s':>10} {'vs health':>9}")

    def report(name: str, accepted: int, duplicates: int, elapsed: float) -> None:
        rate = (accepted + duplicates) / elapsed
        print(
            f"{name:<52} {accepted:>8,} {duplicates:>7,} {elapsed:>7.2f} {rate:>10,.0f} {rate / ceiling:>8.2f}x",
            flush=True,
        )

    counter = 0
    retries: dict[str, int] = {}

    async def send(batch: bytes, *, cache: bool = True) -> tuple[int, int]:
        nonlocal counter
        counter += 1
        for _attempt in range(5):
            try:
                target = ingest[counter % len(ingest)] if cache else uncached
                reply = await target(batch, timeout=60)
                break
            except grpc.aio.AioRpcError as exc:
                # A carrier retries an UNAVAILABLE batch as it is: exactly once makes that safe.
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                retries[exc.code().name] = retries.get(exc.code().name, 0) + 1
        else:
            raise RuntimeError("batch failed 5 times")
        assert not reply.rejected, reply.rejected[0]
        return reply.accepted, reply.duplicates

    batches100 = records.batches("b100", 100, 400)
    first = await drive(BATCH_CONCURRENCY, batches100, send, PHASE_SECONDS)
    report(f"IngestCdrs 100/batch, call_ref ({BATCH_CONCURRENCY} in flight)", *first)
    sent100 = batches100[: (first[0] + first[1]) // 100]

    async def send_uncached(batch: bytes) -> tuple[int, int]:
        return await send(batch, cache=False)

    report(
        f"IngestCdrs 100/batch, call_ref, binding cache off ({BATCH_CONCURRENCY})",
        *await drive(BATCH_CONCURRENCY, records.batches("nocache", 100, 200), send_uncached, PHASE_SECONDS),
    )
    batches1000 = records.batches("b1000", 1000, 40)
    report(
        f"IngestCdrs 1000/batch, call_ref ({BATCH_CONCURRENCY} in flight)",
        *await drive(BATCH_CONCURRENCY, batches1000, send, PHASE_SECONDS),
    )

    streams = [
        [
            cdr_pb2.StreamCdrsRequest(record=records.make(f"s{n}", with_ref=True)).SerializeToString()
            for _ in range(STREAM_RECORDS)
        ]
        for n in range(STREAM_CONCURRENCY)
    ]

    async def send_stream(messages: list[bytes]) -> tuple[int, int]:
        async def produce() -> AsyncIterator[bytes]:
            for message in messages:
                yield message

        for _attempt in range(5):
            try:
                reply = await stream[0](produce(), timeout=120)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                retries[exc.code().name] = retries.get(exc.code().name, 0) + 1
        else:
            raise RuntimeError("stream failed 5 times")
        assert not reply.rejected
        return reply.accepted, reply.duplicates

    report(
        f"StreamCdrs {STREAM_RECORDS}/stream, call_ref ({STREAM_CONCURRENCY} streams)",
        *await drive(STREAM_CONCURRENCY, streams, send_stream, 120),
    )
    history = records.batches("hist", 100, 200, with_ref=False)
    report(
        f"IngestCdrs 100/batch, history match ({BATCH_CONCURRENCY} in flight)",
        *await drive(BATCH_CONCURRENCY, history, send, PHASE_SECONDS),
    )
    report(
        f"IngestCdrs 100/batch, all duplicates ({BATCH_CONCURRENCY} in flight)",
        *await drive(BATCH_CONCURRENCY, sent100, send, PHASE_SECONDS),
    )
    if retries:
        print(f"retried calls (UNAVAILABLE: a Redis command over NUMPROTECT_REDIS_TIMEOUT): {retries}")
    for channel in [*channels, uncached_channel]:
        await channel.close(grace=None)


def ingest_benchmark(redis_server: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="numprotect-bench-cdr-"))
    redis_port, cdr_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {**_service_env(), "NUMPROTECT_REDIS_URL": redis_url, "NUMPROTECT_CDR_PORT": str(cdr_port)}
    try:
        fsync = os.environ.get("NUMPROTECT_BENCH_FSYNC", "everysec")
        redis_args = redis_server_args(
            redis_server, redis_port, workdir, "--appendonly", "yes", "--appendfsync", fsync, "--loglevel", "notice"
        )
        with process(redis_args, env, workdir / "redis.log"):
            client = wait_redis(redis_port)
            bindings = asyncio.run(write_bindings(redis_url))
            cdr_log = workdir / "cdr.log"
            uncached_port = free_port()
            uncached_env = {**env, "NUMPROTECT_CDR_PORT": str(uncached_port), "NUMPROTECT_CDR_BINDING_CACHE": "0"}
            with (
                process([sys.executable, "-m", "numprotect.services.cdr"], env, cdr_log) as cdr,
                process(
                    [sys.executable, "-m", "numprotect.services.cdr"], uncached_env, workdir / "cdr-uncached.log"
                ) as cdr_uncached,
            ):
                address = f"127.0.0.1:{cdr_port}"
                uncached_address = f"127.0.0.1:{uncached_port}"
                wait_serving(address, cdr, cdr_log)
                wait_serving(uncached_address, cdr_uncached, workdir / "cdr-uncached.log")
                print(
                    f"cdr benchmark: redis-server AOF {fsync}, one cdr process (a second one with the binding cache "
                    f"off for one phase), {os.cpu_count()} cores"
                )
                try:
                    asyncio.run(bench(address, uncached_address, bindings))
                except Exception:
                    print("cdr log (tail):\n" + cdr_log.read_text()[-3000:], file=sys.stderr)
                    print("redis log (tail):\n" + (workdir / "redis.log").read_text()[-3000:], file=sys.stderr)
                    raise
            slow_fsync = (workdir / "redis.log").read_text(errors="replace").count("fsync is taking too long")
            if slow_fsync:
                print(f"redis-server logged {slow_fsync} slow AOF fsync(s) (disk busy): writes were delayed")
            memory = client.info("memory")["used_memory"]
            stored = client.xlen(f"np:cdr:{{t:{TENANT}}}:s")
            print(f"stored in the tenant's stream: {stored:,} records; Redis used_memory {memory / 2**20:,.1f} MiB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _service_env() -> dict[str, str]:
    return {
        **os.environ,
        # What this bench measures is the service's own work: plaintext and no identity checks (TLS and
        # token checks have their comparison in bench_translation, the hot path).
        "NUMPROTECT_TLS": "off",
        "NUMPROTECT_AUTH": "off",
        "NUMPROTECT_LOG_LEVEL": "WARNING",
    }


def _primary_cpu(node: Any) -> float:
    info = node.client().info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class Spread:
    """One layout's totals over the rounds: records, seconds, CPU seconds of its cdr process and of each primary."""

    layout: str
    tenant: str
    buckets: int
    address: str
    pid: int
    records: int = 0
    seconds: float = 0.0
    cdr_cpu: float = 0.0
    redis_cpu: list[float] = field(default_factory=list)


def spread_benchmark() -> None:
    """One tenant's stream on a 3-master cluster, one stream against SPREAD_BUCKETS buckets: two tenants (an owner's
    bucket count is fixed by its first record), each on a cdr process of its setting, measured in interleaved rounds
    so that both meet the same machine load."""
    from support.redis_cluster import RedisClusterServers  # the tests' real cluster (tests/ is on the path above)

    cluster = RedisClusterServers(masters=3, replicas=0, appendonly=True)
    workdir = Path(tempfile.mkdtemp(prefix="numprotect-bench-cdr-spread-"))
    try:
        masters = cluster.nodes
        with contextlib.ExitStack() as running:
            layouts = []
            for layout, buckets, numbers in (
                ("one stream", 1, "7003000"),
                (f"{SPREAD_BUCKETS} buckets", SPREAD_BUCKETS, "7004000"),
            ):
                port = free_port()
                env = {
                    **_service_env(),
                    "NUMPROTECT_REDIS_URL": cluster.url,
                    "NUMPROTECT_REDIS_MODE": "cluster",
                    "NUMPROTECT_CDR_PORT": str(port),
                    "NUMPROTECT_CDR_STREAM_BUCKETS": str(buckets),
                }
                log = workdir / f"cdr-{buckets}.log"
                cdr = running.enter_context(process([sys.executable, "-m", "numprotect.services.cdr"], env, log))
                wait_serving(f"127.0.0.1:{port}", cdr, log)
                spread = Spread(layout, f"spread-{buckets}", buckets, f"127.0.0.1:{port}", cdr.pid)
                spread.redis_cpu = [0.0] * len(masters)
                layouts.append((spread, numbers))
            asyncio.run(_spread_rounds(cluster.url, layouts, masters))
        print(
            f"\none tenant's stream on a {len(masters)}-master Redis Cluster (AOF everysec, no replicas), a cdr "
            f"process per layout, IngestCdrs 100/batch with call_ref on {BINDINGS} numbers, {SPREAD_CONCURRENCY} in "
            f"flight, {SPREAD_ROUNDS} interleaved rounds of {SPREAD_SECONDS:.0f}s per layout"
        )
        print(
            f"{'layout':<14} {'records/s':>9} {'cdr us/rec':>10} {'Redis us/rec':>12}  "
            f"{'tenant records per primary':<26} {'Redis CPU s per primary':<24} busiest primary"
        )
        for spread, _numbers in layouts:
            written = [0] * len(masters)
            for bucket in Buckets.of(spread.tenant, spread.buckets).all:
                node = cluster.master_of(bucket.stream)
                written[masters.index(node)] += int(node.client().xlen(bucket.stream))
            total = sum(written) or 1
            cpu = spread.redis_cpu
            per_record = 1e6 / max(spread.records, 1)
            print(
                f"{spread.layout:<14} {spread.records / spread.seconds:>9,.0f} {spread.cdr_cpu * per_record:>10,.0f} "
                f"{sum(cpu) * per_record:>12,.0f}  {' '.join(f'{n / total:>6.1%}' for n in written):<26} "
                f"{' '.join(f'{c:>6.2f}' for c in cpu):<24} "
                f"{max(written) / total:.0%} of records, {max(cpu) / (sum(cpu) or 1):.0%} of Redis CPU"
            )
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _spread_rounds(url: str, layouts: list[tuple[Spread, str]], masters: list[Any]) -> None:
    channels, senders = [], []
    for spread, numbers in layouts:
        bindings = await write_bindings(url, mode="cluster", tenant_id=spread.tenant, numbers=numbers)
        channel = grpc.aio.insecure_channel(spread.address)
        ingest = channel.unary_unary(
            INGEST, request_serializer=bytes, response_deserializer=cdr_pb2.IngestCdrsResponse.FromString
        )
        records = Records(bindings)
        # The first batch reads the bindings and fixes the tenant's bucket count (not measured).
        await ingest(records.batches("warm", 100, 1)[0], timeout=60)
        channels.append(channel)
        senders.append((spread, ingest, records))
    for round_number in range(SPREAD_ROUNDS):
        for spread, ingest, records in senders:

            async def send(batch: bytes, ingest: Any = ingest) -> tuple[int, int]:
                reply = await ingest(batch, timeout=60)
                assert not reply.rejected, reply.rejected[0]
                return reply.accepted, reply.duplicates

            batches = records.batches(f"spread{round_number}", 100, 1000)
            before, cdr_before = [_primary_cpu(node) for node in masters], cpu_seconds(spread.pid)
            accepted, duplicates, elapsed = await drive(SPREAD_CONCURRENCY, batches, send, SPREAD_SECONDS)
            after, cdr_after = [_primary_cpu(node) for node in masters], cpu_seconds(spread.pid)
            spread.records += accepted + duplicates
            spread.seconds += elapsed
            spread.cdr_cpu += cdr_after - cdr_before
            spread.redis_cpu = [t + a - b for t, a, b in zip(spread.redis_cpu, after, before, strict=True)]
    for channel in channels:
        await channel.close(grace=None)


def main(argv: list[str]) -> int:
    parts = argv or ["ingest", "spread"]
    unknown = sorted(set(parts) - {"ingest", "spread"})
    if unknown:
        print(f"unknown part(s) {', '.join(unknown)}: ingest, spread", file=sys.stderr)
        return 2
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("redis-server not found: run `make system-deps`", file=sys.stderr)
        return 1
    if "ingest" in parts:
        ingest_benchmark(redis_server)
    if "spread" in parts:
        spread_benchmark()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
