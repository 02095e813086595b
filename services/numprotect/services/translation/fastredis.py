"""A minimal blocking Redis client for the sync hot path: EVALSHA of one script, per-call timeout, cluster slots.

redis-py's sync client costs several times more Python per command than the call needs and has no per-call
timeout. This one keeps one socket per node per thread, writes the pre-encoded command in one send, parses
with hiredis, and bounds every call by the caller's remaining deadline.

Faults, all within the call's budget and never as a raw Redis error (docs/translation.md "Redis faults"):
- NOSCRIPT loads the script on that node and sends the call again.
- Redis Cluster: slots from CLUSTER SLOTS; MOVED goes to the named node and reloads the map, ASK sends ASKING and
  the call to the importing node; a node that refuses connections (a killed master) reloads the map and, once a
  replica has been promoted, the call goes there.
- "Not now" replies (LOADING after a restart, TRYAGAIN and CLUSTERDOWN while slots move or a failover runs,
  READONLY and MASTERDOWN from a replica, BUSY from a slow script) are retried after a short, growing pause;
  when the budget is spent the caller gets UNAVAILABLE. Replies that refuse writes or this client (MISCONF, OOM,
  NOAUTH, ...) are UNAVAILABLE at once.
- A pooled connection that Redis closed while it was idle (a restart, a failover) fails the first call sent on
  it; that call is sent once more on a new connection (see `_batch` for why sending it twice is safe).

rediss:// speaks TLS with the settings' verified context (the CA file alone, hostname checked, optional client
certificate); the ACL user authenticates with AUTH <user> <password> once per connection, inside that TLS.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from _thread import allocate_lock as _allocate_lock
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import hiredis
from redis.crc import key_slot

from numprotect.core.errors import DEFAULT_RETRY_AFTER_SECONDS, Unavailable
from numprotect.core.metrics import UNOBSERVED, Observer
from numprotect.core.redis_client import RETRYABLE_REPLIES, LuaScript
from numprotect.core.settings import RedisSettings, SettingsError

Node = tuple[str, int]

log = logging.getLogger(__name__)

_ASKING = b"*1\r\n$6\r\nASKING\r\n"
# Errors that mean "not now": retried after a pause (_PAUSE_FIRST, doubling up to _PAUSE_MOST) within the budget.
_RETRY_LATER = frozenset({"LOADING", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "MASTERDOWN", "BUSY"})
# ... of which these say the node may no longer serve the slot: the slot map is reloaded first.
_RELOAD_FIRST = frozenset({"CLUSTERDOWN", "READONLY", "MASTERDOWN"})
# Errors that mean the storage cannot serve this call now (writes refused, credentials, limits): UNAVAILABLE.
_REFUSED = frozenset({"MISCONF", "OOM", "NOAUTH", "WRONGPASS", "NOPERM", "NOREPLICAS"})
# Replies after which a call is sent again: the script did not run.
_SENT_AGAIN = _RETRY_LATER | {"MOVED", "ASK", "NOSCRIPT"}
# A call the combining leader hands back to its own thread to pause and send again.
_SEND_AGAIN = object()
_PAUSE_FIRST = 0.005
_PAUSE_MOST = 0.1
# Rounds without a pause (redirections, NOSCRIPT, a node gone) per call; pauses are bounded by the budget alone.
_MOST_REDIRECTS = 16
# Calls failing together (a dead node, a resharding) share one CLUSTER SLOTS per interval.
_SLOTS_RELOAD_INTERVAL = 0.05
# With a read-only copy of the script: the share of a call's budget the script may take before the node is taken
# for one whose writes are paused (CLIENT PAUSE WRITE, a failover), and how long the node's calls then go as the
# read-only copy before the script is tried again.
_STALL_SHARE = 0.5
_READ_ONLY_INTERVAL = 1.0
# The google.rpc.ErrorInfo reason of an UNAVAILABLE answer (the same as redis_client.storage_unavailable's for
# the replies both know, RETRYABLE_REPLIES): a connection refused, dropped or silent; replies only this client acts on.
_UNREACHABLE = "REDIS_UNREACHABLE"
_REASONS = {
    "MOVED": "REDIS_REDIRECTED",
    "ASK": "REDIS_REDIRECTED",
    "NOSCRIPT": "REDIS_NOSCRIPT",
    "NOAUTH": "REDIS_ACCESS_DENIED",
    "WRONGPASS": "REDIS_ACCESS_DENIED",
    "NOPERM": "REDIS_ACCESS_DENIED",
}


def _encode(*parts: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def unavailable(message: str, kind: str = "") -> Unavailable:
    """UNAVAILABLE with the retry hint and ErrorInfo reason of the Redis condition `kind` (an error reply's first
    word; "" for no reply: refused, dropped or silent connections)."""
    if kind in RETRYABLE_REPLIES:
        reason, retry_after = RETRYABLE_REPLIES[kind]
        return Unavailable(message, retry_after=retry_after, reason=reason)
    return Unavailable(message, retry_after=DEFAULT_RETRY_AFTER_SECONDS, reason=_REASONS.get(kind, _UNREACHABLE))


def _no_time_left() -> Unavailable:
    """The call's budget was spent before its command went out (its deadline passed)."""
    return unavailable("no time left for the translation storage")


