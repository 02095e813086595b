"""A Redis Cluster master dies (SIGKILL) under load: which calls fail, how, and that everything recovers by itself.

A real 3-master + 3-replica Redis Cluster on loopback and a real service process (cdr) in cluster mode, called
continuously through its gRPC health and its business RPC GetCdrStats for a tenant whose keys live on the master
that is killed and for one on a master that survives; beside it, the same Redis client path the services use
(`create_redis` + `LuaScript`, one client kept for the whole test) writing to a key on each of those masters.
Neither the service nor the client is restarted. docs/operations.md ("Redis Cluster
failover") records what this test measured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio.cluster import ClusterNode

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core.calls import domain_error
from numprotect.core.errors import Unavailable
from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import LuaScript, RedisClient, create_redis, redis_is_up
from numprotect.core.routes import MODE_AXN, RESTRICTION_NONE, Route, RouteTable
from numprotect.core.settings import Env, RedisSettings
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.identity import mint_in, record_blocks
from support.processes import ServiceProcess
from support.redis_cluster import RedisClusterServers
from support.redis_server import RedisServer
from support.tls import secure_channel

PROBE = LuaScript.beside(__file__, "failover_probe.lua")
CDR_SERVICE = "numprotect.cdr.v1.CdrService"
SERVING = health_pb2.HealthCheckResponse.SERVING
# Redis waits cluster-node-timeout (2 s in support.redis_cluster) before a master is marked failed, then the
# replica wins an election; the client then needs one failed call to refresh the slot map.
RECOVERY_BUDGET_SECONDS = 30.0
CALL_INTERVAL_SECONDS = 0.02
WRITERS_PER_SLOT = 4
RPC_CALLERS_PER_TENANT = 2
IN_FLIGHT_SLACK_SECONDS = 1.0
STEADY_STATE_BUDGET_SECONDS = 30.0


@dataclass
class Call:
    start: float  # time.monotonic()
    end: float
    outcome: str  # "ok", the exception's class name, or for gRPC calls the status code's name
    error: BaseException | None = None
    value: int | None = None


@dataclass
class Timeline:
    """Absolute times (time.monotonic()) of what happened; the report shows them relative to the kill."""

    kill_at: float = 0.0
    dead_at: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    victim_calls: list[Call] = field(default_factory=list)
    survivor_calls: list[Call] = field(default_factory=list)
    victim_rpcs: list[Call] = field(default_factory=list)
    survivor_rpcs: list[Call] = field(default_factory=list)
    health: list[tuple[float, str]] = field(default_factory=list)
    # Last moment the replica still answered ROLE as a replica, and the first moment it answered master.
    replica_last_seen_as_replica: float = 0.0
    promoted_at: float | None = None
    recovered_at: float | None = None

    def rel(self, at: float) -> float:
        return at - self.kill_at


def start_cluster(masters: int, replicas: int) -> RedisClusterServers:
    """A new cluster; a second try when the first could not start. The nodes' ports are free when chosen, but
    their cluster-bus ports (port + 10000) are not checked and other test runs on the machine take ports too."""
    try:
        return RedisClusterServers(masters=masters, replicas=replicas)
    except (RuntimeError, subprocess.SubprocessError, redis.RedisError) as first:
        print(f"redis cluster did not start ({first!r}); trying once more on other ports")
        return RedisClusterServers(masters=masters, replicas=replicas)


@pytest.fixture
def cluster() -> Iterator[RedisClusterServers]:
    servers = start_cluster(3, 1)
    try:
        wait_replicas_in_sync(servers)
        # As docs/operations.md recommends: the masters that are up keep serving their slots while another's are
        # uncovered. (Redis' default, "yes", answers CLUSTERDOWN for every slot until the replica is promoted.)
        for node in servers.nodes:
            node.client().config_set("cluster-require-full-coverage", "no")
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


def tenant_on(servers: RedisClusterServers, master: RedisServer, *, same: bool) -> str:
    """A tenant id whose cdr keys ({t:<tenant>}) live on `master` (same=True) or on another master."""
    for i in range(1000):
        tenant = f"tenant-{i}"
        if (servers.master_of(f"{{t:{tenant}}}").port == master.port) == same:
            return tenant
    raise AssertionError("no tenant found")


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


async def drive_rpc(address: str, token: str, tenant: str, calls: list[Call], timeline: Timeline) -> None:
    """The service's own business RPC (CdrService.GetCdrStats reads the tenant's daily counters in its slot), as
    that tenant."""
    request = cdr_pb2.GetCdrStatsRequest(tenant_id=tenant, date="2026-01-01")
    async with secure_channel(address, token) as channel:
        stub = cdr_pb2_grpc.CdrServiceStub(channel)
        while not timeline.stop.is_set():
            start = time.monotonic()
            try:
                await stub.GetCdrStats(request, timeout=RECOVERY_BUDGET_SECONDS)
                calls.append(Call(start, time.monotonic(), "ok"))
            except grpc.aio.AioRpcError as exc:
                calls.append(Call(start, time.monotonic(), exc.code().name, error=exc))
            await asyncio.sleep(CALL_INTERVAL_SECONDS)


async def watch_health(address: str, timeline: Timeline) -> None:
    async with secure_channel(address) as channel:
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


async def steady_state(timeline: Timeline) -> None:
    """Until every writer and caller has had answers (a fixed sleep is too short on a loaded machine)."""
    deadline = time.monotonic() + STEADY_STATE_BUDGET_SECONDS
    while time.monotonic() < deadline:
        counts = [
            sum(c.outcome == "ok" for c in calls)
            for calls in (timeline.victim_calls, timeline.survivor_calls, timeline.victim_rpcs, timeline.survivor_rpcs)
        ]
        if min(counts) >= 2 * WRITERS_PER_SLOT and any(status == "SERVING" for _, status in timeline.health):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no steady state before the kill")


def affected_by_the_failover(calls: list[Call], timeline: Timeline) -> list[Call]:
    """The calls to the dead master's slot that the failover caught: started after the master died, or in flight
    at the kill and not answered by the master before it died (an answer already on its way is accepted for
    IN_FLIGHT_SLACK_SECONDS after the process was reaped)."""
    assert timeline.promoted_at is not None
    caught = []
    for call in calls:
        if call.start >= timeline.promoted_at or call.end <= timeline.kill_at:
            continue
        in_flight_answered = call.start < timeline.dead_at and call.end <= timeline.dead_at + IN_FLIGHT_SLACK_SECONDS
        if not (call.outcome == "ok" and in_flight_answered):
            caught.append(call)
    return caught


def is_retryable_unavailable(error: BaseException | None) -> bool:
    """A Redis connection or timeout error, which the services' interceptor answers with UNAVAILABLE."""
    if not isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return False
    mapped = domain_error(error, "/numprotect.cdr.v1.CdrService/IngestCdrs")
    return isinstance(mapped, Unavailable) and mapped.code == grpc.StatusCode.UNAVAILABLE


