"""A Redis Cluster master dies (SIGKILL) under load: which calls fail, how, and that everything recovers by itself.

A real 3-master + 3-replica Redis Cluster on loopback, a real service process (cdr) in cluster mode watched
through its gRPC health, and the same Redis client path the services use (`create_redis` + `LuaScript`, one
client kept for the whole test) writing continuously to a key on the master that is killed and to a key on a
master that survives. Neither the service nor the client is restarted. docs/operations.md ("Redis Cluster
failover") records what this test measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
import redis
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect_core.errors import Unavailable
from numprotect_core.interceptors import as_domain_error
from numprotect_core.redis_client import LuaScript, RedisClient, create_redis, redis_is_up
from numprotect_core.settings import Env, RedisSettings
from support.processes import ServiceProcess
from support.redis_cluster import RedisClusterServers
from support.redis_server import RedisServer

PROBE = LuaScript.beside(__file__, "failover_probe.lua")
CDR_SERVICE = "numprotect.cdr.v1.CdrService"
SERVING = health_pb2.HealthCheckResponse.SERVING
# Redis waits cluster-node-timeout (2 s in support.redis_cluster) before a master is marked failed, then the
# replica wins an election; the client then needs one failed call to refresh the slot map.
RECOVERY_BUDGET_SECONDS = 30.0
CALL_INTERVAL_SECONDS = 0.02
WRITERS_PER_SLOT = 4


@dataclass
class Call:
    start: float  # time.monotonic()
    end: float
    outcome: str  # "ok" or the exception's class name
    error: BaseException | None = None
    value: int | None = None


@dataclass
class Timeline:
    """Absolute times (time.monotonic()) of what happened; the report shows them relative to the kill."""

    kill_at: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    victim_calls: list[Call] = field(default_factory=list)
    survivor_calls: list[Call] = field(default_factory=list)
    health: list[tuple[float, str]] = field(default_factory=list)
    # Last moment the replica still answered ROLE as a replica, and the first moment it answered master.
    replica_last_seen_as_replica: float = 0.0
    promoted_at: float | None = None
    recovered_at: float | None = None

    def rel(self, at: float) -> float:
        return at - self.kill_at


@pytest.fixture
def cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(masters=3, replicas=1)
    try:
        wait_replicas_in_sync(servers)
        yield servers
    finally:
        servers.stop()


def wait_replicas_in_sync(servers: RedisClusterServers, timeout: float = 30.0) -> None:
    """A replica that never completed its first sync refuses to fail over ("Disconnected from master for longer
    than allowed"): `redis-cli --cluster create` returns before the replicas' initial sync, so wait for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = [node.client().info("replication") for node in servers.nodes]
        replicas = [info for info in infos if info["role"] == "slave"]
        if len(replicas) == len(servers.nodes) // 2 and all(i["master_link_status"] == "up" for i in replicas):
            return
        time.sleep(0.1)
    raise RuntimeError("replicas did not finish their initial sync")


def cluster_nodes(node: RedisServer) -> dict[int, list[str]]:
    """CLUSTER NODES as seen by `node`: port -> [id, flags, master id, ..., slot ranges]."""
    text = node.client().execute_command("CLUSTER", "NODES")
    rows: dict[int, list[str]] = {}
    for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
        fields = line.split()
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        rows[port] = [fields[0], fields[2], fields[3], *fields[8:]]
    return rows


def tag_on_another_master(servers: RedisClusterServers, victim: RedisServer) -> str:
    for i in range(1000):
        tag = f"failover:{i}"
        if servers.master_of(f"{{{tag}}}").port != victim.port:
            return tag
    raise AssertionError("no key found outside the victim's slots")


async def drive(client: RedisClient, tag: str, calls: list[Call], timeline: Timeline) -> None:
    """Sequential probe writes to one slot until told to stop; every outcome recorded."""
    keys = [f"{{{tag}}}:count", f"{{{tag}}}:last"]
    while not timeline.stop.is_set():
        start = time.monotonic()
        try:
            value = await PROBE(client, keys, [str(start)])
            calls.append(Call(start, time.monotonic(), "ok", value=int(value)))
        except Exception as exc:
            calls.append(Call(start, time.monotonic(), type(exc).__name__, error=exc))
        await asyncio.sleep(CALL_INTERVAL_SECONDS)


async def watch_health(address: str, timeline: Timeline) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not timeline.stop.is_set():
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=CDR_SERVICE), timeout=1)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
            timeline.health.append((time.monotonic(), status))
            await asyncio.sleep(0.05)


