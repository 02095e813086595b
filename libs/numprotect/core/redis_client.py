"""Redis client factory (redis.asyncio + hiredis; single node or cluster) and Lua scripts evaluated by SHA."""

from __future__ import annotations

import hashlib
import ssl
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

import hiredis
import redis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import EncodableT, KeyT

from numprotect.core.errors import Unavailable
from numprotect.core.metrics import Metrics, Observer
from numprotect.core.redis_mux import MuxRedis
from numprotect.core.settings import RedisSettings

RedisClient = Redis | RedisCluster
KeyOrArg = str | bytes | int | float


class _FailoverSafeCluster(RedisCluster):
    """RedisCluster that reports a connection closed under a command, before it was sent, as a ConnectionError.

    When redis-py (8.1.0) refreshes the slot map during a failover it closes node connections that other
    tasks may be using at that moment; their next write then fails with RuntimeError (uvloop: "unable to perform
    operation on <TCPTransport closed=True ...>; the handler is closed") or AttributeError ("'NoneType' object
    has no attribute 'writelines'"). Nothing was sent, so as ConnectionError the cluster client retries safely on
    a fresh connection and, if the retries run out, callers get UNAVAILABLE instead of INTERNAL
    (docs/operations.md, "Redis Cluster failover").
    """

    async def _execute_command(self, target_node: ClusterNode, *args: KeyT | EncodableT, **kwargs: Any) -> Any:
        try:
            return await super()._execute_command(target_node, *args, **kwargs)
        except (RuntimeError, AttributeError) as exc:
            if not _closed_before_sending(exc):
                raise
            raise RedisConnectionError(f"connection to {target_node.name} closed under the command: {exc}") from exc


def _closed_before_sending(exc: BaseException) -> bool:
    """True for the two errors above when raised by the write of a command (so the command never left)."""
    text = str(exc)
    if isinstance(exc, AttributeError) and text != "'NoneType' object has no attribute 'writelines'":
        return False
    if isinstance(exc, RuntimeError) and not ("unable to perform operation on" in text and "closed" in text):
        return False
    return any(
        frame.name == "_send_packed_command" and "writelines" in (frame.line or "")
        for frame in traceback.extract_tb(exc.__traceback__)
    )


# Error replies that say "not now" rather than "never" (the first word of the reply; redis-py raises them as
# ResponseError subclasses, hiredis as ReplyError, a script's failing redis.call keeps the word): the same command
# may succeed later, so the caller gets UNAVAILABLE with a retry hint, never INTERNAL. Each: ErrorInfo reason,
# suggested retry delay in seconds. docs/operations.md, "Redis errors and what callers get".
RETRYABLE_REPLIES: dict[str, tuple[str, float]] = {
    "LOADING": ("REDIS_LOADING", 1.0),  # a restarted Redis reading its AOF/RDB; reads and writes wait
    "BUSY": ("REDIS_BUSY", 1.0),  # a script running past busy-reply-threshold
    "READONLY": ("REDIS_READONLY", 1.0),  # a replica, or a master demoted by a failover
    "MASTERDOWN": ("REDIS_MASTERDOWN", 1.0),  # a replica that lost its master (replica-serve-stale-data no)
    "TRYAGAIN": ("REDIS_TRYAGAIN", 0.1),  # a multi-key command during a slot migration
    "CLUSTERDOWN": ("REDIS_CLUSTERDOWN", 1.0),  # slots uncovered until a replica is promoted
    "NOREPLICAS": ("REDIS_NOREPLICAS", 1.0),  # min-replicas-to-write not met: writes refused, reads go on
    "MISCONF": ("REDIS_PERSISTENCE_FAILED", 5.0),  # an RDB/AOF write failed (disk full): writes refused, reads go on
    # maxmemory reached with a noeviction policy: writes refused, reads go on. UNAVAILABLE rather than
    # RESOURCE_EXHAUSTED: that code means the caller's pool or quota here (CreateBinding's "no number left"), and
    # no change of request helps; the operator frees memory and the same call then succeeds.
    "OOM": ("REDIS_OUT_OF_MEMORY", 5.0),
}
# redis-py raises these codes as their own classes, with the code cut off the message.
_REPLY_CLASSES: tuple[tuple[type[Exception], str], ...] = (
    (BusyLoadingError, "LOADING"),
    (ReadOnlyError, "READONLY"),
    (MasterDownError, "MASTERDOWN"),  # before its base class ClusterDownError
    (ClusterDownError, "CLUSTERDOWN"),
    (TryAgainError, "TRYAGAIN"),
    (OutOfMemoryError, "OOM"),
)
_CONNECTION_FAILURES = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)
# A cluster client's topology failures (no node reachable, slots uncovered during a failover), not its usage errors.
_CLUSTER_TOPOLOGY_FAILURES = ("Redis Cluster cannot be connected", "All slots are not covered", "startup_nodes could")