async def test_killing_a_master_fails_its_slots_briefly_and_recovers_without_restart(
    cluster: RedisClusterServers,
) -> None:
    victim = cluster.master_of("{failover:victim}")
    survivor_tag = tag_on_another_master(cluster, victim)
    victim_tenant, survivor_tenant = tenant_on(cluster, victim, same=True), tenant_on(cluster, victim, same=False)
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
    tokens = {tenant: mint_in(env, Role.TENANT, tenant) for tenant in (victim_tenant, survivor_tenant)}
    service = ServiceProcess("cdr", env)
    client = create_redis(RedisSettings.from_env(Env(env)))
    timeline = Timeline()
    try:
        service.wait_serving(service_name=CDR_SERVICE)
        pid = service.process.pid
        # As the bootstrap does before it builds the service: the first PING loads the slot map. (A fresh cluster
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
            *(
                asyncio.create_task(
                    drive_rpc(service.address, tokens[victim_tenant], victim_tenant, timeline.victim_rpcs, timeline)
                )
                for _ in range(RPC_CALLERS_PER_TENANT)
            ),
            *(
                asyncio.create_task(
                    drive_rpc(
                        service.address, tokens[survivor_tenant], survivor_tenant, timeline.survivor_rpcs, timeline
                    )
                )
                for _ in range(RPC_CALLERS_PER_TENANT)
            ),
            asyncio.create_task(watch_health(service.address, timeline)),
        ]
        await steady_state(timeline)

        timeline.kill_at = time.monotonic()
        # SIGKILL, as a crashed node: no goodbye to the cluster. In a thread, so the event loop goes on meanwhile.
        await asyncio.to_thread(victim.kill)
        timeline.dead_at = time.monotonic()  # the process is reaped: nothing started from now on reaches it
        tasks.append(asyncio.create_task(watch_promotion(replica, timeline)))

        # Until the replica is master, the victim's slot has taken 10 writes and 5 RPCs in a row since, health is back.
        deadline = timeline.kill_at + RECOVERY_BUDGET_SECONDS
        while time.monotonic() < deadline:
            promoted = timeline.promoted_at
            recent = sorted(timeline.victim_calls, key=lambda c: c.end)[-10:]
            recent_rpcs = sorted(timeline.victim_rpcs, key=lambda c: c.end)[-5:]
            if (
                promoted is not None
                and len(recent) == 10
                and all(c.outcome == "ok" and c.start > promoted for c in recent)
                and len(recent_rpcs) == 5
                and all(c.outcome == "ok" and c.start > promoted for c in recent_rpcs)
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
    unexpected = [line for line in service.lines if '"unexpected error"' in line]
    if unexpected:
        report += "\n  cdr logged unexpected errors:\n" + "\n".join(unexpected)
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
    affected = affected_by_the_failover(timeline.victim_calls, timeline)
    assert affected, report
    for call in affected:
        if call.outcome == "ok":
            assert call.end > timeline.replica_last_seen_as_replica, call
        else:
            assert is_retryable_unavailable(call.error), call
    # The same through the service's gRPC API: its own client (in the cdr process) sees the same failover, and a
    # caller gets UNAVAILABLE or a late answer, nothing else.
    before_kill_rpcs = [c for c in timeline.victim_rpcs + timeline.survivor_rpcs if c.end < timeline.kill_at]
    assert len(before_kill_rpcs) >= 4 and all(c.outcome == "ok" for c in before_kill_rpcs), report
    affected_rpcs = affected_by_the_failover(timeline.victim_rpcs, timeline)
    assert affected_rpcs, report
    for call in affected_rpcs:
        if call.outcome == "ok":
            assert call.end > timeline.replica_last_seen_as_replica, call
        else:
            assert call.outcome == "UNAVAILABLE", call
    for call in timeline.victim_rpcs + timeline.survivor_rpcs:
        assert call.outcome in ("ok", "UNAVAILABLE"), call
    rpcs_after_promotion = [c for c in timeline.victim_rpcs if c.start > timeline.promoted_at]
    assert len(rpcs_after_promotion) >= 5 and all(c.outcome == "ok" for c in rpcs_after_promotion), report

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
            "  " + describe("GetCdrStats, tenant on the killed master", timeline.victim_rpcs),
            "  " + describe("GetCdrStats, tenant on a surviving master", timeline.survivor_rpcs),
            f"  cdr health not SERVING {health_text}",
            f"  counter on the killed master's slot: {counter}",
            f"  recovered (10 writes and 5 GetCdrStats in a row after the promotion, health SERVING) at {recovered}",
        ]
    )