def role(node: RedisServer) -> str:
    client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1, socket_connect_timeout=1)
    try:
        reply = client.execute_command("ROLE")
        return reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    finally:
        client.close()


async def watch_promotion(replica: RedisServer, timeline: Timeline) -> None:
    """Asks the replica itself: it is the first to know it became master (nobody can write to it before)."""
    while timeline.promoted_at is None and not timeline.stop.is_set():
        asked = time.monotonic()
        if await asyncio.to_thread(role, replica) == "master":
            timeline.promoted_at = time.monotonic()
        else:
            timeline.replica_last_seen_as_replica = asked
            await asyncio.sleep(0.02)


def is_retryable_unavailable(error: BaseException | None) -> bool:
    """A Redis connection or timeout error, which the services' interceptor answers with UNAVAILABLE."""
    if not isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return False
    mapped = as_domain_error(error, "/numprotect.cdr.v1.CdrService/IngestCdrs")
    return isinstance(mapped, Unavailable) and mapped.code == grpc.StatusCode.UNAVAILABLE


async def test_killing_a_master_fails_its_slots_briefly_and_recovers_without_restart(
    cluster: RedisClusterServers,
) -> None:
    victim = cluster.master_of("{failover:victim}")
    survivor_tag = tag_on_another_master(cluster, victim)
    before = cluster_nodes(victim)
    victim_id = before[victim.port][0]
    (replica,) = [node for node in cluster.nodes if before[node.port][2] == victim_id]
    victim_slots = before[victim.port][3:]
    assert victim_slots, "the victim master owns slots"

    env = {
        "NUMPROTECT_REDIS_URL": cluster.url,
        "NUMPROTECT_REDIS_MODE": "cluster",
        "NUMPROTECT_HEALTH_INTERVAL": "0.1s",
    }
    service = ServiceProcess("cdr", env)
    client = create_redis(RedisSettings.from_env(Env(env)))
    timeline = Timeline()
    try:
        service.wait_serving(service_name=CDR_SERVICE)
        pid = service.process.pid
        # As the bootstrap does before it reports SERVING: the first PING loads the slot map. (A fresh cluster
        # client hit by concurrent commands can fail a few with AttributeError inside redis-py 8.1.0.)
        assert await redis_is_up(client)
        # Several concurrent writers per slot, as a service under load.
        tasks = [
            *(
                asyncio.create_task(drive(client, "failover:victim", timeline.victim_calls, timeline))
                for _ in range(WRITERS_PER_SLOT)
            ),
            *(
                asyncio.create_task(drive(client, survivor_tag, timeline.survivor_calls, timeline))
                for _ in range(WRITERS_PER_SLOT)
            ),
            asyncio.create_task(watch_health(service.address, timeline)),
        ]
        await asyncio.sleep(1.0)

        timeline.kill_at = time.monotonic()
        victim.kill()  # SIGKILL: no goodbye to the cluster, as a crashed node
        tasks.append(asyncio.create_task(watch_promotion(replica, timeline)))

        # Until the replica is master, the victim's slot has taken 10 writes in a row since, and health is back.
        deadline = timeline.kill_at + RECOVERY_BUDGET_SECONDS
        while time.monotonic() < deadline:
            promoted = timeline.promoted_at
            recent = sorted(timeline.victim_calls, key=lambda c: c.end)[-10:]
            if (
                promoted is not None
                and len(recent) == 10
                and all(c.outcome == "ok" and c.start > promoted for c in recent)
                and timeline.health
                and timeline.health[-1][0] > promoted
                and timeline.health[-1][1] == "SERVING"
            ):
                timeline.recovered_at = time.monotonic()
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a little steady state after recovery
        timeline.stop.set()
        await asyncio.gather(*tasks)

        # The service process was never restarted and serves.
        assert service.process.poll() is None and service.process.pid == pid
        service.wait_serving(service_name=CDR_SERVICE, timeout=5)
    finally:
        timeline.stop.set()
        await client.aclose()
        assert service.stop() == 0

    report = summarize(timeline)
    print(report)

    # Before the kill every call succeeded.
    before_kill = [c for c in timeline.victim_calls + timeline.survivor_calls if c.end < timeline.kill_at]
    assert len(before_kill) >= 10 and all(c.outcome == "ok" for c in before_kill), report

    # The replica of the killed master was promoted and owns its slots; the old master is flagged failed.
    assert timeline.promoted_at is not None, report
    after = cluster_nodes(replica)
    assert after[replica.port][1].split(",") == ["myself", "master"], after[replica.port]
    assert after[replica.port][3:] == victim_slots
    assert "fail" in after[victim.port][1].split(","), after[victim.port]

    # No write to the dead master's slot succeeded before the promotion: each call in that window either failed
    # with a Redis connection error (UNAVAILABLE to a gRPC caller: retryable, never INTERNAL) or waited inside
    # the client's retries and succeeded on the promoted replica.
    affected = [c for c in timeline.victim_calls if c.end > timeline.kill_at and c.start < timeline.promoted_at]
    assert affected, report
    for call in affected:
        if call.outcome == "ok":
            assert call.end > timeline.replica_last_seen_as_replica, call
        else:
            assert is_retryable_unavailable(call.error), call
    # Calls to the surviving masters' slots: if any failed, it was the same retryable UNAVAILABLE.
    for call in timeline.survivor_calls:
        assert call.outcome == "ok" or is_retryable_unavailable(call.error), call

    # Recovered by itself: the same client writes to the slot again, the counter lives on (asynchronous
    # replication may lose the last acknowledged writes, never the history), health is SERVING.
    assert timeline.recovered_at is not None, report
    last_before = max(c.value or 0 for c in before_kill)
    after_promotion = sorted(
        (c for c in timeline.victim_calls if c.start > timeline.promoted_at), key=lambda c: c.start
    )
    assert len(after_promotion) >= 10 and all(c.outcome == "ok" for c in after_promotion), report
    first_after = after_promotion[0].value
    assert first_after is not None and first_after > last_before // 2, report
    assert timeline.health[-1][1] == "SERVING", report


