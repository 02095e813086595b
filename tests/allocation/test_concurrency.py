"""64 concurrent allocators x 2,000 AXB allocations on one block with a small set of repeated parties, in a pool of
three sub-pools, on one Redis and on a Redis Cluster of three primaries (one sub-pool each).

The service runs as three processes (python -m numprotect.services.allocation, with uvloop) sharing one Redis, as
it would be deployed; the 64 grpc.aio clients (their own uvloop loop in the test process) are spread over them. Races
happen between processes as well as within one, and every allocation that finds its first sub-pool without a fit
tries the others. Afterwards every reservation is read back from Redis (each number from its own sub-pool) and
checked: no (number, party) pair appears twice. Python gRPC costs ~0.5 ms of server CPU per call, so this
runs at roughly 1,000-1,400 allocations/s on a 2-core machine.

The allocators call AllocateNumber one by one, or ("batched") as the binding service does: through its
AllocationClient (one per server, as one per binding process), whose concurrent requests go in AllocateNumbers
batch calls, so items of one call race each other inside one process as well.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import uvloop
from redis.cluster import RedisCluster

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.allocation.v1 import allocation_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.pool_keys import PoolLayout, hash_key_in, reservations_key_in
from numprotect.services.binding.allocation_client import AllocationClient
from support.identity import Role, mint
from support.processes import ServiceProcess
from support.tls import secure_channel

WORKERS = 64
SERVERS = 3
BLOCK = "70055500000"[:11]
SUBPOOLS = 3
# 120 riders and 120 customers, each appearing in ~1,000 bindings: concurrent requests share parties all the time.
RIDERS = [f"138{i:08d}" for i in range(120)]
CUSTOMERS = [f"0{10 + i % 90}{i:08d}" for i in range(120)]


async def _run_allocators(
    addresses: list[str], operator: str, binding: str, per_worker: int, batched: bool
) -> tuple[list[list[tuple[str, str, str]]], float]:
    """Imports as the operator, allocates as the binding service (the only principal allowed to). The token goes
    as plain call metadata: grpc's call-credentials plugin runs in a Python thread per call, which at this call
    rate costs the clients more CPU than the servers get (batched, the binding client's channels carry it as binding's
    do: call credentials, once per batch call)."""
    as_binding = (("authorization", f"Bearer {binding}"),)
    operator_channel = secure_channel(addresses[0], operator)
    channels = [secure_channel(address, binding if batched else None) for address in addresses]
    try:
        stubs = [allocation_pb2_grpc.AllocationServiceStub(channel) for channel in channels]
        clients = [AllocationClient(channel, timeout_seconds=60) for channel in channels]
        imported = await allocation_pb2_grpc.AllocationServiceStub(operator_channel).ImportBlock(
            pb.ImportBlockRequest(block=BLOCK, tenant_id="t1", city_code="010", carrier_id="cm")
        )
        assert imported.numbers_added == 10_000

        async def allocator(seed: int) -> list[tuple[str, str, str]]:
            stub = stubs[seed % len(stubs)]
            rng = random.Random(seed)
            done = []
            for _ in range(per_worker):
                a, b = rng.choice(RIDERS), rng.choice(CUSTOMERS)
                if batched:
                    client = clients[seed % len(clients)]
                    reserved = await client.allocate("t1", common_pb2.BINDING_MODE_AXB, [a, b], "010", False, 600_000)
                    done.append((reserved.virtual_number, a, b))
                    continue
                reply = await stub.AllocateNumber(
                    pb.AllocateNumberRequest(
                        tenant_id="t1", mode=common_pb2.BINDING_MODE_AXB, parties=[a, b], city_code="010"
                    ),
                    metadata=as_binding,
                )
                done.append((reply.virtual_number, a, b))
            return done

        started = time.monotonic()
        results = await asyncio.gather(*(allocator(seed) for seed in range(WORKERS)))
        elapsed = time.monotonic() - started
        if batched:
            batches = [client.allocations.batcher for client in clients]
            calls, items = sum(b.batches_sent for b in batches), sum(b.items_sent for b in batches)
            print(f"\nbatched: {items} allocations in {calls} AllocateNumbers calls")
            assert items == WORKERS * per_worker
            assert calls * 2 <= items  # concurrent requests do share calls
        return results, elapsed
    finally:
        for channel in [operator_channel, *channels]:
            await channel.close(grace=None)


# 64 clients x 250 allocations (16,000) on one Redis and x 125 (8,000) on the cluster in make test, and x 125 batched
# on one Redis; x 2,000 (128,000: ~220 s on the shared 2-core machine with TLS and keys) on each in make chaos.
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("redis_mode", "per_worker", "batched"),
    [
        pytest.param("standalone", 250, False, id="standalone-short"),
        pytest.param("cluster", 125, False, id="cluster-short"),
        pytest.param("standalone", 125, True, id="standalone-short-batched"),
        pytest.param("standalone", 2_000, False, id="standalone-long", marks=pytest.mark.chaos),
        pytest.param("cluster", 2_000, False, id="cluster-long", marks=pytest.mark.chaos),
        pytest.param("standalone", 2_000, True, id="standalone-long-batched", marks=pytest.mark.chaos),
        pytest.param("cluster", 2_000, True, id="cluster-long-batched", marks=pytest.mark.chaos),
    ],
)
def test_64_concurrent_allocators_never_produce_a_conflicting_pair(
    redis_env: dict[str, str],
    cluster_env: Callable[[], dict[str, str]],
    redis_mode: str,
    per_worker: int,
    batched: bool,
) -> None:
    # The Redis of the pass (one server, or the cluster in make test's cluster pass), else a cluster of our own.
    if redis_mode != redis_env["NUMPROTECT_REDIS_MODE"]:
        redis_env = cluster_env()
    redis_sync: Any
    if redis_mode == "cluster":
        redis_sync = RedisCluster.from_url(redis_env["NUMPROTECT_REDIS_URL"])
    else:
        redis_sync = redis.Redis.from_url(redis_env["NUMPROTECT_REDIS_URL"])
    env = {
        **redis_env,
        "NUMPROTECT_ALLOCATION_LEASE": "10m",
        "NUMPROTECT_ALLOCATION_MAX_BINDINGS_PER_NUMBER": "40",
        "NUMPROTECT_ALLOCATION_SUBPOOLS": str(SUBPOOLS),
    }
    # Minted before the processes start: each loads them at start-up.
    operator, binding = mint(redis_sync, Role.OPERATOR), mint(redis_sync, Role.SERVICE, "binding")
    processes: list[ServiceProcess] = []
    try:
        with ThreadPoolExecutor(SERVERS) as pool:  # start-up in parallel: each waits for its "serving" line
            # 120 s each: at a load average of 15-30 three processes started at once took up to ~100 s to serve.
            starting = [pool.submit(ServiceProcess, "allocation", env, timeout=120.0) for _ in range(SERVERS)]
            for future in starting:
                with contextlib.suppress(Exception):
                    processes.append(future.result())
        assert len(processes) == SERVERS, "an allocation process did not start"
        # The clients get their own uvloop loop: the client side costs less CPU, the servers get more.
        addresses = [p.address for p in processes]
        results, elapsed = uvloop.run(_run_allocators(addresses, operator, binding, per_worker, batched))
    finally:
        with ThreadPoolExecutor(SERVERS) as pool:  # each drains for its grace period: in parallel
            assert list(pool.map(ServiceProcess.stop, processes)) == [0] * len(processes)
    allocations = [r for chunk in results for r in chunk]
    assert len(allocations) == WORKERS * per_worker
    rate = len(allocations) / elapsed
    print(f"\n{len(allocations)} allocations, {WORKERS} clients, {SERVERS} servers: {elapsed:.1f}s ({rate:.0f}/s)")
    verify_started = time.monotonic()

    # What the clients were told: every (number, party) pair at most once.
    pairs = collections.Counter((n, p) for n, a, b in allocations for p in (a, b))
    assert max(pairs.values()) == 1

    # What Redis holds: read every number of the block back, from the sub-pool holding it.
    layout = PoolLayout.of("t1", "010", SUBPOOLS)
    assert redis_sync.hget(layout.keys[0], "subpools") == str(SUBPOOLS).encode()
    numbers = [f"{BLOCK}{i:04d}" for i in range(10_000)]
    pipe = redis_sync.pipeline(transaction=False)
    for n in numbers:
        pipe.hgetall(hash_key_in(layout.key_of(n), n))
        pipe.zrange(reservations_key_in(layout.key_of(n), n), 0, -1)
    replies = pipe.execute()
    redis_sync.close()
    stored_pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    loads = []
    for n, fields, members in zip(numbers, replies[0::2], replies[1::2], strict=True):
        text = {k.decode(): v.decode() for k, v in fields.items()}
        records = {k[2:]: v.split("|") for k, v in text.items() if k.startswith("r:")}
        assert set(records) == {m.decode() for m in members}, n  # every live reservation has its record
        for rid, (mode, a, b, _ext, _binding) in records.items():
            assert mode == "AXB"
            stored_pairs.update([(n, a), (n, b)])
            assert text[f"p:{a}"] == rid and text[f"p:{b}"] == rid  # the party index points at its reservation
        assert sum(1 for k in text if k.startswith("p:")) == 2 * len(records)
        loads.append(len(records))
    assert sum(stored_pairs.values()) == 2 * len(allocations)
    assert max(stored_pairs.values()) == 1
    assert stored_pairs == pairs
    # Each number's live count never exceeded the configured maximum, and the pool was spread (every number used).
    assert max(loads) <= 40
    used = sum(1 for load in loads if load)
    print(f"numbers used: {used} of {len(loads)}, most bindings on one: {max(loads)}")
    # Every sub-pool took its share (the start rotates in each process; a sub-pool without a fit passes it on).
    per_subpool = collections.Counter(layout.keys.index(layout.key_of(n)) for n, _, _ in allocations)
    print(f"allocations per sub-pool: {sorted(per_subpool.items())}")
    assert min(per_subpool.values()) >= len(allocations) / SUBPOOLS * 0.9
    if per_worker >= 2_000:  # 128,000 allocations spread over the whole pool (16,000 fill about 1,600 numbers)
        assert min(loads) >= 1
    print(f"verified in {time.monotonic() - verify_started:.1f}s")