@pytest.fixture
def small_cluster() -> Iterator[RedisClusterServers]:
    servers = start_cluster(3, 0)
    try:
        yield servers
    finally:
        servers.stop()


CLOSED_UNDER_COMMAND = [
    RuntimeError("unable to perform operation on <TCPTransport closed=True reading=False 0x0>; the handler is closed"),
    AttributeError("'NoneType' object has no attribute 'writelines'"),
]


@pytest.mark.parametrize("error", CLOSED_UNDER_COMMAND, ids=["uvloop-closed-transport", "asyncio-writer-none"])
async def test_a_connection_closed_under_a_command_is_retried_and_never_internal(
    small_cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """What redis-py raises when its slot-map refresh closes a connection another task is about to write to (seen
    in the failover test as INTERNAL before create_redis handled it): retried, UNAVAILABLE at worst."""
    client = create_redis(
        RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": small_cluster.url, "NUMPROTECT_REDIS_MODE": "cluster"}))
    )
    keys = ["{closed}:count", "{closed}:last"]
    original = asyncio.StreamWriter.writelines
    failures = {"left": 0}

    def closed_writer(writer: asyncio.StreamWriter, data: Any) -> None:
        """The write of an EVALSHA finds its connection closed (raised where redis-py writes a command)."""
        chunks = list(data)
        if failures["left"] > 0 and any(b"EVALSHA" in bytes(chunk) for chunk in chunks):
            failures["left"] -= 1
            raise type(error)(str(error))
        original(writer, chunks)

    try:
        assert await redis_is_up(client)
        monkeypatch.setattr(asyncio.StreamWriter, "writelines", closed_writer)
        # One such failure: the cluster client retries and the call succeeds (once: the count is 1).
        failures["left"] = 1
        assert await PROBE(client, keys, ["x"]) == 1
        assert failures["left"] == 0

        # Every try fails: the caller gets a ConnectionError, which the services answer with UNAVAILABLE.
        failures["left"] = 1_000
        with pytest.raises(redis.exceptions.ConnectionError) as raised:
            await PROBE(client, keys, ["x"])
        assert is_retryable_unavailable(raised.value)
        assert type(raised.value.__cause__) is type(error) and str(raised.value.__cause__) == str(error)
        failures["left"] = 0
        assert await PROBE(client, keys, ["x"]) == 2  # none of the failed tries reached Redis

        # The same errors raised anywhere else are bugs and stay what they are (INTERNAL, logged).
        monkeypatch.setattr(asyncio.StreamWriter, "writelines", original)
        original_connect = ClusterNode.execute_command

        async def elsewhere(node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
            if args[0] == "EVALSHA":
                raise type(error)(str(error))
            return await original_connect(node, *args, **kwargs)

        monkeypatch.setattr(ClusterNode, "execute_command", elsewhere)
        with pytest.raises(type(error)):
            await PROBE(client, keys, ["x"])
    finally:
        monkeypatch.undo()
        await client.aclose()


# --- translation: its own Redis client (fastredis) through the same failover -----------------------------------

TRANSLATION_SERVICE = "numprotect.translation.v1.TranslationService"
CARRIER = "cm"
PARTY_A = "13800000001"
TRANSLATE_DEADLINE_SECONDS = 1.0
# After the replica says it is master, the other nodes learn it by gossip and translation reloads its slot map
# (at most every 50 ms): calls started this long after the promotion must all succeed.
PROMOTION_GRACE_SECONDS = 1.0


@dataclass
class TranslateTimeline:
    """What the translation callers saw, by the virtual number's master (killed or surviving)."""

    kill_at: float = 0.0
    dead_at: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    unary: dict[str, list[Call]] = field(default_factory=lambda: {"victim": [], "survivor": []})
    stream: dict[str, list[Call]] = field(default_factory=lambda: {"victim": [], "survivor": []})
    stream_ends: list[str] = field(default_factory=list)  # how each TranslateStream ended ("OK" or a status)
    replica_last_seen_as_replica: float = 0.0
    promoted_at: float | None = None
    recovered_at: float | None = None


def number_on(servers: RedisClusterServers, master: RedisServer, *, same: bool) -> str:
    """A virtual number whose routes ({X}) live on `master` (same=True) or on another master."""
    for i in range(1, 10_000):
        number = f"70010{i:010d}"
        if (servers.master_of(f"{{{number}}}").port == master.port) == same:
            return number
    raise AssertionError("no number found")


def translate_request(number: str, call_id: str) -> translation_pb2.TranslateRequest:
    return translation_pb2.TranslateRequest(calling_number="13700000003", called_number=number, call_id=call_id)


def translate_outcome(response: translation_pb2.TranslateResponse) -> str:
    return (
        "ok"
        if response.decision == translation_pb2.DECISION_CONNECT
        else translation_pb2.Decision.Name(response.decision)
    )


async def drive_translate(
    address: str, token: str, number: str, calls: list[Call], timeline: TranslateTimeline
) -> None:
    """Unary Translate (the sync server's combined path) to one number, one call after another."""
    async with secure_channel(address, token) as channel:
        stub = translation_pb2_grpc.TranslationServiceStub(channel)
        n = 0
        while not timeline.stop.is_set():
            n += 1
            start = time.monotonic()
            try:
                response = await stub.Translate(translate_request(number, f"u{n}"), timeout=TRANSLATE_DEADLINE_SECONDS)
                calls.append(Call(start, time.monotonic(), translate_outcome(response)))
            except grpc.aio.AioRpcError as exc:
                calls.append(Call(start, time.monotonic(), exc.code().name, error=exc))
            await asyncio.sleep(CALL_INTERVAL_SECONDS)


async def drive_stream(address: str, token: str, number: str, calls: list[Call], timeline: TranslateTimeline) -> None:
    """One TranslateStream open for the whole test, a call every CALL_INTERVAL_SECONDS; each answer recorded with
    its "<STATUS>" when it is an error."""
    started: dict[str, float] = {}

    async def requests() -> AsyncIterator[translation_pb2.TranslateStreamRequest]:
        n = 0
        while not timeline.stop.is_set():
            n += 1
            call_id = f"s{n}"
            started[call_id] = time.monotonic()
            yield translation_pb2.TranslateStreamRequest(request=translate_request(number, call_id))
            await asyncio.sleep(CALL_INTERVAL_SECONDS)

    async with secure_channel(address, token) as channel:
        stub = translation_pb2_grpc.TranslationServiceStub(channel)
        try:
            async for message in stub.TranslateStream(requests()):
                start = started.pop(message.call_id)
                if message.error:
                    calls.append(Call(start, time.monotonic(), message.error.split(":", 1)[0]))
                else:
                    calls.append(Call(start, time.monotonic(), translate_outcome(message.response)))
            timeline.stream_ends.append("OK")
        except grpc.aio.AioRpcError as exc:
            timeline.stream_ends.append(exc.code().name)


async def watch_promotion_of(replica: RedisServer, timeline: TranslateTimeline) -> None:
    while timeline.promoted_at is None and not timeline.stop.is_set():
        asked = time.monotonic()
        if await asyncio.to_thread(role, replica) == "master":
            timeline.promoted_at = time.monotonic()
        else:
            timeline.replica_last_seen_as_replica = asked
            await asyncio.sleep(0.02)


# About 25 s (a cluster of six, a failover, a service process): make chaos, not make test.
@pytest.mark.chaos
async def test_killing_a_master_translate_is_unavailable_for_its_numbers_until_promoted(
    cluster: RedisClusterServers,
) -> None:
    """Translate and TranslateStream on a real translation process in cluster mode (fastredis, not redis-py), for a
    virtual number on the master that is killed and one on a master that survives: the killed master's number
    answers UNAVAILABLE (never INTERNAL or UNKNOWN) until its replica is promoted, then CONNECT again, without a
    restart; the surviving master's number answers CONNECT throughout; the open streams stay open."""
    victim_number = "700100000000001"
    victim = cluster.master_of(f"{{{victim_number}}}")
    numbers = {"victim": victim_number, "survivor": number_on(cluster, victim, same=False)}
    before = cluster_nodes(victim)
    (replica,) = [node for node in cluster.nodes if before[node.port][2] == before[victim.port][0]]

    env = {
        "NUMPROTECT_REDIS_URL": cluster.url,
        "NUMPROTECT_REDIS_MODE": "cluster",
        "NUMPROTECT_HEALTH_INTERVAL": "0.1s",
        # Rate limits off: the calls repeat one caller far beyond them.
        "NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "0",
        "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "0",
    }
    admin = cluster.client()
    record_blocks(admin, CARRIER, *numbers.values())
    admin.close()
    redis_client = create_redis(RedisSettings.from_env(Env(env)))
    routes = RouteTable(redis_client)
    for name, number in numbers.items():
        route = Route(f"b-{name}", "t1", MODE_AXN, PARTY_A, "", RESTRICTION_NONE, False, False, 0)
        await routes.put(number, dataclasses.replace(route, expire_ms=int(time.time() * 1000) + 3_600_000))
    await redis_client.aclose()
    token = mint_in(env, Role.CARRIER, CARRIER)
    service = ServiceProcess("translation", env)
    timeline = TranslateTimeline()
    try:
        service.wait_serving(service_name=TRANSLATION_SERVICE)
        pid = service.process.pid
        tasks = []
        for name, number in numbers.items():
            tasks += [
                asyncio.create_task(drive_translate(service.address, token, number, timeline.unary[name], timeline))
                for _ in range(RPC_CALLERS_PER_TENANT)
            ]
            tasks.append(
                asyncio.create_task(drive_stream(service.address, token, number, timeline.stream[name], timeline))
            )
        deadline = time.monotonic() + STEADY_STATE_BUDGET_SECONDS
        while (
            min(
                sum(c.outcome == "ok" for c in calls) for calls in (*timeline.unary.values(), *timeline.stream.values())
            )
            < 10
        ):
            assert time.monotonic() < deadline, "no steady state before the kill"
            await asyncio.sleep(0.05)

        timeline.kill_at = time.monotonic()
        await asyncio.to_thread(victim.kill)
        timeline.dead_at = time.monotonic()
        tasks.append(asyncio.create_task(watch_promotion_of(replica, timeline)))
        deadline = timeline.kill_at + RECOVERY_BUDGET_SECONDS
        while time.monotonic() < deadline:
            promoted = timeline.promoted_at
            recent = [
                sorted(calls, key=lambda c: c.end)[-10:]
                for calls in (timeline.unary["victim"], timeline.stream["victim"])
            ]
            if promoted is not None and all(
                len(calls) == 10 and all(c.outcome == "ok" and c.start > promoted for c in calls) for calls in recent
            ):
                timeline.recovered_at = time.monotonic()
                break
            await asyncio.sleep(0.05)
        if timeline.promoted_at is not None:  # calls past the grace period, to check they all succeed
            await asyncio.sleep(max(0.0, timeline.promoted_at + PROMOTION_GRACE_SECONDS + 0.5 - time.monotonic()))
        timeline.stop.set()
        await asyncio.gather(*tasks)
        assert service.process.poll() is None and service.process.pid == pid  # never restarted
        service.wait_serving(service_name=TRANSLATION_SERVICE, timeout=5)
    finally:
        timeline.stop.set()
        assert service.stop() == 0

    report = summarize_translate(timeline)
    unexpected = [line for line in service.lines if '"unexpected error"' in line]
    if unexpected:
        report += "\n  translation logged unexpected errors:\n" + "\n".join(unexpected)
    print(report)
    assert not unexpected, report

    # The streams stayed open to the end; every answer was CONNECT or UNAVAILABLE (never INTERNAL or UNKNOWN).
    assert timeline.stream_ends == ["OK", "OK"], report
    for calls in (*timeline.unary.values(), *timeline.stream.values()):
        assert {c.outcome for c in calls} <= {"ok", "UNAVAILABLE"}, report
        assert all(c.outcome == "ok" for c in calls if c.end < timeline.kill_at), report
    # The surviving master's number: CONNECT throughout.
    for calls in (timeline.unary["survivor"], timeline.stream["survivor"]):
        assert len([c for c in calls if c.start > timeline.kill_at]) >= 10, report
        assert all(c.outcome == "ok" for c in calls), report
    # The killed master's number: UNAVAILABLE while nobody served it (nothing answered from a dead master), CONNECT
    # once the replica was promoted and known.
    assert timeline.promoted_at is not None and timeline.recovered_at is not None, report
    for calls in (timeline.unary["victim"], timeline.stream["victim"]):
        affected = affected_by_the_failover(calls, timeline)  # type: ignore[arg-type]
        assert any(c.outcome == "UNAVAILABLE" for c in affected), report
        assert all(c.end > timeline.replica_last_seen_as_replica for c in affected if c.outcome == "ok"), report
        settled = [c for c in calls if c.start > timeline.promoted_at + PROMOTION_GRACE_SECONDS]
        assert len(settled) >= 10 and all(c.outcome == "ok" for c in settled), report


def summarize_translate(timeline: TranslateTimeline) -> str:
    def rel(at: float) -> float:
        return at - timeline.kill_at

    def describe(name: str, calls: list[Call]) -> str:
        after_kill = [c for c in calls if c.end > timeline.kill_at]
        failed = [c for c in after_kill if c.outcome != "ok"]
        kinds = sorted({c.outcome for c in failed})
        span = f"{rel(min(c.start for c in failed)):.2f}s..{rel(max(c.end for c in failed)):.2f}s" if failed else "-"
        slowest = max((c.end - c.start for c in after_kill), default=0.0)
        last_failed = f"; last failed call started {rel(max(c.start for c in failed)):.2f}s" if failed else ""
        return (
            f"{name}: {len(after_kill)} calls after the kill, {len(failed)} failed ({', '.join(kinds) or '-'}) "
            f"during {span}{last_failed}; slowest call {slowest:.2f}s"
        )

    promoted = f"{rel(timeline.promoted_at):.2f}s" if timeline.promoted_at is not None else "never"
    recovered = f"{rel(timeline.recovered_at):.2f}s" if timeline.recovered_at is not None else "never"
    return "\n".join(
        [
            "redis cluster failover, translation (times after the SIGKILL):",
            f"  replica answers ROLE master at {promoted}",
            "  " + describe("Translate, number on the killed master", timeline.unary["victim"]),
            "  " + describe("TranslateStream, number on the killed master", timeline.stream["victim"]),
            "  " + describe("Translate, number on a surviving master", timeline.unary["survivor"]),
            "  " + describe("TranslateStream, number on a surviving master", timeline.stream["survivor"]),
            f"  streams ended: {', '.join(timeline.stream_ends) or '-'}",
            f"  recovered (10 Translate and 10 streamed calls in a row after the promotion) at {recovered}",
        ]
    )