def summarize(timeline: Timeline) -> str:
    rel = timeline.rel

    def describe(name: str, calls: list[Call]) -> str:
        after_kill = [c for c in calls if c.end > timeline.kill_at]
        failed = [c for c in after_kill if c.outcome != "ok"]
        kinds = sorted({c.outcome for c in failed})
        span = f"{rel(min(c.start for c in failed)):.2f}s..{rel(max(c.end for c in failed)):.2f}s" if failed else "-"
        slowest = max((c.end - c.start for c in after_kill), default=0.0)
        return (
            f"{name}: {len(after_kill)} calls after the kill, {len(failed)} failed ({', '.join(kinds) or '-'}) "
            f"during {span}; slowest call {slowest:.2f}s"
        )

    not_serving = [at for at, status in timeline.health if at > timeline.kill_at and status != "SERVING"]
    health_text = f"{rel(not_serving[0]):.2f}s..{rel(not_serving[-1]):.2f}s" if not_serving else "never"
    promoted = f"{rel(timeline.promoted_at):.2f}s" if timeline.promoted_at is not None else "never"
    recovered = f"{rel(timeline.recovered_at):.2f}s" if timeline.recovered_at is not None else "never"
    acknowledged = [c.value or 0 for c in timeline.victim_calls if c.outcome == "ok" and c.end < timeline.kill_at]
    promoted_at = timeline.promoted_at
    after = sorted(
        (c for c in timeline.victim_calls if promoted_at is not None and c.start > promoted_at and c.outcome == "ok"),
        key=lambda c: c.start,
    )
    counter = f"last acknowledged before the kill {max(acknowledged, default=0)}, " + (
        f"first after the promotion {after[0].value}" if after else "no write after the promotion"
    )
    return "\n".join(
        [
            "redis cluster failover (times after the SIGKILL):",
            f"  replica answers ROLE master at {promoted}",
            "  " + describe("killed master's slot", timeline.victim_calls),
            "  " + describe("surviving master's slot", timeline.survivor_calls),
            f"  cdr health not SERVING {health_text}",
            f"  counter on the killed master's slot: {counter}",
            f"  recovered (10 writes in a row after the promotion, health SERVING) at {recovered}",
        ]
    )
