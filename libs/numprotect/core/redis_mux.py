"""A multiplexing asyncio Redis client for the write path (binding, allocation): NUMPROTECT_REDIS_CLIENT=mux.

redis.asyncio spends most of a command's CPU around the command: a pooled connection taken and given back, a
Retry wrapper, the command packed into a list, one StreamWriter.writelines per command, the reply read through a
StreamReader. Here every coroutine of the process shares one connection per Redis node (two: writes and scripts on
one, read-only commands on the other, so that a write Redis holds back, CLIENT PAUSE WRITE during a failover, holds
up no read): a command is RESP-encoded into one bytes object, appended to the connection's output buffer and its
future queued; the buffer goes out in one `transport.write` when the loop next runs its callbacks (`loop.call_soon`
on the first command), so the commands of concurrent calls share one write (and Redis one read). Replies are parsed
by a hiredis.Reader fed in `data_received` and handed to the futures in order (Redis answers a connection's commands
in order).

To its callers it is a `redis.asyncio.Redis`: redis-py's command methods, their RESP2 response callbacks (the
return types are redis-py's; tests/core/test_redis_mux.py compares them), redis-py's exception classes for error
replies (`BaseParser.parse_error`), pipelines (one write per node; MULTI ... EXEC sent contiguous, so the
transaction is whole on the shared connection), `LuaScript` (NOSCRIPT, load, again) and redis-py's CLIENT spans.

Faults, bounded by NUMPROTECT_REDIS_TIMEOUT (`timeout_seconds`):
- A command without its reply a timeout after it was queued fails with redis TimeoutError, as with redis-py's socket
  timeout (its entry stays to take the late reply). A peer silent for the timeout while commands wait (no byte of
  any reply): the connection is dropped, all its commands fail with TimeoutError; the next command connects again.
- A connection lost (refused, reset, closed by Redis): its commands fail with redis ConnectionError, except those
  it never sent and those safe to run twice (scripts, docs/redis-schema.md "Scripts run twice"; reads; writes that
  leave the same state, `_REPEAT_SAFE`), which are sent again on a new connection.
- "Not now" replies (LOADING, BUSY, TRYAGAIN, CLUSTERDOWN, READONLY, MASTERDOWN) are sent again after short, growing
  pauses while the timeout lasts, then raised (redis-py's classes: storage_unavailable makes them UNAVAILABLE).
- Redis Cluster: the slot map from CLUSTER SLOTS, routing by the command's first key; MOVED updates the slot and
  reloads the map, ASK sends ASKING and the command to the importing node, CLUSTERDOWN/READONLY/MASTERDOWN reload
  the map first; a node that refuses connections reloads the map and the command goes to the slot's new owner
  (a promoted replica) or fails at once with ConnectionError. Commands without keys go where redis-py's cluster
  client sends them (RedisCluster.COMMAND_FLAGS: SCRIPT LOAD to every primary, PING/INFO to one node;
  `target_nodes=RedisCluster.PRIMARIES` too), with its result callbacks.

Not multiplexed: commands that hold state on their connection (WATCH, SUBSCRIBE, MONITOR, SELECT, CLIENT REPLY,
MULTI/EXEC outside a pipeline, ...) raise `NotMultiplexed` naming the alternative. Blocking commands (BLPOP, XREAD
BLOCK, ...) and pipelines holding WAIT get a dedicated connection for their duration, so they hold nobody up; a
bare WAIT goes on the shared writes connection, where it counts everything this client wrote to the node before it
(its timeout must be below the client's).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from time import perf_counter
from typing import Any, cast
from urllib.parse import parse_qs, urlparse

import hiredis
from redis._parsers.base import BaseParser
from redis._parsers.encoders import Encoder
from redis._parsers.response_callbacks import get_response_callbacks
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.client import EMPTY_RESPONSE, NEVER_DECODE, CaseInsensitiveDict
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ExecAbortError,
    MovedError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
    WatchError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from numprotect.core.metrics import UNOBSERVED, Observer
from numprotect.core.settings import RedisSettings, SettingsError

log = logging.getLogger(__name__)

# Pauses between tries of a command answered "not now": first, doubling up to most (seconds).
_PAUSE_FIRST = 0.005
_PAUSE_MOST = 0.1
# Sends of one command without a pause (redirections, connections lost, nodes gone) before its error is the answer.
_MOST_ROUNDS = 16
# Commands failing together (a dead node, a resharding) share one CLUSTER SLOTS per interval.
_SLOTS_RELOAD_INTERVAL = 0.05
# How long a connection found silent for its timeout gets for a reply already on its way before it is dropped.
_SILENCE_GRACE = 0.05
# Idle dedicated connections (blocking commands, WAIT pipelines) kept per node.
_IDLE_DEDICATED = 4

_ASKING = b"*1\r\n$6\r\nASKING\r\n"
_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"
_CLUSTER_SLOTS = b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n"

# Commands that may run twice with the same end state: sent again when the connection dropped after sending them.
# Every script of the project is repeat-safe (docs/redis-schema.md "Scripts run twice"). ZADD with INCR is not.
_REPEAT_SAFE = frozenset(
    {
        "EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL_RO",
        "GET", "MGET", "GETRANGE", "STRLEN", "EXISTS", "TYPE", "TTL", "PTTL", "EXPIRETIME", "PEXPIRETIME", "DUMP",
        "HGET", "HMGET", "HGETALL", "HKEYS", "HVALS", "HLEN", "HEXISTS", "HSTRLEN", "HSCAN",
        "SMEMBERS", "SISMEMBER", "SMISMEMBER", "SCARD", "SSCAN", "SINTER", "SUNION", "SDIFF",
        "ZSCORE", "ZMSCORE", "ZRANGE", "ZRANGEBYSCORE", "ZRANGEBYLEX", "ZREVRANGE", "ZREVRANGEBYSCORE",
        "ZREVRANGEBYLEX", "ZCARD", "ZCOUNT", "ZLEXCOUNT", "ZRANK", "ZREVRANK", "ZSCAN",
        "LRANGE", "LLEN", "LINDEX", "LPOS", "XRANGE", "XREVRANGE", "XLEN", "XINFO", "XREAD",
        "SCAN", "KEYS", "DBSIZE", "PING", "ECHO", "INFO", "TIME", "ROLE", "LASTSAVE", "WAIT", "WAITAOF",
        "SCRIPT EXISTS", "SCRIPT LOAD", "SCRIPT FLUSH", "CLUSTER SLOTS", "CLUSTER INFO", "CLUSTER NODES",
        "CLUSTER MYID", "CLUSTER KEYSLOT", "CONFIG GET", "MEMORY USAGE", "OBJECT ENCODING", "CLIENT SETNAME",
        "SET", "SETEX", "PSETEX", "SETNX", "MSET", "DEL", "UNLINK", "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT",
        "PERSIST", "HSET", "HMSET", "HSETNX", "HDEL", "SADD", "SREM", "ZADD", "ZREM", "ZREMRANGEBYLEX",
        "ZREMRANGEBYSCORE", "XDEL", "PFADD", "FLUSHALL", "FLUSHDB",
    }
)  # fmt: skip
# Read-only commands: they go on a connection of their own (the reads lane), so a write that Redis holds back
# (CLIENT PAUSE WRITE, as a failover does) holds up no read behind it on the same connection.
_READ_ONLY = frozenset(
    {
        "GET", "MGET", "GETRANGE", "STRLEN", "EXISTS", "TYPE", "TTL", "PTTL", "EXPIRETIME", "PEXPIRETIME",
        "HGET", "HMGET", "HGETALL", "HKEYS", "HVALS", "HLEN", "HEXISTS", "HSTRLEN", "HSCAN",
        "SMEMBERS", "SISMEMBER", "SMISMEMBER", "SCARD", "SSCAN",
        "ZSCORE", "ZMSCORE", "ZRANGE", "ZRANGEBYSCORE", "ZRANGEBYLEX", "ZREVRANGE", "ZREVRANGEBYSCORE",
        "ZREVRANGEBYLEX", "ZCARD", "ZCOUNT", "ZLEXCOUNT", "ZRANK", "ZREVRANK", "ZSCAN",
        "LRANGE", "LLEN", "LINDEX", "XRANGE", "XREVRANGE", "XLEN", "EVALSHA_RO", "EVAL_RO", "FCALL_RO",
        "SCAN", "DBSIZE", "PING", "ECHO", "INFO", "TIME", "SCRIPT EXISTS", "CLUSTER SLOTS",
    }
)  # fmt: skip
_WRITES, _READS = 0, 1
# Commands that hold state on their connection, with what to use instead.
_REFUSED = {
    **dict.fromkeys(
        ("WATCH", "UNWATCH"), "keeps state on its connection: use a Lua script, or NUMPROTECT_REDIS_CLIENT=redis-py"
    ),
    **dict.fromkeys(("MULTI", "EXEC", "DISCARD"), "only inside pipeline(transaction=True)"),
    **dict.fromkeys(
        ("SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE", "MONITOR", "SYNC"),
        "takes its connection over: use a redis-py client (numprotect.core.redis_client.create_redis)",
    ),
    **dict.fromkeys(
        ("SELECT", "AUTH", "HELLO", "RESET", "QUIT", "CLIENT REPLY", "CLIENT TRACKING", "READONLY", "READWRITE"),
        "changes the shared connection (database, user, protocol and replies are the client's settings)",
    ),
    "ASKING": "is sent by the client itself after an ASK redirection",
}
# Commands that block their connection: sent on a dedicated one. Each: where its block time is ("BLOCK" ms option,
# or the last argument in seconds).
_BLOCKING = {
    **dict.fromkeys(("BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BZPOPMIN", "BZPOPMAX"), "last"),
    **dict.fromkeys(("BLMPOP", "BZMPOP"), "second"),
    **dict.fromkeys(("XREAD", "XREADGROUP"), "option"),
}
# Commands that wait for replicas: on the shared connection alone, with a timeout below the client's.
_WAITS = frozenset({"WAIT", "WAITAOF"})
# Routing in a cluster. Commands without keys; containers whose subcommands have none; the key after a subcommand;
# scripts and functions (keys after numkeys).
_KEYLESS = frozenset(
    {
        "PING", "ECHO", "INFO", "TIME", "DBSIZE", "FLUSHALL", "FLUSHDB", "SCAN", "KEYS", "RANDOMKEY", "LASTSAVE",
        "SAVE", "BGSAVE", "BGREWRITEAOF", "ROLE", "WAIT", "WAITAOF", "SHUTDOWN", "SWAPDB", "LOLWUT", "PUBLISH",
        "REPLICAOF", "SLAVEOF", "FAILOVER", "DEBUG", "SCRIPT", "CLUSTER", "CLIENT", "CONFIG", "FUNCTION", "ACL",
        "SLOWLOG", "LATENCY", "COMMAND", "MODULE", "PUBSUB",
    }
)  # fmt: skip
_SUBCOMMAND_THEN_KEY = frozenset({"OBJECT", "XINFO", "XGROUP", "MEMORY"})
_NUMKEYS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
_STREAMS = frozenset({"XREAD", "XREADGROUP"})
# Error replies that mean "not now": the command did not run and may succeed later.
_NOT_NOW: tuple[type[RedisError], ...] = (BusyLoadingError, TryAgainError, ClusterDownError, ReadOnlyError)
# ... of which these say the node may no longer serve the slot: the slot map is reloaded first.
_RELOAD_FIRST: tuple[type[RedisError], ...] = (ClusterDownError, ReadOnlyError)

_parse_error = BaseParser.parse_error
# A pipeline's queued commands: (arguments, options), as redis-py's Pipeline.command_stack.
_Stack = list[tuple[tuple[Any, ...], Mapping[str, Any]]]


class NotMultiplexed(RedisError):
    """A command or feature that cannot share a connection (the message says what to use instead)."""


class _NoConnection(RedisConnectionError):
    """No connection could be made to a node (refused, unreachable, TLS handshake failed)."""


class _Lost(Exception):
    """The connection dropped with the command in it: `sent` says whether it may have reached Redis."""

    def __init__(self, sent: bool, error: RedisError) -> None:
        super().__init__(str(error))
        self.sent = sent
        self.error = error


def _not_now(error: RedisError) -> bool:
    return isinstance(error, _NOT_NOW) or (type(error) is ResponseError and str(error).startswith("BUSY "))


class _Batch:
    """A queued entry expecting `count` replies (a single command's entry is its bare future).

    `raw`, per reply, whether it is read without decoding (NEVER_DECODE, with decode_responses); the first `skip`
    replies are dropped (ASKING's); `single` hands on the one reply left rather than a list."""

    __slots__ = ("count", "future", "raw", "replies", "single", "skip")

    def __init__(
        self,
        future: asyncio.Future[Any],
        count: int,
        raw: Sequence[bool] | None = None,
        *,
        skip: int = 0,
        single: bool = False,
    ) -> None:
        self.future = future
        self.count = count
        self.raw = raw
        self.skip = skip
        self.single = single
        self.replies: list[Any] = []

    def result(self) -> Any:
        if self.single:
            return self.replies[self.skip]
        return self.replies[self.skip :] if self.skip else self.replies


class _Connection(asyncio.Protocol):
    """One connection: commands appended to `buffer` (written once per loop pass), their entries in `pending`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, where: str, timeout: float, decode: Encoder | None) -> None:
        self.loop = loop
        self.where = where
        # A command without its reply this long after it was queued fails with redis TimeoutError (the reply, if it
        # comes, goes to nobody); a peer that sent nothing for this long while commands wait is dropped.
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        options: dict[str, Any] = {"replyError": _parse_error}
        if decode is not None:
            options.update(encoding=decode.encoding, errors=decode.encoding_errors)
        self.decoding = decode is not None
        self.reader = hiredis.Reader(**options)
        self.pending: deque[Any] = deque()
        self.deadlines: deque[float] = deque()  # of the entries in `pending`, loop time
        self.buffer: list[bytes] = []
        self.unsent = 0  # entries at the end of `pending` whose bytes are still in `buffer`
        self.flushing = False
        self.closed = False
        self.heard = 0.0  # loop time of the last reply, or of the first command sent into an empty queue
        self.suspected = -1.0  # `heard` when the connection was last found silent
        self.timer: asyncio.TimerHandle | None = None
        self.writes = 0  # transport.write calls (tests and benchmarks count coalescing with it)
        self.on_close: Callable[[_Connection], None] | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is no subclass of asyncio.Transport: cast, do not assert (services run on uvloop).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        self.heard = self.loop.time()
        pending = self.pending
        deadlines = self.deadlines
        gets = reader.gets
        try:
            while pending:
                head = pending[0]
                if head.__class__ is _Batch:
                    replies = head.replies
                    raw = head.raw
                    while True:
                        reply = gets(not raw[len(replies)]) if raw is not None and self.decoding else gets()
                        if reply is False:
                            return
                        replies.append(reply)
                        if len(replies) == head.count:
                            break
                    pending.popleft()
                    deadlines.popleft()
                    future = head.future
                    if not future.done():
                        future.set_result(head.result())
                else:
                    reply = gets()
                    if reply is False:
                        return
                    pending.popleft()
                    deadlines.popleft()
                    if not head.done():
                        head.set_result(reply)
            if reader.has_data():  # bytes with no command waiting: the stream is out of step
                self.abort(RedisConnectionError(f"unexpected data from {self.where}"))
        except hiredis.ProtocolError as exc:
            self.abort(RedisConnectionError(f"protocol error from {self.where}: {exc}"))

    def eof_received(self) -> bool:
        self.abort(RedisConnectionError(f"Connection closed by server ({self.where})."))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        reason = f": {exc}" if exc is not None else ""
        self.abort(RedisConnectionError(f"Connection to {self.where} lost{reason}"))

    # --- sending ---------------------------------------------------------------------------------------------

    def send(self, data: bytes, entry: Any) -> None:
        """Queues a command's bytes and its entry; the bytes go out with everything queued in this loop pass."""
        if self.closed:
            # Dropped after its opener handed it out (a peer gone between the connect and the waiters' turn):
            # nothing would send these bytes or fail the entry, so it fails now, as never sent.
            future = entry.future if entry.__class__ is _Batch else entry
            future.set_exception(_Lost(False, RedisConnectionError(f"Connection to {self.where} closed")))
            return
        pending = self.pending
        now = self.loop.time()
        if not pending:
            self.heard = now
            if self.timer is None:
                self.timer = self.loop.call_at(now + self.timeout, self._check_time)
        pending.append(entry)
        self.deadlines.append(now + self.timeout)
        self.buffer.append(data)
        self.unsent += 1
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        buffer = self.buffer
        if self.closed or not buffer or self.transport is None:
            return
        try:
            self.transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))
        except (RuntimeError, OSError) as exc:  # closed under us (uvloop raises) before connection_lost: not sent
            self.abort(RedisConnectionError(f"connection to {self.where} closed: {exc}"))
            return
        self.buffer = []
        self.unsent = 0
        self.writes += 1

    def _check_time(self) -> None:
        """Fails the commands whose timeout has passed; drops the connection when the peer went silent."""
        self.timer = None
        if self.closed or not self.pending:
            return
        now = self.loop.time()
        if self.deadlines[0] > now:
            self.timer = self.loop.call_at(self.deadlines[0], self._check_time)
            return
        # The commands past their timeout fail; their entries stay, to take their replies if they come.
        due = self.heard + self.timeout
        for entry, deadline in zip(self.pending, self.deadlines, strict=True):
            if deadline > now:
                due = deadline
                break
            future = entry.future if entry.__class__ is _Batch else entry
            if not future.done():
                future.set_exception(RedisTimeoutError(f"Timeout reading from {self.where}"))
        if now - self.heard >= self.timeout:
            # Silent for the timeout: dropped, unless a reply arrives within a short grace. (uvloop runs due timers
            # before it reads the sockets: on a starved host a reply may be waiting there unread.)
            if self.suspected == self.heard:
                self.abort(
                    RedisTimeoutError(f"Timeout reading from {self.where}: nothing in {self.timeout:g} s"), silent=True
                )
                return
            self.suspected = self.heard
            due = now + min(_SILENCE_GRACE, self.timeout)
        self.timer = self.loop.call_at(due, self._check_time)

    def abort(self, error: RedisError, *, silent: bool = False) -> None:
        """Drops the connection. Its sent commands fail with `error` (a silent peer: TimeoutError, never sent
        again) or as _Lost (the caller may send them again); those never sent as _Lost(sent=False)."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending = self.pending, deque()
        self.deadlines = deque()
        sent = len(pending) - self.unsent
        self.buffer = []
        self.unsent = 0
        for index, entry in enumerate(pending):
            future = entry.future if entry.__class__ is _Batch else entry
            if future.done():
                continue
            copy = type(error)(*error.args)
            if silent and index < sent:
                future.set_exception(copy)
            else:
                future.set_exception(_Lost(index < sent, copy))
        if self.transport is not None:
            self.transport.abort()
        if self.on_close is not None:
            self.on_close(self)

    def close(self) -> None:
        self.abort(RedisConnectionError(f"connection to {self.where} closed by the client"))


class _Node:
    """A Redis server: its two shared connections, one per lane (each made once, by whoever needs it first), and
    idle dedicated ones."""

    __slots__ = ("connecting", "conns", "host", "idle", "name", "port")

    def __init__(self, host: str, port: int, name: str) -> None:
        self.host = host
        self.port = port
        self.name = name
        self.conns: list[_Connection | None] = [None, None]  # by lane: _WRITES, _READS
        self.connecting: list[asyncio.Task[_Connection] | None] = [None, None]
        self.idle: list[_Connection] = []

    def forget(self, conn: _Connection) -> None:
        for lane, current in enumerate(self.conns):
            if current is conn:
                self.conns[lane] = None

    def close(self) -> None:
        conns = [*self.conns, *self.idle]
        self.conns = [None, None]
        self.idle = []
        for task in self.connecting:
            if task is not None:
                task.cancel()
        for conn in conns:
            if conn is not None:
                conn.close()


class _Request:
    """A command (or a transaction) on its way: what the slow path needs to send it again."""

    __slots__ = ("args", "count", "dedicated", "key", "lane", "listed", "packed", "raw", "safe", "transaction")

    def __init__(
        self,
        args: Sequence[Any],
        packed: bytes,
        key: bytes | None,
        *,
        count: int = 1,
        raw: Sequence[bool] | None = None,
        safe: bool = False,
        dedicated: float | None = None,
        transaction: bool = False,
        listed: bool = False,
        lane: int = 0,
    ) -> None:
        self.args = args
        self.lane = lane  # _WRITES or _READS
        self.packed = packed
        self.key = key  # the routing key (cluster), None for a command without keys
        self.count = count
        self.raw = raw
        self.safe = safe
        self.dedicated = dedicated  # the timeout of a dedicated connection, None for the shared one
        self.transaction = transaction
        # The replies as a list even when there is one (a batch of a pipeline's commands, a transaction)
        self.listed = listed or transaction or count > 1


class _Rule:
    """How one command name is sent: its RESP head, response callback, routing and kind."""

    __slots__ = ("callback", "flag", "head", "head_count", "is_async", "key_at", "kind", "lane", "name")

    def __init__(self, name: str, head: bytes, head_count: int, callback: Any, key_at: int, kind: str) -> None:
        self.name = name
        self.head = head  # the encoded command name (one bulk string per word)
        self.head_count = head_count
        self.callback = callback
        self.is_async = callback is not None and inspect.iscoroutinefunction(callback)
        # Where its routing key is: an index in the arguments, -1 none, -2 after numkeys, -3 after STREAMS,
        # -4 after a subcommand.
        self.key_at = key_at
        self.kind = kind  # "plain", "blocking", "streams", "wait", "fan-out" or "refused"
        self.lane = _READS if name in _READ_ONLY else _WRITES
        self.flag: str = RedisCluster.COMMAND_FLAGS.get(name, RedisCluster.DEFAULT_NODE) if key_at == -1 else ""


class MuxRedis(Redis):
    """A redis.asyncio.Redis whose commands share one connection per node (standalone or cluster); see above."""

    def __init__(
        self, settings: RedisSettings, *, decode_responses: bool = False, round_trip: Observer | None = None
    ) -> None:
        """`round_trip`: numprotect_redis_round_trip_seconds{client="mux"}, observed for each plain command and each
        pipeline or transaction (once), as the caller waits for it (a resend after a lost connection included)."""
        url = urlparse(settings.url)
        if (url.scheme == "rediss") != (settings.tls is not None):
            # Never plaintext for a rediss:// URL, never a TLS setting quietly unused.
            raise SettingsError(f"NUMPROTECT_REDIS_URL={settings.url!r}: TLS settings do not match the URL's scheme")
        self.settings = settings
        self.is_cluster = settings.mode == "cluster"
        self.timeout = settings.timeout_seconds
        self._unix_path = url.path if url.scheme == "unix" else ""
        if self._unix_path:
            db = int(parse_qs(url.query).get("db", ["0"])[0])
            self._seed = _Node("", 0, self._unix_path)
        else:
            db = int(url.path.strip("/") or 0)
            self._seed = _Node(url.hostname or "127.0.0.1", url.port or 6379, f"{url.hostname}:{url.port or 6379}")
        self._tls = settings.tls.context() if settings.tls is not None else None
        self.encoder = Encoder("utf-8", "strict", decode_responses)
        self._decode = self.encoder if decode_responses else None
        # RESP2 on the wire (no HELLO): a connection's replies are exactly its commands' replies, in order, and
        # redis-py's RESP2 callbacks give them the shapes redis-py gives them over RESP3.
        self.response_callbacks = CaseInsensitiveDict(
            cast(Any, get_response_callbacks(user_protocol=2, legacy_responses=True))
        )
        self._rules: dict[Any, _Rule] = {}
        setup: list[tuple[Any, ...]] = []
        if settings.password is not None:
            setup.append(
                ("AUTH", settings.username, settings.password) if settings.username else ("AUTH", settings.password)
            )
        if db and not self.is_cluster:
            setup.append(("SELECT", db))
        self._setup = b"".join(self._pack_plain(command) for command in setup)
        self._setup_count = len(setup)
        # Cluster: slot -> node, the nodes by address, the primaries and replicas of the last map.
        self._nodes: dict[tuple[str, int], _Node] = {(self._seed.host, self._seed.port): self._seed}
        self._slots: list[_Node] | None = None
        self._primaries: list[_Node] = [self._seed]
        self._replicas: list[_Node] = []
        self._slots_asked_at = -_SLOTS_RELOAD_INTERVAL
        self._reloading: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # What redis-py's instrumentation reads for span attributes (server address, port, database).
        self.connection_pool = _SpanTarget(  # type: ignore[assignment]
            {"path": self._unix_path, "db": db}
            if self._unix_path
            else {"host": self._seed.host, "port": self._seed.port, "db": db}
        )
        self.connection = None
        self.single_connection_client = False
        self.observe_round_trip = (round_trip or UNOBSERVED).observe

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__}({self.settings.mode} {self._seed.name})>"

    # --- redis.asyncio.Redis's connection-level API --------------------------------------------------------

    async def initialize(self) -> MuxRedis:
        return self

    async def __aenter__(self) -> MuxRedis:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Closes every connection (commands in flight fail with ConnectionError); a later command reconnects."""
        for task in [*self._background, *([self._reloading] if self._reloading else [])]:
            task.cancel()
        for node in list(self._nodes.values()):
            node.close()

    async def close(self, close_connection_pool: bool | None = None) -> None:
        await self.aclose()

    def get_encoder(self) -> Encoder:
        return self.encoder

    def get_connection_kwargs(self) -> dict[str, Any]:
        return dict(self.connection_pool.connection_kwargs)

    def set_response_callback(self, command: str, callback: Any) -> None:
        self.response_callbacks[command] = callback
        self._rules.clear()

    def writes(self) -> int:
        """transport.write calls on the shared connections now open (tests and benchmarks: coalescing)."""
        return sum(conn.writes for node in self._nodes.values() for conn in node.conns if conn is not None)

    def pubsub(self, **kwargs: Any) -> Any:
        raise NotMultiplexed(f"pub/sub {_REFUSED['SUBSCRIBE']}")

    def monitor(self) -> Any:
        raise NotMultiplexed(f"MONITOR {_REFUSED['MONITOR']}")

    def client(self) -> Any:
        raise NotMultiplexed("a single-connection client is not available: every command shares the connection")

    async def transaction(self, *args: Any, **kwargs: Any) -> Any:
        raise NotMultiplexed(f"transaction() uses WATCH, which {_REFUSED['WATCH']}")

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> MuxPipeline:
        return MuxPipeline(self, transaction)

    # --- encoding ----------------------------------------------------------------------------------------------

    def _pack_plain(self, args: Sequence[Any]) -> bytes:
        """RESP for `args` (a command name of several words is split, as redis-py does)."""
        rule = self._rule(args[0])
        return self._pack(rule, args)

    def _pack(self, rule: _Rule, args: Sequence[Any]) -> bytes:
        """RESP for `args` under `rule`'s head. Text and integers (nearly every argument of the project: keys, ids,
        numbers) go as one str encoded once; its character counts are byte counts when all of it is ASCII."""
        parts: list[str] = []
        append = parts.append
        for index in range(1, len(args)):
            arg = args[index]
            kind = arg.__class__
            if kind is str:
                append(arg)
            elif kind is int:
                append(str(arg))
            else:
                return self._pack_any(rule, args)
        text = "".join([f"${len(part)}\r\n{part}\r\n" for part in parts])
        if text.isascii():
            return b"*%d\r\n%s%s" % (len(args) - 1 + rule.head_count, rule.head, text.encode())
        return self._pack_any(rule, args)

    def _pack_any(self, rule: _Rule, args: Sequence[Any]) -> bytes:
        out = [b"*%d\r\n%s" % (len(args) - 1 + rule.head_count, rule.head)]
        append = out.append
        encode = self.encoder.encode
        for index in range(1, len(args)):
            arg = args[index]
            kind = arg.__class__
            if kind is str:
                data = arg.encode()
            elif kind is bytes:
                data = arg
            elif kind is int:
                data = b"%d" % arg
            else:
                data = encode(arg)  # type: ignore[no-untyped-call]  # floats...; DataError for bool, None, as redis-py
            append(b"$%d\r\n" % len(data))
            append(data)
            append(b"\r\n")
        return b"".join(out)

    def _rule(self, name: Any) -> _Rule:
        rule = self._rules.get(name)
        if rule is None:
            rule = self._rules[name] = self._make_rule(name)
        return rule

    def _make_rule(self, name: Any) -> _Rule:
        text = name.decode() if isinstance(name, bytes) else str(name)
        words = text.split()
        upper = " ".join(words).upper()
        first = words[0].upper() if words else ""
        head = b"".join(b"$%d\r\n%s\r\n" % (len(word.encode()), word.encode()) for word in words)
        refusal = _REFUSED.get(upper) or _REFUSED.get(first)
        kind = "plain"
        if refusal is not None:
            kind = "refused"
        elif first in _BLOCKING and first not in _STREAMS:
            kind = "blocking"
        elif first in _STREAMS:
            kind = "streams"  # blocking only with BLOCK: decided per call
        elif first in _WAITS:
            kind = "wait"
        if first in _NUMKEYS:
            key_at = -2
        elif first in _STREAMS:
            key_at = -3
        elif first in _SUBCOMMAND_THEN_KEY:
            key_at = 1 if len(words) > 1 else -4
        elif first in _KEYLESS:
            key_at = -1
        else:
            key_at = 1
        if upper == "MEMORY" or (first == "MEMORY" and upper != "MEMORY USAGE"):
            key_at = -1 if len(words) > 1 else -4
        rule = _Rule(upper, head, len(words), self.response_callbacks.get(text), key_at, kind)
        if self.is_cluster and kind == "plain" and key_at == -1 and rule.flag != RedisCluster.DEFAULT_NODE:
            rule.kind = "fan-out"  # e.g. SCRIPT LOAD: every primary
        return rule

    # --- commands ---------------------------------------------------------------------------------------------

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Sends one command and returns its reply through redis-py's response callback (as redis.asyncio does)."""
        rule = self._rules.get(args[0])
        if rule is None:
            rule = self._rule(args[0])
        if options:
            options.pop("keys", None)
            if options:
                return await self._execute_with(rule, args, options)
        if rule.kind != "plain":
            return await self._execute_with(rule, args, options)
        started = perf_counter()
        packed = self._pack(rule, args)
        node = self._route(rule, args) if self.is_cluster else self._seed
        conn = node.conns[rule.lane] if node is not None else None
        if conn is None or conn.closed:
            reply = await self._call(self._request(rule, args, packed, None))
        else:
            future = conn.loop.create_future()
            conn.send(packed, future)
            try:
                reply = await future
            except _Lost as lost:
                reply = await self._call(self._request(rule, args, packed, None), lost, node)
            except RedisTimeoutError:
                if self.is_cluster:  # a master gone silent: its slots may have moved
                    self._reload_soon()
                raise
            if isinstance(reply, RedisError):
                reply = await self._call(self._request(rule, args, packed, None), reply, node)
        if isinstance(reply, RedisError):
            raise reply
        self.observe_round_trip(perf_counter() - started)
        callback = rule.callback
        if callback is None:
            return reply
        if rule.is_async:
            return await callback(reply)
        return callback(reply)

    async def _execute_with(self, rule: _Rule, args: Sequence[Any], options: dict[str, Any]) -> Any:
        """A command with options: NEVER_DECODE, EMPTY_RESPONSE, target_nodes, callback arguments; or one that is
        refused, blocks, or waits for replicas."""
        if rule.kind == "refused":
            raise NotMultiplexed(f"{rule.name} {_REFUSED.get(rule.name) or _REFUSED[rule.name.split()[0]]}")
        raw = NEVER_DECODE in options and self._decode is not None
        options.pop(NEVER_DECODE, None)
        targets = options.pop("target_nodes", None)
        request = self._request(rule, args, self._pack(rule, args), [True] if raw else None)
        if self.is_cluster and (targets is not None or rule.kind == "fan-out"):
            return await self._fan_out(rule, request, options, targets)
        reply = await self._call(request)
        return await self._parse(rule, reply, options)

    async def _parse(self, rule: _Rule, reply: Any, options: dict[str, Any]) -> Any:
        """redis-py's parse_response after the read: EMPTY_RESPONSE, errors raised, the response callback."""
        if isinstance(reply, RedisError):
            if EMPTY_RESPONSE in options and isinstance(reply, ResponseError):
                return options[EMPTY_RESPONSE]
            raise reply
        options.pop(EMPTY_RESPONSE, None)
        options.pop("keys", None)
        callback = rule.callback
        if callback is None:
            return reply
        parsed = callback(reply, **options)
        return await parsed if inspect.isawaitable(parsed) else parsed

    def _request(
        self, rule: _Rule, args: Sequence[Any], packed: bytes, raw: Sequence[bool] | None, *, dedicated: bool = True
    ) -> _Request:
        key = self._key_of(rule, args) if self.is_cluster else None
        return _Request(
            args,
            packed,
            key,
            raw=raw,
            safe=_repeat_safe(rule.name, args),
            dedicated=self._dedicated_timeout(rule, args) if dedicated else None,
            lane=rule.lane,
        )

    def _dedicated_timeout(self, rule: _Rule, args: Sequence[Any]) -> float | None:
        """For a command that blocks its connection: the timeout of its dedicated connection (the client's timeout
        plus the block time); None for every other command. A WAIT is checked against the client's timeout."""
        if rule.kind not in ("wait", "blocking", "streams"):
            return None
        if rule.kind == "wait":
            wait_ms = int(args[-1])
            if not 0 < wait_ms < self.timeout * 1000:
                raise NotMultiplexed(
                    f"{rule.name} on the shared connection needs a timeout above 0 and below "
                    f"NUMPROTECT_REDIS_TIMEOUT ({self.timeout * 1000:.0f} ms), not {wait_ms} ms"
                )
            return None
        upper = [str(arg).upper() if isinstance(arg, str) else arg for arg in args]
        block = 0.0
        if rule.kind == "streams":
            marker = "BLOCK" if "BLOCK" in upper else b"BLOCK" if b"BLOCK" in upper else None
            if marker is None:
                return None
            block = float(args[upper.index(marker) + 1]) / 1000
        elif _BLOCKING.get(rule.name.split()[0]) == "last":
            block = float(args[-1])
        else:
            block = float(args[1])
        return self.timeout + block

    # --- routing (cluster) ---------------------------------------------------------------------------------

    def _key_of(self, rule: _Rule, args: Sequence[Any]) -> bytes | None:
        """The first key of the command (its routing key), None for a command without keys."""
        at = rule.key_at
        if at >= 0:
            return self._key_bytes(args[at]) if len(args) > at else None
        if at == -2:  # EVAL(SHA) sha numkeys key ...
            return self._key_bytes(args[3]) if len(args) > 3 and int(args[2]) > 0 else None
        if at == -3:  # XREAD ... STREAMS key ...
            upper = [arg.upper() if isinstance(arg, str | bytes) else arg for arg in args]
            for marker in ("STREAMS", b"STREAMS"):
                if marker in upper:
                    index = upper.index(marker) + 1
                    return self._key_bytes(args[index]) if len(args) > index else None
            return None
        if at == -4 and len(args) > 2:  # OBJECT ENCODING key, MEMORY USAGE key, XINFO STREAM key, ...
            sub = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
            if rule.name == "MEMORY" and sub.upper() != "USAGE":
                return None
            return self._key_bytes(args[2])
        return None

    def _key_bytes(self, key: Any) -> bytes:
        kind = key.__class__
        if kind is bytes:
            return cast(bytes, key)
        if kind is str:
            return cast(bytes, key.encode())
        return cast(bytes, self.encoder.encode(key))  # type: ignore[no-untyped-call]

    def _route(self, rule: _Rule, args: Sequence[Any]) -> _Node | None:
        """The node of a command on the hot path; None when the slow path must decide (no map yet, no key)."""
        slots = self._slots
        if slots is None or rule.key_at not in (1, -2):
            return None
        key = self._key_of(rule, args)
        if key is None:
            return None
        return slots[key_slot(key)]

    def _node_for(self, request: _Request) -> _Node:
        if not self.is_cluster:
            return self._seed
        if request.key is None or self._slots is None:
            return self._primaries[0]
        return self._slots[key_slot(request.key)]

    def _node_at(self, host: str, port: int) -> _Node:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[host, port] = _Node(host, port, f"{host}:{port}")
        return node

    # --- sending, with what a reply or a failure calls for -------------------------------------------------

    async def _call(self, request: _Request, outcome: Any = None, node: _Node | None = None) -> Any:
        """The reply of `request` (a list for a transaction), after the retries its outcomes call for: sent again
        after a lost connection when it is repeat-safe or was not sent, redirected (MOVED, ASK), retried after
        "not now" replies while the timeout lasts. An error reply that is the answer is returned; connection
        failures raise redis ConnectionError or TimeoutError. `outcome` is the first try's (None: not sent yet),
        `node` where it went; a `fixed` node (fan-out, slot-map load) is never left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (request.dedicated or self.timeout)
        pause = _PAUSE_FIRST
        asking = False
        rounds = 0
        if self.is_cluster and self._slots is None:
            await self._reload(deadline)
        while True:
            rounds += 1
            if outcome is None:
                if node is None:
                    node = self._node_for(request)
                try:
                    outcome = await self._send(node, request, asking)
                except _Lost as lost:
                    outcome = lost
                except _NoConnection:
                    # A node that refuses connections: in a cluster its slots may have a new owner (a promoted
                    # replica) once the map says so; until then the command fails now.
                    if not self.is_cluster or rounds >= _MOST_ROUNDS or loop.time() >= deadline:
                        raise
                    await self._reload(deadline, avoid=node)
                    previous, node = node, self._node_for(request)
                    if node is previous:
                        raise
                    continue
                except RedisTimeoutError:
                    if self.is_cluster:
                        self._reload_soon()
                    raise
            asking = False
            if isinstance(outcome, _Lost):
                if (outcome.sent and not request.safe) or rounds >= _MOST_ROUNDS or loop.time() >= deadline:
                    raise outcome.error
                if self.is_cluster:
                    await self._reload(deadline, avoid=node)
                node = None
                outcome = None
                continue
            error = _failure(request, outcome)
            if error is None:
                return outcome
            if self.is_cluster and isinstance(error, AskError) and rounds < _MOST_ROUNDS:
                target = self._node_at(error.host or (node.host if node else ""), int(error.port))
                if isinstance(error, MovedError):  # the slot has a new owner: the map follows
                    if self._slots is not None:
                        self._slots[int(error.slot_id)] = target
                    self._reload_soon()
                else:
                    asking = True
                node, outcome = target, None
                continue
            if _not_now(error) and rounds < _MOST_ROUNDS * 8:
                wait = min(pause, deadline - loop.time())
                if wait > 0:
                    if self.is_cluster and isinstance(error, _RELOAD_FIRST):
                        await self._reload(deadline)
                    await asyncio.sleep(wait)
                    pause = min(pause * 2, _PAUSE_MOST)
                    node = None if self.is_cluster else node
                    outcome = None
                    continue
            return outcome

    async def _send(self, node: _Node, request: _Request, asking: bool) -> Any:
        """Sends `request` to `node` once (after ASKING when `asking`) and returns what came back."""
        if request.dedicated is not None:
            conn = await self._dedicated(node, request.dedicated)
            try:
                return await self._submit(conn, request, asking)
            finally:
                self._give_back(node, conn)
        shared = node.conns[request.lane]
        if shared is None or shared.closed:
            shared = await self._shared(node, request.lane)
        return await self._submit(shared, request, asking)

    @staticmethod
    def _submit(conn: _Connection, request: _Request, asking: bool) -> asyncio.Future[Any]:
        future = conn.loop.create_future()
        if asking:
            raw = None if request.raw is None else [False, *request.raw]
            batch = _Batch(future, request.count + 1, raw, skip=1, single=not request.listed)
            conn.send(_ASKING + request.packed, batch)
        elif not request.listed and request.raw is None:
            conn.send(request.packed, future)
        else:
            conn.send(request.packed, _Batch(future, request.count, request.raw, single=not request.listed))
        return future

    async def _shared(self, node: _Node, lane: int) -> _Connection:
        """The node's shared connection of `lane`, connected now if needed (one attempt for all who wait)."""
        conn = node.conns[lane]
        if conn is not None and not conn.closed:
            return conn
        task = node.connecting[lane]
        if task is None:
            task = node.connecting[lane] = asyncio.get_running_loop().create_task(self._open(node, self.timeout))
            task.add_done_callback(partial(_connected, node, lane))
        return await asyncio.shield(task)

    async def _dedicated(self, node: _Node, wait: float) -> _Connection:
        while node.idle:
            conn = node.idle.pop()
            if not conn.closed:
                conn.timeout = wait
                return conn
        conn = await self._open(node, self.timeout)
        conn.timeout = wait
        return conn

    @staticmethod
    def _give_back(node: _Node, conn: _Connection) -> None:
        if conn.closed:
            return
        if conn.pending or len(node.idle) >= _IDLE_DEDICATED:  # a reply still to come: never reused
            conn.close()
            return
        node.idle.append(conn)

    async def _open(self, node: _Node, within: float) -> _Connection:
        """A new connection to `node`: TCP (or a Unix socket), TLS, AUTH and SELECT, each within `within` seconds."""
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, node.name, within, self._decode)
        try:
            async with asyncio.timeout(within):
                if self._unix_path:
                    await loop.create_unix_connection(lambda: conn, self._unix_path)
                else:
                    await loop.create_connection(
                        lambda: conn,
                        node.host,
                        node.port,
                        ssl=self._tls,
                        server_hostname=node.host if self._tls is not None else None,
                    )
        except TimeoutError:
            raise RedisTimeoutError(f"Timeout connecting to {node.name}") from None
        except OSError as exc:
            raise _NoConnection(f"Error connecting to {node.name}: {exc}") from None
        if self._setup:
            future = loop.create_future()
            conn.send(self._setup, _Batch(future, self._setup_count))
            try:
                replies = await future
            except _Lost as lost:
                raise lost.error from None
            for reply in replies:
                if isinstance(reply, RedisError):
                    conn.close()
                    raise reply
        return conn

    # --- fan-out (cluster commands without keys) -----------------------------------------------------------

    async def _fan_out(self, rule: _Rule, request: _Request, options: dict[str, Any], targets: Any) -> Any:
        """A command without keys sent where redis-py's cluster client sends it, its replies merged as it does."""
        if self._slots is None:
            await self._reload(asyncio.get_running_loop().time() + self.timeout)
        flag = targets if targets is not None else rule.flag
        if flag == RedisCluster.PRIMARIES:
            nodes = list(self._primaries)
        elif flag == RedisCluster.ALL_NODES:
            nodes = [*self._primaries, *self._replicas]
        elif flag == RedisCluster.REPLICAS:
            nodes = list(self._replicas)
        elif flag == RedisCluster.RANDOM:
            nodes = [random.choice(self._primaries)]
        elif flag == RedisCluster.DEFAULT_NODE:
            nodes = [self._primaries[0]]
        else:
            raise NotMultiplexed(f"target_nodes={targets!r}: the multiplexing client takes RedisCluster's node flags")
        replies = await asyncio.gather(*(self._call(request, node=node) for node in nodes))
        parsed = {
            node.name: await self._parse(rule, reply, dict(options)) for node, reply in zip(nodes, replies, strict=True)
        }
        merge = RedisCluster.RESULT_CALLBACKS.get(rule.name)
        if merge is not None:
            return merge(rule.name, parsed, **options)
        return next(iter(parsed.values())) if len(parsed) == 1 else parsed

    # --- the slot map (cluster) ------------------------------------------------------------------------------

    def _reload_soon(self) -> None:
        """A new slot map in the background (after MOVED: the command goes on to the named node meanwhile)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._reload(loop.time() + self.timeout))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload(self, deadline: float, avoid: _Node | None = None) -> None:
        """A new slot map, unless one was asked for less than _SLOTS_RELOAD_INTERVAL ago; best effort once a map
        exists (commands go on with the map they have when no node answers); ConnectionError without one."""
        loop = asyncio.get_running_loop()
        task = self._reloading
        if task is None:
            if self._slots is not None and loop.time() - self._slots_asked_at < _SLOTS_RELOAD_INTERVAL:
                return
            self._slots_asked_at = loop.time()
            task = self._reloading = loop.create_task(self._load_slots(avoid))
            task.add_done_callback(self._reloaded)
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await asyncio.shield(task)
        except (RedisError, TimeoutError) as exc:
            if self._slots is None:
                raise RedisConnectionError(f"Redis Cluster cannot be connected: no slot map ({exc})") from None

    def _reloaded(self, task: asyncio.Task[None]) -> None:
        self._reloading = None
        if not task.cancelled() and task.exception() is not None:
            log.debug("cluster slot map not reloaded", extra={"error": repr(task.exception())})

    async def _load_slots(self, avoid: _Node | None) -> None:
        """CLUSTER SLOTS from one node after another (`avoid`, a node that just failed, last)."""
        candidates = [node for node in dict.fromkeys([self._seed, *self._primaries, *self._replicas]) if node != avoid]
        if avoid is not None:
            candidates.append(avoid)
        failures = []
        for node in candidates:
            try:
                request = _Request(("CLUSTER", "SLOTS"), _CLUSTER_SLOTS, None, lane=_READS)
                reply = await self._send(node, request, False)
            except (_Lost, RedisError) as exc:
                failures.append(f"{node.name}: {exc}")
                continue
            if isinstance(reply, RedisError) or not reply:
                failures.append(f"{node.name}: {reply!r}")
                continue
            self._apply_slots(node, reply)
            return
        raise RedisConnectionError(f"no cluster node answered CLUSTER SLOTS ({'; '.join(failures)})")

    def _apply_slots(self, asked: _Node, reply: Sequence[Any]) -> None:
        slots: list[_Node] = [asked] * 16384
        primaries: dict[_Node, None] = {}
        replicas: dict[_Node, None] = {}
        for start, end, primary, *copies in reply:
            owner = self._node_at(_text(primary[0]) or asked.host, int(primary[1]))
            primaries[owner] = None
            slots[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
            for copy in copies:
                replicas[self._node_at(_text(copy[0]) or asked.host, int(copy[1]))] = None
        self._slots = slots
        self._primaries = list(primaries) or [asked]
        self._replicas = list(replicas)

    # --- pipelines -------------------------------------------------------------------------------------------

    async def _run_pipeline(self, stack: _Stack) -> list[Any]:
        """Each command's reply or error reply, sent one batch per node in one loop pass."""
        requests = []
        rules = []
        for args, options in stack:
            rule = self._rule(args[0])
            if rule.kind == "refused":
                raise NotMultiplexed(f"{rule.name} {_REFUSED.get(rule.name) or _REFUSED[rule.name.split()[0]]}")
            rules.append(rule)
            raw = [True] if NEVER_DECODE in options else None
            requests.append(self._request(rule, args, self._pack(rule, args), raw, dedicated=False))
        if any(rule.kind != "plain" for rule in rules):
            return await self._run_pinned(requests)
        loop = asyncio.get_running_loop()
        if self.is_cluster and self._slots is None:
            await self._reload(loop.time() + self.timeout)
        groups: dict[_Node, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self._node_for(request), []).append(index)
        sent: list[tuple[_Node, list[int], asyncio.Future[Any] | BaseException]] = []
        for node, indexes in groups.items():
            batch = _Request(
                (),
                b"".join(requests[i].packed for i in indexes),
                None,
                count=len(indexes),
                raw=[requests[i].raw is not None for i in indexes] if any(requests[i].raw for i in indexes) else None,
                listed=True,
                lane=_READS if all(requests[i].lane == _READS for i in indexes) else _WRITES,
            )
            try:
                conn = node.conns[batch.lane]
                if conn is None or conn.closed:
                    conn = await self._shared(node, batch.lane)
                sent.append((node, indexes, self._submit(conn, batch, False)))
            except RedisError as exc:
                sent.append((node, indexes, exc))
        outcomes: list[Any] = [None] * len(requests)
        again: list[tuple[int, Any, _Node]] = []
        for node, indexes, future in sent:
            try:
                if isinstance(future, BaseException):
                    raise future
                replies = await future
            except _Lost as lost:
                again.extend((i, lost, node) for i in indexes)
                continue
            except _NoConnection:
                if not self.is_cluster:
                    raise
                again.extend((i, None, node) for i in indexes)
                continue
            for index, reply in zip(indexes, replies, strict=True):
                if isinstance(reply, RedisError) and (
                    _not_now(reply) or (self.is_cluster and isinstance(reply, AskError))
                ):
                    again.append((index, reply, node))
                else:
                    outcomes[index] = reply
        if again:
            retried = await asyncio.gather(
                *(
                    self._call(requests[index], outcome, node if outcome is not None else None)
                    for index, outcome, node in again
                )
            )
            for (index, _, _), reply in zip(again, retried, strict=True):
                outcomes[index] = reply
        return outcomes

    def _sent_again(self, error: RedisError) -> bool:
        """Whether a pipeline's command answered `error` is sent again by itself (not now, redirected)."""
        return _not_now(error) or (self.is_cluster and isinstance(error, AskError))

    async def _run_pinned(self, requests: Sequence[_Request]) -> list[Any]:
        """A pipeline holding WAIT or a blocking command: all on one dedicated connection to the node of its first
        key, replies as they come (a WAIT counts the writes before it on that connection, so nothing is
        redirected or sent elsewhere), sent again as a whole only when every command is repeat-safe."""
        key = next((request.key for request in requests if request.key is not None), None)
        raws = [request.raw is not None for request in requests]
        batch = _Request(
            (),
            b"".join(request.packed for request in requests),
            key,
            count=len(requests),
            raw=raws if any(raws) else None,
            safe=all(request.safe for request in requests),
            dedicated=self.timeout,
            listed=True,
        )
        node = self._node_for(batch) if not self.is_cluster or self._slots is not None else None
        if node is None:
            await self._reload(asyncio.get_running_loop().time() + self.timeout)
            node = self._node_for(batch)
        for _ in range(2):
            try:
                return list(await self._send(node, batch, False))
            except _Lost as lost:
                if lost.sent and not batch.safe:
                    raise lost.error from None
                error = lost.error
        raise error

    async def _run_transaction(self, stack: _Stack) -> list[Any]:
        """MULTI, the commands and EXEC as one contiguous write; every reply, EXEC's last."""
        packed = [_MULTI]
        key = None
        safe = True
        for args, _ in stack:
            rule = self._rule(args[0])
            if rule.kind not in ("plain", "wait"):
                raise NotMultiplexed(f"{rule.name} cannot run inside a transaction of the multiplexing client")
            packed.append(self._pack(rule, args))
            if key is None and self.is_cluster:
                key = self._key_of(rule, args)
            safe = safe and _repeat_safe(rule.name, args)
        packed.append(_EXEC)
        request = _Request(("MULTI",), b"".join(packed), key, count=len(stack) + 2, safe=safe, transaction=True)
        return list(await self._call(request))