def storage_unavailable(exc: BaseException) -> Unavailable | None:
    """UNAVAILABLE (with its retry hint) for a transient Redis condition raised through redis-py (asyncio or
    blocking, standalone or cluster) or hiredis, None for anything else (a bug, or an error a retry cannot fix).

    Transient: no connection or no answer in time (ConnectionError, TimeoutError, incl. LOADING, which redis-py
    raises as BusyLoadingError, and a full connection pool), a cluster client out of reachable nodes or slots
    (SlotNotCoveredError and RedisClusterException's topology failures), and the error replies of RETRYABLE_REPLIES.
    """
    for kind, word in _REPLY_CLASSES:
        if isinstance(exc, kind):
            return _retryable_reply(word)
    if isinstance(exc, (ResponseError, hiredis.ReplyError)):
        word = str(exc).split(" ", 1)[0]  # the codes redis-py has no class for keep their first word
        return _retryable_reply(word) if word in RETRYABLE_REPLIES else None
    if isinstance(exc, _CONNECTION_FAILURES) or _while_reconnecting(exc):
        return Unavailable("storage unavailable, retry later", reason="REDIS_UNREACHABLE")
    if isinstance(exc, SlotNotCoveredError) or (
        isinstance(exc, RedisClusterException) and str(exc).startswith(_CLUSTER_TOPOLOGY_FAILURES)
    ):
        return Unavailable("storage cluster unavailable, retry later", reason="REDIS_CLUSTERDOWN")
    return None


def _while_reconnecting(exc: BaseException) -> bool:
    """A RuntimeError raised while redis-py handled a connection failure: it reconnects on a transport the event loop
    has just closed, and uvloop refuses the write ("unable to perform operation on <TCPTransport closed=True ...>;
    the handler is closed"; seen in an IngestCdrs as Redis was killed -9). The failure underneath is the outage."""
    return isinstance(exc, RuntimeError) and isinstance(exc.__context__, _CONNECTION_FAILURES)


def _retryable_reply(word: str) -> Unavailable:
    reason, retry_after = RETRYABLE_REPLIES[word]
    return Unavailable(f"storage unavailable ({word}), retry later", retry_after=retry_after, reason=reason)