class _Unreachable(Unavailable):
    """The node refused or dropped the connection (not a timeout): in a cluster, the slot may have a new owner."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=_UNREACHABLE)


class _Silent(Unavailable):
    """The node did not answer in time (a timeout): slow, or pausing writes."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=_UNREACHABLE)


class _Conn:
    __slots__ = ("reader", "sock", "timeout", "used")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = hiredis.Reader()
        self.timeout = -1.0
        self.used = False  # True once a reply came back: a later failure may be a connection closed while idle

    def send(self, data: bytes, timeout: float) -> None:
        """Sends `data` with `timeout` seconds for it and each read until the next send.

        A budget already spent (the call's deadline passed while the thread waited for the CPU or the lead) is
        the caller's UNAVAILABLE, as everywhere else: settimeout would raise ValueError for a negative value
        (INTERNAL) and switch the socket to non-blocking mode for 0.0. Nothing is sent, so the socket stays in step.
        """
        if timeout <= 0:
            raise _no_time_left()
        if timeout != self.timeout:
            self.sock.settimeout(timeout)
            self.timeout = timeout
        self.sock.sendall(data)

    def read(self) -> Any:
        reply = self.reader.gets()
        while reply is False:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            self.reader.feed(chunk)
            reply = self.reader.gets()
        return reply


class _Slot:
    """One thread's call waiting to go out in the next combined pipeline.

    `done` is a raw lock created held: the waiting thread blocks acquiring it, the leader releases it. A
    threading.Event would do the same through a Condition implemented in Python, several times the cost on
    the hot path.
    """

    __slots__ = ("command", "done", "key", "lead", "result")

    def __init__(self, key: str, command: bytes) -> None:
        self.key = key  # the routing key (cluster slot) of the command
        self.command = command
        self.result: Any = None
        self.done = _allocate_lock()
        self.done.acquire()
        self.lead = False


def _wake(slot: _Slot) -> None:
    # try/except, not contextlib.suppress: a context manager per call costs more on the hot path
    try:  # noqa: SIM105
        slot.done.release()
    except RuntimeError:  # already released: handed the lead earlier, or woken by its own timeout path
        pass