class MuxPipeline(Pipeline):
    """redis-py's asyncio Pipeline over a MuxRedis: commands queue as in redis-py; execute() sends them as one batch
    per node (transaction=True: MULTI ... EXEC contiguous on the node of the first key). WATCH is refused."""

    def __init__(self, client: MuxRedis, transaction: bool) -> None:
        self._client = client
        self.connection_pool = client.connection_pool
        self.connection = None
        self.response_callbacks = client.response_callbacks
        self.is_transaction = transaction
        self.shard_hint = None
        self.watching = False
        self.command_stack = []
        self.scripts = set()
        self.explicit_transaction = False

    async def reset(self) -> None:  # type: ignore[override]
        self.command_stack = []
        self.scripts = set()
        self.watching = False
        self.explicit_transaction = False

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], str) and args[0].upper() == "WATCH":
            raise NotMultiplexed(f"WATCH {_REFUSED['WATCH']}")
        return self.pipeline_execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        raise NotMultiplexed(f"WATCH {_REFUSED['WATCH']}")

    async def load_scripts(self) -> None:
        for script in self.scripts:  # Script objects queued by register_script: load the missing ones
            if not (await self._client.script_exists(script.sha))[0]:
                script.sha = await self._client.script_load(script.script)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack = self.command_stack
        if not stack:
            return []
        try:
            if self.scripts:
                await self.load_scripts()
            if self.is_transaction or self.explicit_transaction:
                return await self._transaction(stack, raise_on_error)
            return await self._pipeline(stack, raise_on_error)
        finally:
            await self.reset()

    async def _pipeline(self, stack: _Stack, raise_on_error: bool) -> list[Any]:
        started = perf_counter()
        outcomes = await self._client._run_pipeline(stack)
        self._client.observe_round_trip(perf_counter() - started)
        response: list[Any] = []
        for (args, options), outcome in zip(stack, outcomes, strict=True):
            kwargs = {name: value for name, value in options.items() if name != NEVER_DECODE}
            try:
                response.append(await self._client._parse(self._client._rule(args[0]), outcome, kwargs))
            except ResponseError as error:
                response.append(error)
        if raise_on_error:
            self.raise_first_error(stack, response)
        return response

    async def _transaction(self, stack: _Stack, raise_on_error: bool) -> list[Any]:
        """What redis-py's _execute_transaction makes of the replies (errors placed, callbacks run)."""
        started = perf_counter()
        replies = await self._client._run_transaction(stack)
        self._client.observe_round_trip(perf_counter() - started)
        errors: list[tuple[int, Any]] = []
        if isinstance(replies[0], ResponseError):
            errors.append((0, replies[0]))
        for index, (queued, (args, options)) in enumerate(zip(replies[1:-1], stack, strict=True)):
            if EMPTY_RESPONSE in options:
                errors.append((index, options[EMPTY_RESPONSE]))
            elif isinstance(queued, ResponseError):
                self.annotate_exception(queued, index + 1, args)
                errors.append((index, queued))
            elif isinstance(queued, RedisError):
                raise queued
        response = replies[-1]
        if isinstance(response, ExecAbortError):
            if errors:
                raise errors[0][1] from response
            raise response
        if isinstance(response, RedisError):
            raise response
        if response is None:
            raise WatchError("Watched variable changed.")
        for index, error in errors:
            response.insert(index, error)
        if len(response) != len(stack):
            raise ResponseError("Wrong number of response items from pipeline execution")
        if raise_on_error:
            self.raise_first_error(stack, response)
        data = []
        for reply, (args, options) in zip(response, stack, strict=True):
            callback = self._client._rule(args[0]).callback
            if isinstance(reply, Exception) or callback is None:
                data.append(reply)
                continue
            kwargs = {k: v for k, v in options.items() if k not in ("keys", NEVER_DECODE, EMPTY_RESPONSE)}
            parsed = callback(reply, **kwargs)
            data.append(await parsed if inspect.isawaitable(parsed) else parsed)
        return data