def connection_options(settings: RedisSettings) -> dict[str, Any]:
    """What every redis-py client (asyncio or blocking, standalone or cluster) gets besides the URL: timeouts,
    the ACL user and password, and for rediss:// verified TLS (CERT_REQUIRED, hostname checked, TLS 1.2+).

    redis-py builds its own SSLContext from these: it trusts the CA file in addition to the system store (the
    translation hot path's ScriptClient trusts the CA file alone; docs/security.md).
    """
    options: dict[str, Any] = {
        # Off: with redis-py's default ("auto", truthy) the pool skips its check of a pooled connection before use
        # (redis-py 8.1, asyncio), so every connection Redis closed while idle (a restart) failed its next command
        # with "Connection closed by server". We use no RESP3 maintenance push notifications.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        # No health_check_interval: its PING before a command refused a read while Redis refuses writes (MISCONF
        # fails PING too), and what it would find is found without a round trip: the pool drops a connection Redis
        # closed (above), and a peer gone silent fails the command within socket_timeout (UNAVAILABLE).
        "socket_timeout": settings.timeout_seconds,
        "socket_connect_timeout": settings.timeout_seconds,
        "max_connections": settings.max_connections,
    }
    if settings.password is not None:
        options["username"] = settings.username
        options["password"] = settings.password
    if settings.tls is not None:
        options.update(
            ssl_cert_reqs="required",
            ssl_check_hostname=True,
            ssl_ca_certs=settings.tls.ca_file,
            ssl_certfile=settings.tls.cert_file,
            ssl_keyfile=settings.tls.key_file,
            ssl_min_version=ssl.TLSVersion.TLSv1_2,
        )
    return options


def as_text(value: bytes | str) -> str:
    """A reply of a client with or without decode_responses, as text."""
    return value.decode() if isinstance(value, bytes) else value


def create_redis(settings: RedisSettings, *, write_path: bool = False, metrics: Metrics | None = None) -> RedisClient:
    """A client for the configured Redis; in cluster mode the URL names one node and the topology is discovered.

    `write_path` (binding's and allocation's own client): the multiplexing client (numprotect.core.redis_mux)
    unless NUMPROTECT_REDIS_CLIENT=redis-py; otherwise, and for every other caller, redis.asyncio. With `metrics`
    the multiplexing client observes numprotect_redis_round_trip_seconds{client="mux"}."""
    if write_path and settings.client == "mux":
        return MuxRedis(settings, round_trip=metrics.redis_round_trip("mux") if metrics is not None else None)
    if write_path and metrics is not None and metrics.enabled:
        client = create_redis(settings)
        observe_round_trips(client, metrics.redis_round_trip("redis-py"))
        return client
    common = connection_options(settings)
    if settings.mode == "cluster":
        return _FailoverSafeCluster.from_url(settings.url, **common)
    return Redis.from_url(settings.url, **common)


SyncRedisClient = redis.Redis | redis.RedisCluster


def create_sync_redis(settings: RedisSettings, *, max_connections: int | None = None) -> SyncRedisClient:
    """A blocking client for the configured Redis (thread-safe; the thread-pool server's and the health probe's)."""
    common = connection_options(settings)
    common["max_connections"] = max_connections or settings.max_connections
    if settings.mode == "cluster":
        return redis.RedisCluster.from_url(settings.url, **common)
    return redis.Redis.from_url(settings.url, **common)


# Commands that wait on purpose (for stream entries, replicas, list elements): not round trips worth a histogram.
_WAITING_COMMANDS = frozenset(
    {"XREAD", "XREADGROUP", "WAIT", "WAITAOF", "BLPOP", "BRPOP", "BLMOVE", "BLMPOP", "BRPOPLPUSH"}
    | {"BZPOPMIN", "BZPOPMAX", "BZMPOP"}
)


def observe_round_trips(client: RedisClient | SyncRedisClient, round_trip: Observer) -> None:
    """numprotect_redis_round_trip_seconds{client="redis-py"} for this redis-py client (asyncio or blocking): each
    command and each pipeline's `execute` (once), as the caller waits for it, retries included; the commands of
    `_WAITING_COMMANDS` are left out. Per client, as the span instrumentation does (instance attributes over the
    class's methods, so other clients stay untouched); apply it after `Telemetry.instrument_redis`."""
    if isinstance(client, (Redis, RedisCluster)):
        _observe_async(client, round_trip.observe)
    else:
        _observe_sync(client, round_trip.observe)