class ScriptClient:
    """Runs one Lua script by EVALSHA on a standalone Redis or a Redis Cluster, from any thread.

    `read_only`, a copy of the script declared `#!lua flags=no-writes` taking the same keys and arguments, serves
    a node's calls while that node's writes seem paused: the script (a write to Redis 7 even when its writes are
    skipped) waits out a CLIENT PAUSE WRITE (an operator's, a FAILOVER's or a cluster failover's), a read-only
    script does not. A call that gets no reply within _STALL_SHARE of its budget marks the node and is sent again
    as the copy on a new connection; the node's calls then go as the copy for _READ_ONLY_INTERVAL (one WARNING per
    interval), then the script is tried again. A node merely slow fails the copy too: UNAVAILABLE, as without it.
    """

    def __init__(
        self,
        settings: RedisSettings,
        script: LuaScript,
        read_only: LuaScript | None = None,
        *,
        round_trip: Observer | None = None,
    ) -> None:
        """`round_trip`: numprotect_redis_round_trip_seconds{client="fastredis"}, one observation per write and
        its replies (a combined batch counts once)."""
        url = urlparse(settings.url)
        if (url.scheme == "rediss") != (settings.tls is not None):
            # Never plaintext for a rediss:// URL, never a TLS setting quietly unused.
            raise SettingsError(f"NUMPROTECT_REDIS_URL={settings.url!r}: TLS settings do not match the URL's scheme")
        self.script = script
        self.read_only = read_only
        self._sha = script.sha.encode()
        self._read_only_sha = read_only.sha.encode() if read_only is not None else b""
        self._writes_paused: dict[Node, float] = {}  # node -> time.monotonic() until which calls go read-only
        self.cluster = settings.mode == "cluster"
        self.unix_path = url.path if url.scheme == "unix" else ""
        self.seed: Node = (url.hostname or "127.0.0.1", url.port or 6379)
        self.username = settings.username
        self._password = settings.password  # never in an error: AUTH replies name the user only
        self._tls: ssl.SSLContext | None = settings.tls.context() if settings.tls is not None else None
        self.db = int(url.path.strip("/") or 0) if url.scheme != "unix" and not self.cluster else 0
        self.connect_timeout = settings.timeout_seconds
        self._prefix = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n"
        self._heads: dict[tuple[int, int], bytes] = {}  # command head per (keys, args) count
        self._local = threading.local()
        self._slots: list[Node] = []
        self._slots_lock = threading.Lock()
        self._slots_asked_at = -_SLOTS_RELOAD_INTERVAL  # time.monotonic() of the last CLUSTER SLOTS
        # Combining: concurrent calls from handler threads share one pipelined write per node.
        self._queue: list[_Slot] = []
        self._queue_lock = threading.Lock()
        self._leading = False
        self._observe = (round_trip or UNOBSERVED).observe

    def span_attributes(self) -> dict[str, str | int]:
        """What a Redis CLIENT span of this client says: the system, the sanitised statement, the server."""
        attributes: dict[str, str | int] = {"db.system": "redis", "db.statement": "EVALSHA ?"}
        if self.unix_path:
            attributes["server.address"] = self.unix_path
        else:
            attributes["server.address"], attributes["server.port"] = self.seed
        return attributes

    # --- connections -------------------------------------------------------------------------------------

    def _conns(self) -> dict[Node, _Conn]:
        conns: dict[Node, _Conn] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _conn(self, node: Node, timeout: float) -> _Conn:
        """This thread's socket to `node`, connected now if needed within `timeout` (the call's budget)."""
        conns = self._conns()
        conn = conns.get(node)
        if conn is None:
            conn = conns[node] = self._connect(node, min(self.connect_timeout, timeout))
        return conn

    def _connect(self, node: Node, timeout: float) -> _Conn:
        try:
            if self.unix_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(self.unix_path)
            else:
                sock = socket.create_connection(node, timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._tls is not None:  # the handshake runs here, within the same budget
                    try:
                        sock = self._tls.wrap_socket(sock, server_hostname=node[0])
                    except OSError:
                        sock.close()
                        raise
        except ssl.SSLError as exc:  # a certificate that fails verification included
            raise unavailable(f"translation storage TLS handshake failed: {exc}") from None
        except TimeoutError as exc:
            raise _Silent(f"translation storage unreachable: {exc}") from None
        except OSError as exc:
            raise _Unreachable(f"translation storage unreachable: {exc}") from None
        conn = _Conn(sock)
        setup: list[bytes] = []
        if self._password is not None:
            auth = ("AUTH", self.username, self._password) if self.username else ("AUTH", self._password)
            setup.append(_encode(*auth))
        if self.db:
            setup.append(_encode("SELECT", str(self.db)))
        for command in setup:
            reply = self._round_trip(node, conn, command, timeout)
            if isinstance(reply, hiredis.ReplyError):
                raise unavailable(f"translation storage refused the connection: {reply}", str(reply).split(" ", 1)[0])
        return conn

    def _drop(self, node: Node) -> None:
        conn = self._conns().pop(node, None)
        if conn is not None:
            conn.sock.close()

    def _round_trip(self, node: Node, conn: _Conn, data: bytes, timeout: float) -> Any:
        try:
            conn.send(data, timeout)
            return conn.read()
        except (OSError, ConnectionError) as exc:  # socket.timeout is an OSError
            raise self._failed(node, exc, timeout) from None

    def _failed(self, node: Node, exc: Exception, timeout: float) -> Unavailable:
        """The error for a socket that failed mid-call; the socket is dropped."""
        # The reply may still arrive later: this socket is out of step, never reuse it.
        self._drop(node)
        if isinstance(exc, TimeoutError):
            return _Silent(f"translation storage did not answer within {timeout * 1000:.0f} ms")
        return _Unreachable(f"translation storage unreachable: {exc}")

    def _batch(self, node: Node, commands: Sequence[bytes], asking: bool, deadline: float) -> list[Any]:
        """The replies of `commands` sent to `node` in one write (each after ASKING when `asking`).

        A pooled connection that fails without a timeout, on its first use since its last reply, is most likely
        one Redis closed while it sat idle (a restart or failover: "Connection closed by server"); the commands
        are sent once more on a new connection, so the first call after Redis is back succeeds instead of each
        pooled socket handing out one stray UNAVAILABLE. Sending the translate script twice is safe: its decision
        only reads; its only writes are the rate-limit counters (INCR, PEXPIRE on the first), so in the rare
        case where the first copy did run (Redis answered, then died before the reply reached us) one call is
        counted twice in its rate window, which can only make a limit bite one call early, never let more through.
        """
        data = b"".join(_ASKING + command for command in commands) if asking else b"".join(commands)
        count = len(commands) * 2 if asking else len(commands)
        for resend in (False, True):
            left = deadline - time.monotonic()
            if left <= 0:
                raise _no_time_left()
            conn = self._conn(node, left)
            reused = conn.used
            try:
                started = time.perf_counter()
                conn.send(data, left)
                replies = [conn.read() for _ in range(count)]
                self._observe(time.perf_counter() - started)
            except (OSError, ConnectionError) as exc:  # socket.timeout is an OSError
                error = self._failed(node, exc, left)
                if reused and not resend and isinstance(error, _Unreachable):
                    continue
                raise error from None
            conn.used = True
            return replies[1::2] if asking else replies
        raise AssertionError("unreachable")

    # --- cluster slots -----------------------------------------------------------------------------------

    def _node_for(self, key: str, deadline: float) -> Node:
        if not self.cluster:
            return self.seed
        if not self._slots:
            self._load_slots(deadline)
        return self._slots[key_slot(key.encode())]

    def _reload_slots(self, deadline: float, avoid: Node | None = None) -> None:
        """A new slot map, unless one was asked for less than _SLOTS_RELOAD_INTERVAL ago; best effort (the call
        goes on with the map it has when no node answers)."""
        if time.monotonic() - self._slots_asked_at < _SLOTS_RELOAD_INTERVAL:
            return
        with contextlib.suppress(Unavailable):
            self._load_slots(deadline, avoid)

    def _load_slots(self, deadline: float, avoid: Node | None = None) -> None:
        """The slot map from CLUSTER SLOTS, asking one node after another within the call's budget; `avoid` (a node
        that just failed) is asked last."""
        budget = min(self.connect_timeout, deadline - time.monotonic())
        deadline = time.monotonic() + budget
        with self._slots_lock:
            if self._slots and time.monotonic() - self._slots_asked_at < _SLOTS_RELOAD_INTERVAL:
                return  # another thread has just reloaded it
            self._slots_asked_at = time.monotonic()
            candidates = [node for node in dict.fromkeys([self.seed, *self._slots]) if node != avoid]
            if avoid is not None:
                candidates.append(avoid)
            for node in candidates:
                if deadline - time.monotonic() <= 0:
                    break
                try:
                    (reply,) = self._batch(node, [_encode("CLUSTER", "SLOTS")], False, deadline)
                except Unavailable:
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    continue  # e.g. LOADING: another node may answer
                slots: list[Node] = [self.seed] * 16384
                for start, end, primary, *_ in reply:
                    host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
                    owner = (host or node[0], int(primary[1]))
                    slots[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
                self._slots = slots
                return
            raise unavailable(f"translation storage: no cluster node answered CLUSTER SLOTS in {budget * 1000:.0f} ms")

    # --- EVALSHA -----------------------------------------------------------------------------------------

    def _command(self, keys: Sequence[str], args: Sequence[str]) -> bytes:
        shape = (len(keys), len(args))
        head = self._heads.get(shape)
        if head is None:
            count = str(len(keys)).encode()
            head = self._prefix % (3 + len(keys) + len(args), self.script.sha.encode())
            head = self._heads[shape] = head + b"$%d\r\n%s\r\n" % (len(count), count)
        # One str built and encoded once: character counts are byte counts when everything is ASCII (numbers,
        # keys, our tenant ids); anything else takes the exact per-item path.
        text = "".join([f"${len(item)}\r\n{item}\r\n" for item in (*keys, *args)])
        if text.isascii():
            return head + text.encode()
        parts = [head]
        for item in (*keys, *args):
            data = item.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

    def evalsha(self, keys: Sequence[str], args: Sequence[str], timeout: float) -> Any:
        """The script's reply; Unavailable when Redis does not answer within `timeout` seconds."""
        if timeout <= 0:
            raise _no_time_left()
        return self._evalsha_command(keys[0], self._command(keys, args), time.monotonic() + timeout)

    def _evalsha_command(self, key: str, command: bytes, deadline: float, *, pausing: bool = True) -> Any:
        """The call's reply (see `_pipeline`); with `pausing` False, _SEND_AGAIN instead of pausing."""
        node = self._node_for(key, deadline)
        conn = self._conns().get(node)
        # The hot path: a connection that has answered before, one round trip.
        if conn is not None and conn.used and not (self._writes_paused and self._paused(node)):
            left = deadline - time.monotonic()
            wait = left if self.read_only is None else left * _STALL_SHARE
            try:
                started = time.perf_counter()
                conn.send(command, wait)
                reply = conn.read()
                self._observe(time.perf_counter() - started)
            except (OSError, ConnectionError) as exc:  # socket.timeout is an OSError
                error = self._failed(node, exc, wait)
                if isinstance(error, _Silent) and self.read_only is not None and left > 0:
                    self._pause(node, wait, deadline)  # the full path sends it again as the read-only copy
                elif not isinstance(error, _Unreachable) or left <= 0:
                    raise error from None
                # Closed while idle, or the node is gone: the full path sends it again (on a new connection,
                # after a slot-map reload in a cluster).
            else:
                if not isinstance(reply, hiredis.ReplyError):
                    return reply
                kind = str(reply).split(" ", 1)[0]
                if kind not in _SENT_AGAIN:
                    raise self._answer_for(reply, kind)
                # Not run (redirected, not loaded, not now): the full path handles it and sends it again.
        (reply,) = self._pipeline([(key, command)], deadline, pausing=pausing)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def evalsha_combined(self, keys: Sequence[str], args: Sequence[str], timeout: float) -> Any:
        """Like evalsha, but calls that arrive while another thread talks to Redis go out together.

        Flat combining: a caller that finds nobody talking to Redis becomes the leader and makes its own round
        trip (the plain path: no queue entry, no lock to wait on). Callers arriving meanwhile queue; when the
        leader is done it hands the lead to the first of them, who sends everything queued as one pipeline per
        node and passes the lead on. Every caller still waits at most `timeout`. With a thread-pool server
        this turns N concurrent round trips into one.
        """
        if timeout <= 0:
            raise _no_time_left()
        deadline = time.monotonic() + timeout
        command = self._command(keys, args)
        with self._queue_lock:
            lead = not self._leading
            if lead:
                self._leading = True
            else:
                slot = _Slot(keys[0], command)
                self._queue.append(slot)
        if lead:
            try:
                reply = self._evalsha_command(keys[0], command, deadline, pausing=False)
            finally:
                self._pass_lead()
            if reply is _SEND_AGAIN:  # Redis said "not now": pause and send again without holding the lead
                return self._evalsha_command(keys[0], command, deadline)
            return reply
        if not slot.done.acquire(timeout=timeout):
            with self._queue_lock:
                if slot.lead:  # handed the lead just now: lead anyway so the others are not stranded
                    lead = True
                elif slot in self._queue:
                    self._queue.remove(slot)
            if not lead:
                raise _Silent(f"translation storage did not answer within {timeout * 1000:.0f} ms")
        if slot.lead:
            self._lead(deadline)
        if slot.result is _SEND_AGAIN:
            return self._evalsha_command(slot.key, command, deadline)
        if isinstance(slot.result, BaseException):
            raise slot.result
        return slot.result

    def _lead(self, deadline: float) -> None:
        """Sends everything queued (the new leader's own call included) as one pipeline, then passes the lead.

        The leader never pauses for a "not now" reply (LOADING, CLUSTERDOWN, ...) while it holds the lead: a call
        that needs one gets _SEND_AGAIN and its own thread pauses and sends it again, so calls to healthy nodes
        are not held up behind it (a cluster failover affects a third of the slots)."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
        try:
            replies = self._pipeline([(s.key, s.command) for s in batch], deadline, pausing=False)
        except Exception as exc:
            replies = [exc] * len(batch)
        for slot, reply in zip(batch, replies, strict=True):
            slot.result = reply
            _wake(slot)
        self._pass_lead()

    def _pass_lead(self) -> None:
        with self._queue_lock:
            if self._queue:
                following = self._queue[0]
                following.lead = True
            else:
                following = None
                self._leading = False
        if following is not None:
            _wake(following)

    def evalsha_many(self, calls: Sequence[tuple[Sequence[str], Sequence[str]]], timeout: float) -> list[Any]:
        """Pipelined: every call's command written per node in one send, then the replies read in order.

        A reply is the script's result or an exception instance (the others still count).
        """
        if timeout <= 0:
            raise _no_time_left()
        return self._pipeline(
            [(keys[0], self._command(keys, args)) for keys, args in calls], time.monotonic() + timeout
        )

    def _pipeline(self, calls: Sequence[tuple[str, bytes]], deadline: float, *, pausing: bool = True) -> list[Any]:
        """Sends prepared EVALSHAs (routing key, command), one write per node; replies or exceptions in order.

        Every reply that is an error goes through `_next_try`: sent again (elsewhere, after ASKING, after a
        pause) while the deadline allows, else answered with the exception the caller gets (Unavailable for
        storage faults; hiredis.ReplyError for anything else, such as a script error: a bug, INTERNAL). With
        `pausing` False a call that needs a pause first is answered _SEND_AGAIN.
        """
        results: list[Any] = [None] * len(calls)
        # Where each pending call goes: (node, after ASKING)
        routes = {index: (self._node_for(key, deadline), False) for index, (key, _) in enumerate(calls)}
        pause = _PAUSE_FIRST
        last: dict[int, str] = {}  # the last error reply of a call sent again
        redirects = 0
        while True:
            redirects += 1
            by_route: dict[tuple[Node, bool], list[int]] = {}
            for index, route in routes.items():
                by_route.setdefault(route, []).append(index)
            routes = {}
            handled: dict[tuple[Node, str], tuple[Node, bool, bool] | None] = {}  # once per node and error kind
            wait = False
            for (node, asking), indexes in by_route.items():
                commands = [calls[i][1] for i in indexes]
                now = time.monotonic()
                until = deadline  # with a read-only copy, the script's share of the budget
                if self.read_only is not None:
                    if self._paused(node):
                        commands = [self._read_only_command(command) for command in commands]
                    else:
                        until = now + (deadline - now) * _STALL_SHARE
                try:
                    replies = self._batch(node, commands, asking, until)
                except Unavailable as exc:
                    if isinstance(exc, _Silent) and until < deadline:
                        self._pause(node, until - now, deadline)
                        for index in indexes:
                            routes[index] = (node, asking)
                        continue
                    moved = self._rerouted(
                        node, isinstance(exc, _Unreachable) and redirects < _MOST_REDIRECTS, deadline
                    )
                    for index in indexes:
                        target = self._node_for(calls[index][0], deadline) if moved else node
                        if target != node:
                            routes[index] = (target, False)
                        else:
                            results[index] = exc
                    continue
                for index, reply in zip(indexes, replies, strict=True):
                    if not isinstance(reply, hiredis.ReplyError):
                        results[index] = reply
                        continue
                    text = str(reply)
                    kind = text.split(" ", 1)[0]
                    if kind in ("MOVED", "ASK"):
                        step = self._redirect(node, text, deadline)
                    elif (node, kind) in handled:
                        step = handled[node, kind]
                    else:
                        step = handled[node, kind] = self._next_try(node, kind, asking, deadline)
                    if step is None or (redirects >= _MOST_REDIRECTS and not step[2]):
                        results[index] = self._answer_for(reply, kind)
                        continue
                    last[index] = kind
                    target, target_asking, pause_first = step
                    if pause_first:
                        if not pausing:
                            results[index] = _SEND_AGAIN
                            continue
                        target, target_asking = self._node_for(calls[index][0], deadline), False
                        wait = True
                    routes[index] = (target, target_asking)
            if not routes:
                return results
            left = deadline - time.monotonic()
            if wait:
                time.sleep(max(0.0, min(pause, left)))
                pause = min(pause * 2, _PAUSE_MOST)
                left = deadline - time.monotonic()
                redirects = 0
            if left <= 0:
                break
        for index in routes:  # still to send again, out of time
            kind = last.get(index, "")
            why = f" ({kind})" if kind else ""
            results[index] = unavailable(f"translation storage did not serve the call in time{why}; retry", kind)
        return results

    # --- a node whose writes are paused --------------------------------------------------------------------

    def _read_only_command(self, command: bytes) -> bytes:
        """The EVALSHA of the read-only copy with the same keys and arguments (the script's SHA comes first)."""
        return command.replace(self._sha, self._read_only_sha, 1)

    def _paused(self, node: Node) -> bool:
        until = self._writes_paused.get(node)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        self._writes_paused.pop(node, None)
        return False

    def _pause(self, node: Node, waited: float, deadline: float) -> None:
        """`node` left a call without a reply for `waited` seconds: its calls go read-only for an interval.

        The copy is loaded there first: Redis knows a script's flags only once it is loaded, so while writes are
        paused an EVALSHA of an unknown script waits like a write (where NOSCRIPT would have been the answer)."""
        if self._paused(node) or self.read_only is None:
            return
        self._writes_paused[node] = time.monotonic() + _READ_ONLY_INTERVAL
        with contextlib.suppress(Unavailable):  # not loaded: the copy's EVALSHA answers NOSCRIPT or waits
            self._batch(node, [_encode("SCRIPT", "LOAD", self.read_only.source)], False, deadline)
        where = self.unix_path or f"{node[0]}:{node[1]}"
        log.warning(
            "Redis %s did not answer the %s script within %.0f ms (writes paused, or slow): its calls go as the "
            "read-only copy for %.0f s, rate limits not enforced",
            where,
            self.script.name,
            waited * 1000,
            _READ_ONLY_INTERVAL,
        )

    def _rerouted(self, node: Node, unreachable: bool, deadline: float) -> bool:
        """After `node` refused or dropped the connection: True when the slot map was reloaded (a killed master's
        slots then point at the replica once it is promoted; until then they still point at the dead node and
        the call fails fast with UNAVAILABLE)."""
        if not (self.cluster and unreachable):
            return False
        self._reload_slots(deadline, avoid=node)
        return True

    def _redirect(self, node: Node, error: str, deadline: float) -> tuple[Node, bool, bool] | None:
        """MOVED <slot> <host:port>: the slot has a new owner (map reloaded); ASK: this one key is being imported
        there (ASKING first, the map stays)."""
        if not self.cluster:
            return None
        kind, slot, address = error.split(" ", 2)
        host, _, port = address.rpartition(":")
        target = (host or node[0], int(port))
        if kind == "ASK":
            return target, True, False
        self._slots[int(slot)] = target
        self._reload_slots(deadline)
        return target, False, False

    def _next_try(self, node: Node, kind: str, asking: bool, deadline: float) -> tuple[Node, bool, bool] | None:
        """Where a call whose reply was a `kind` error goes next: (node, ASKING first, pause first); None when the
        error is the answer."""
        if kind == "NOSCRIPT":  # the read-only copy too: it is then at hand when the node's writes pause
            scripts = [self.script] if self.read_only is None else [self.script, self.read_only]
            loads = [_encode("SCRIPT", "LOAD", script.source) for script in scripts]
            if any(isinstance(loaded, hiredis.ReplyError) for loaded in self._batch(node, loads, False, deadline)):
                return None
            return node, asking, False
        if kind in _RETRY_LATER:
            if self.cluster and kind in _RELOAD_FIRST:
                self._reload_slots(deadline)
            return node, False, True
        return None

    @staticmethod
    def _answer_for(reply: hiredis.ReplyError, kind: str) -> BaseException:
        """What the caller gets for an error reply that is not retried (any more)."""
        if kind in _SENT_AGAIN or kind in _REFUSED:
            return unavailable(f"translation storage cannot serve the call now ({kind}); retry", kind)
        return reply

    def close(self) -> None:
        """Closes this thread's sockets (other threads' close with their thread)."""
        for node in list(self._conns()):
            self._drop(node)