class _SpanTarget:
    """Stands where redis-py keeps its connection pool: what the CLIENT spans read (`connection_kwargs`); anything
    else a pool would do is not there."""

    def __init__(self, connection_kwargs: Mapping[str, Any]) -> None:
        self.connection_kwargs = dict(connection_kwargs)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{name}: the multiplexing Redis client has no connection pool")


def _connected(node: _Node, lane: int, task: asyncio.Task[_Connection]) -> None:
    node.connecting[lane] = None
    if task.cancelled() or task.exception() is not None:  # the waiters get the exception
        return
    conn = task.result()
    node.conns[lane] = conn
    conn.on_close = node.forget


def _failure(request: _Request, outcome: Any) -> RedisError | None:
    """The error reply that decides what happens to `request` next (None: the outcome is the answer)."""
    if not request.transaction:
        return outcome if not request.listed and isinstance(outcome, RedisError) else None
    # A transaction: MULTI's refusal, or (EXEC aborted) the first queued command's refusal.
    for reply in outcome[:-1]:
        if isinstance(reply, RedisError):
            return reply
    return None


def _repeat_safe(name: str, args: Sequence[Any]) -> bool:
    if name not in _REPEAT_SAFE:
        return False
    if name == "ZADD":  # ZADD ... INCR adds to the score
        return not any(isinstance(arg, str | bytes) and arg.upper() in ("INCR", b"INCR") for arg in args[2:])
    return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
