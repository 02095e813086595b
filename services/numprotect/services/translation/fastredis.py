"""A minimal blocking Redis client for the sync hot path: EVALSHA of one script, per-call timeout, cluster slots.

redis-py's sync client costs several times more Python per command than the call needs and has no per-call
timeout. This one keeps one socket per node per thread, writes the pre-encoded command in one send, parses
with hiredis, and bounds every call by the caller's remaining deadline. Redis Cluster: slots from
CLUSTER SLOTS, refreshed on MOVED; NOSCRIPT loads the script on that node and retries.

rediss:// speaks TLS with the settings' verified context (the CA file alone, hostname checked, optional client
certificate); the ACL user authenticates with AUTH <user> <password> once per connection, inside that TLS.
"""

from __future__ import annotations

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

from numprotect.core.errors import Unavailable
from numprotect.core.redis_client import LuaScript
from numprotect.core.settings import RedisSettings, SettingsError

Node = tuple[str, int]


def _encode(*parts: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Conn:
    __slots__ = ("reader", "sock", "timeout")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = hiredis.Reader()
        self.timeout = -1.0

    def send(self, data: bytes, timeout: float) -> None:
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
    """Runs one Lua script by EVALSHA on a standalone Redis or a Redis Cluster, from any thread."""

    def __init__(self, settings: RedisSettings, script: LuaScript) -> None:
        url = urlparse(settings.url)
        if (url.scheme == "rediss") != (settings.tls is not None):
            # Never plaintext for a rediss:// URL, never a TLS setting quietly unused.
            raise SettingsError(f"NUMPROTECT_REDIS_URL={settings.url!r}: TLS settings do not match the URL's scheme")
        self.script = script
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
        # Combining: concurrent calls from handler threads share one pipelined write per node.
        self._queue: list[_Slot] = []
        self._queue_lock = threading.Lock()
        self._leading = False

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
            raise Unavailable(f"translation storage TLS handshake failed: {exc}") from None
        except OSError as exc:
            raise Unavailable(f"translation storage unreachable: {exc}") from None
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
                raise Unavailable(f"translation storage refused the connection: {reply}")
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
            return Unavailable(f"translation storage did not answer within {timeout * 1000:.0f} ms")
        return Unavailable(f"translation storage unreachable: {exc}")

    # --- cluster slots -----------------------------------------------------------------------------------

    def _node_for(self, key: str, timeout: float) -> Node:
        if not self.cluster:
            return self.seed
        if not self._slots:
            self._load_slots(timeout)
        return self._slots[key_slot(key.encode())]

    def _load_slots(self, timeout: float) -> None:
        """The slot map from CLUSTER SLOTS, asking one node after another within the call's budget (`timeout`)."""
        budget = min(self.connect_timeout, timeout)
        deadline = time.monotonic() + budget
        with self._slots_lock:
            candidates = [self.seed, *dict.fromkeys(self._slots)]
            for node in candidates:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    reply = self._round_trip(node, self._conn(node, left), _encode("CLUSTER", "SLOTS"), left)
                except Unavailable:
                    continue
                slots: list[Node] = [self.seed] * 16384
                for start, end, primary, *_ in reply:
                    host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
                    owner = (host or node[0], int(primary[1]))
                    slots[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
                self._slots = slots
                return
            raise Unavailable(f"translation storage: no cluster node answered CLUSTER SLOTS in {budget * 1000:.0f} ms")

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
            raise Unavailable("no time left for the translation storage")
        return self._evalsha_command(keys[0], self._command(keys, args), timeout)

    def _evalsha_command(self, key: str, command: bytes, timeout: float) -> Any:
        for _ in range(3):
            node = self._node_for(key, timeout)  # again after a MOVED: the retry goes where the key lives now
            reply = self._round_trip(node, self._conn(node, timeout), command, timeout)
            if not isinstance(reply, hiredis.ReplyError):
                return reply
            if not self._recover(node, str(reply), timeout):
                raise reply
        raise Unavailable("translation storage kept redirecting the call")

    def evalsha_combined(self, keys: Sequence[str], args: Sequence[str], timeout: float) -> Any:
        """Like evalsha, but calls that arrive while another thread talks to Redis go out together.

        Flat combining: a caller that finds nobody talking to Redis becomes the leader and makes its own round
        trip (the plain path: no queue entry, no lock to wait on). Callers arriving meanwhile queue; when the
        leader is done it hands the lead to the first of them, who sends everything queued as one pipeline per
        node and passes the lead on. Every caller still waits at most `timeout`. With a thread-pool server
        this turns N concurrent round trips into one.
        """
        if timeout <= 0:
            raise Unavailable("no time left for the translation storage")
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
                return self._evalsha_command(keys[0], command, timeout)
            finally:
                self._pass_lead()
        if not slot.done.acquire(timeout=timeout):
            with self._queue_lock:
                if slot.lead:  # handed the lead just now: lead anyway so the others are not stranded
                    lead = True
                elif slot in self._queue:
                    self._queue.remove(slot)
            if not lead:
                raise Unavailable(f"translation storage did not answer within {timeout * 1000:.0f} ms")
        if slot.lead:
            self._lead(timeout)
        if isinstance(slot.result, BaseException):
            raise slot.result
        return slot.result

    def _lead(self, timeout: float) -> None:
        """Sends everything queued (the new leader's own call included) as one pipeline, then passes the lead."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
        try:
            replies = self._pipeline([(s.key, s.command) for s in batch], timeout)
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
        return self._pipeline([(keys[0], self._command(keys, args)) for keys, args in calls], timeout)

    def _pipeline(self, calls: Sequence[tuple[str, bytes]], timeout: float) -> list[Any]:
        """Sends prepared EVALSHAs (routing key, command), one write per node; replies or exceptions in order.

        NOSCRIPT (script loaded on that node) and MOVED (slots reloaded) are retried, up to three rounds.
        """
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(3):
            by_node: dict[Node, list[int]] = {}
            for index in todo:
                by_node.setdefault(self._node_for(calls[index][0], timeout), []).append(index)
            retry: list[int] = []
            for node, indexes in by_node.items():
                conn = self._conn(node, timeout)
                try:
                    conn.send(b"".join(calls[i][1] for i in indexes), timeout)
                    replies = [conn.read() for _ in indexes]
                except (OSError, ConnectionError) as exc:
                    error = self._failed(node, exc, timeout)
                    for index in indexes:
                        results[index] = error
                    continue
                recovered: set[str] = set()
                for index, reply in zip(indexes, replies, strict=True):
                    if isinstance(reply, hiredis.ReplyError):
                        text = str(reply)
                        kind = text.split(" ", 1)[0]
                        if kind in recovered or self._recover(node, text, timeout):
                            recovered.add(kind)
                            retry.append(index)
                            continue
                    results[index] = reply
            if not retry:
                return results
            todo = retry
        for index in todo:
            results[index] = Unavailable("translation storage kept redirecting the call")
        return results

    def _recover(self, node: Node, error: str, timeout: float) -> bool:
        """Handles NOSCRIPT (load on that node) and MOVED (reload slots); False for other errors."""
        if error.startswith("NOSCRIPT"):
            self._round_trip(node, self._conn(node, timeout), _encode("SCRIPT", "LOAD", self.script.source), timeout)
            return True
        if error.startswith("MOVED") and self.cluster:
            self._load_slots(timeout)
            return True
        return False

    def close(self) -> None:
        """Closes this thread's sockets (other threads' close with their thread)."""
        for node in list(self._conns()):
            self._drop(node)