def _observe_async(client: Any, observe: Callable[[float], None]) -> None:
    command = client.execute_command
    make_pipeline = client.pipeline

    async def execute_command(*args: Any, **options: Any) -> Any:
        if args[0] in _WAITING_COMMANDS:
            return await command(*args, **options)
        started = perf_counter()
        reply = await command(*args, **options)
        observe(perf_counter() - started)
        return reply

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        made = make_pipeline(*args, **kwargs)
        execute = made.execute

        async def timed(*execute_args: Any, **execute_kwargs: Any) -> Any:
            started = perf_counter()
            replies = await execute(*execute_args, **execute_kwargs)
            observe(perf_counter() - started)
            return replies

        made.execute = timed
        return made

    client.execute_command = execute_command
    client.pipeline = pipeline


def _observe_sync(client: Any, observe: Callable[[float], None]) -> None:
    command = client.execute_command
    make_pipeline = client.pipeline

    def execute_command(*args: Any, **options: Any) -> Any:
        if args[0] in _WAITING_COMMANDS:
            return command(*args, **options)
        started = perf_counter()
        reply = command(*args, **options)
        observe(perf_counter() - started)
        return reply

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        made = make_pipeline(*args, **kwargs)
        execute = made.execute

        def timed(*execute_args: Any, **execute_kwargs: Any) -> Any:
            started = perf_counter()
            replies = execute(*execute_args, **execute_kwargs)
            observe(perf_counter() - started)
            return replies

        made.execute = timed
        return made

    client.execute_command = execute_command
    client.pipeline = pipeline


def sync_redis_is_up(client: SyncRedisClient) -> bool:
    """True when Redis answers PING (every primary in cluster mode), or refuses it with MISCONF only."""
    try:
        if isinstance(client, redis.RedisCluster):
            return bool(client.ping(target_nodes=redis.RedisCluster.PRIMARIES))
        return bool(client.ping())
    except Exception as exc:
        return _answers_reads(exc)


def is_cluster(client: RedisClient) -> bool:
    """Whether `client` talks to a Redis Cluster (redis-py's cluster client, or the multiplexing one in that mode)."""
    return isinstance(client, RedisCluster) or (isinstance(client, MuxRedis) and client.is_cluster)


async def redis_is_up(client: RedisClient) -> bool:
    """True when Redis answers PING (every node in cluster mode), or refuses it with MISCONF only."""
    try:
        if is_cluster(client):
            replies = await client.ping(target_nodes=RedisCluster.PRIMARIES)
            return bool(replies)
        return bool(await client.ping())
    except Exception as exc:
        return _answers_reads(exc)


def _answers_reads(exc: BaseException) -> bool:
    """Redis refuses PING with MISCONF while a save fails (disk full): writes fail (UNAVAILABLE) but reads go on,
    so the service stays ready rather than take its reads out of the load balancer."""
    return isinstance(exc, ResponseError) and str(exc).startswith("MISCONF")


class LuaScript:
    """A Lua script kept in a .lua file beside the code that calls it, evaluated by SHA.

    The first call on a Redis that has not seen the script loads it (NOSCRIPT), then EVALSHA is used
    again, so the steady state is one round trip per call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = path.read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self.name = path.stem

    @classmethod
    def beside(cls, module_file: str, name: str) -> LuaScript:
        """The script `name` in the `lua/` folder next to `module_file`."""
        return cls(Path(module_file).with_name("lua") / name)

    @classmethod
    def from_source(cls, name: str, source: str) -> LuaScript:
        """A script kept as a constant beside the schema it belongs to (e.g. identity.directory's)."""
        script = cls.__new__(cls)
        script.path = Path(name)
        script.source = source
        script.sha = hashlib.sha1(source.encode()).hexdigest()
        script.name = name
        return script

    async def __call__(self, client: RedisClient, keys: Sequence[KeyOrArg], args: Sequence[KeyOrArg] = ()) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]

    async def load(self, client: RedisClient) -> None:
        await client.script_load(self.source)  # a cluster client loads it on every primary
