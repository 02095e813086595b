"""NUMPROTECT_REDIS_WAIT_REPLICAS on a real Redis Cluster: acknowledged CDRs lost when a master dies, with and
without waiting for its replica, and what the wait costs.

The scenario that can lose acknowledged writes under asynchronous replication: the replica falls behind (here it
is stopped with SIGSTOP for half a second, as a network stall or a slow disk would), the master keeps
acknowledging, then the master is killed (SIGKILL) and the replica, resumed, is promoted. With WAIT, writes the
stalled replica did not confirm are answered UNAVAILABLE, and none acknowledged is lost (required). The real CdrStore
ingests one record per call from several concurrent writers; every call that returned is an acknowledged CDR;
after the promotion each is looked up on the new master. docs/operations.md ("Waiting for replicas") records the
figures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import Iterator

import pytest
import redis

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.cdr_keys import Bucket
from numprotect.core.errors import Unavailable
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.replica_wait import ReplicaWait, hash_tag
from numprotect.core.settings import Env, RedisSettings, SettingsError
from numprotect.services.cdr.settings import CdrSettings
from numprotect.services.cdr.store import CdrStore
from numprotect.services.cdr.validation import ValidCdr
from support.redis_cluster import RedisClusterServers
from support.redis_server import RedisServer

CARRIER = "cm"
WRITERS = 8
STALL_SECONDS = 0.5
WAIT_TIMEOUT = "200ms"
COST_CALLS = 300


def cdr(call_id: str, now_ms: int) -> ValidCdr:
    record = cdr_pb2.CallDetailRecord(
        call_id=call_id,
        carrier_id=CARRIER,
        called_number="700100000000001",
        calling_number="13700000003",
        # 16 KiB per record: during the stall the replication stream outgrows the kernel's socket buffers and
        # stays in the master's memory, which a SIGKILL loses (a stopped replica still gets what is in flight).
        recording_url="https://recordings.example/" + "x" * 16_384,
    )
    return ValidCdr(0, record, now_ms, False, 0, None)


def role(node: RedisServer) -> str:
    client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1, socket_connect_timeout=1)
    try:
        reply = client.execute_command("ROLE")
        return reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    except redis.RedisError:
        return "unknown"
    finally:
        client.close()


@pytest.fixture
def cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(masters=3, replicas=1)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the replicas' first sync (a replica that never synced cannot fail over)
            infos = [node.client().info("replication") for node in servers.nodes]
            if all(i["master_link_status"] == "up" for i in infos if i["role"] == "slave"):
                break
            time.sleep(0.1)
        for node in servers.nodes:
            node.client().config_set("cluster-require-full-coverage", "no")
        yield servers
    finally:
        servers.stop()


def store_on(client: RedisClient, replicas: int) -> CdrStore:
    settings = CdrSettings.from_env(Env({}))
    limit = ConcurrencyLimit(64, wait_seconds=2.0, name="redis operations")
    return CdrStore(client, settings, limit, ReplicaWait(client, replicas, 0.2))


async def ingest_latencies(store: CdrStore, tenant: str, prefix: str) -> list[float]:
    latencies = []
    for n in range(COST_CALLS):
        started = time.perf_counter()
        await store.ingest(tenant, [cdr(f"{prefix}-{n}", int(time.time() * 1000))], int(time.time() * 1000))
        latencies.append(time.perf_counter() - started)
    return latencies


@pytest.mark.chaos
@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["without-wait", "with-wait"])
async def test_acknowledged_cdrs_lost_when_a_lagging_master_dies(
    cluster: RedisClusterServers, wait_replicas: int
) -> None:
    env = {
        "NUMPROTECT_REDIS_URL": cluster.url,
        "NUMPROTECT_REDIS_MODE": "cluster",
        "NUMPROTECT_REDIS_WAIT_REPLICAS": str(wait_replicas),
        "NUMPROTECT_REDIS_WAIT_TIMEOUT": WAIT_TIMEOUT,
    }
    settings = RedisSettings.from_env(Env(env))  # the setting as an operator gives it
    assert (settings.wait_replicas, settings.wait_timeout_seconds) == (wait_replicas, 0.2)
    client = create_redis(settings)
    tenant = "tenant-wait"
    bucket = Bucket(tenant)
    victim = cluster.master_of(bucket.stream)
    victim_id = victim.client().execute_command("CLUSTER", "MYID")
    (replica,) = [
        n
        for n in cluster.nodes
        if n.port != victim.port and n.client().info("replication").get("master_port") == victim.port
    ]
    assert victim_id
    store = store_on(client, wait_replicas)
    acknowledged: list[str] = []
    refused: list[str] = []
    stop = asyncio.Event()

    async def writer(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            call_id = f"w{worker}-{n}"
            try:
                await store.ingest(tenant, [cdr(call_id, int(time.time() * 1000))], int(time.time() * 1000))
                acknowledged.append(call_id)
            except (Unavailable, redis.RedisError):
                refused.append(call_id)
                await asyncio.sleep(0.01)

    try:
        # The cost, before the fault: one-record ingests one after another, with the setting under test.
        latencies = await ingest_latencies(store, tenant, "cost")
        tasks = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
        await asyncio.sleep(0.5)
        os.kill(replica.process.pid, signal.SIGSTOP)  # the replica stalls; the master goes on
        await asyncio.sleep(STALL_SECONDS)
        await asyncio.to_thread(victim.kill)
        os.kill(replica.process.pid, signal.SIGCONT)
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
        deadline = time.monotonic() + 30
        while role(replica) != "master":
            assert time.monotonic() < deadline, "the replica was not promoted"
            await asyncio.sleep(0.05)
        promoted = redis.Redis(host="127.0.0.1", port=replica.port)
        present = 0
        for start in range(0, len(acknowledged), 500):
            present += sum(
                promoted.exists(bucket.dedup(CARRIER, call_id)) for call_id in acknowledged[start : start + 500]
            )
        promoted.close()
    finally:
        stop.set()
        if replica.process.poll() is None:
            os.kill(replica.process.pid, signal.SIGCONT)
        await client.aclose()
    lost = len(acknowledged) - present
    report = (
        f"WAIT replicas={wait_replicas} timeout={WAIT_TIMEOUT}: one-record ingest p50 "
        f"{statistics.median(latencies) * 1000:.2f} ms, mean {statistics.mean(latencies) * 1000:.2f} ms "
        f"({COST_CALLS} calls, one after another); under load with a {STALL_SECONDS}s replica stall then "
        f"SIGKILL of the master: {len(acknowledged)} CDR ingests acknowledged, {len(refused)} refused "
        f"(UNAVAILABLE), {lost} acknowledged lost after the promotion"
    )
    print(report)
    if wait_replicas:
        assert lost == 0, report
        assert refused, report  # the stall was seen: writes it caught were refused, not acknowledged
    else:
        # A measurement (docs/operations.md): on loopback this stall lost none without WAIT either (the replica
        # received the stream after SIGCONT); nothing here guarantees that, so no count is required.
        assert acknowledged, report


def test_the_wait_settings_are_checked_at_start_up() -> None:
    assert RedisSettings.from_env(Env({})).wait_replicas == 0  # off by default
    with pytest.raises(SettingsError, match=r"^NUMPROTECT_REDIS_WAIT_TIMEOUT=2s: must be shorter than"):
        RedisSettings.from_env(Env({"NUMPROTECT_REDIS_WAIT_REPLICAS": "1", "NUMPROTECT_REDIS_WAIT_TIMEOUT": "2s"}))
    with pytest.raises(SettingsError, match="NUMPROTECT_REDIS_WAIT_REPLICAS='-1'"):
        RedisSettings.from_env(Env({"NUMPROTECT_REDIS_WAIT_REPLICAS": "-1"}))
    assert hash_tag("np:cdr:{t:a}:s") == "t:a" and hash_tag("plain") == "plain" and hash_tag("a{}b") == "a{}b"
