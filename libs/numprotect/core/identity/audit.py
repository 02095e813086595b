"""The audit trail: one event per privileged or denied call, append-only and hash-chained.

Each event is canonical JSON; its MAC is HMAC-SHA256(audit key, previous MAC | event), stored beside it in one
Redis stream (`np:audit:{audit}:log`, fields `e` and `m`), with the last MAC in `np:audit:{audit}:head`. An
append is a compare-and-set script: it adds the event only if the head is still the MAC the writer chained
from, so writers in many processes build one chain (a loser re-chains from the new head and retries).

The audit key is derived from the auth key (NUMPROTECT_AUTH_KEY_FILE) and never stored in Redis: someone
with write access to Redis can delete or edit events but cannot recompute the chain, so `verify` finds the
first event that was edited, removed or inserted. (Cutting events off the end is found only against a
head recorded elsewhere: `verify` returns the head so an operator can keep it.)

Writing is off the call path: `record` enqueues, a writer thread appends; a full queue (an attack of denied
calls) drops events and counts them, and the next event written says how many were dropped.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from numprotect.core.identity.api_keys import HashKey
from numprotect.core.redis_client import as_text

log = logging.getLogger(__name__)

LOG_KEY = "np:audit:{audit}:log"
HEAD_KEY = "np:audit:{audit}:head"
_DOMAIN = b"numprotect.audit\x00"
_GENESIS = ""

# Appends only when the chain's head is still ARGV[1]: {1, id} on success, {0, current head} otherwise.
APPEND_SCRIPT = """
local head = redis.call('GET', KEYS[1]) or ''
if head ~= ARGV[1] then return {0, head} end
local id = redis.call('XADD', KEYS[2], '*', 'e', ARGV[2], 'm', ARGV[3])
redis.call('SET', KEYS[1], ARGV[3])
return {1, id}
"""


@dataclass(frozen=True, slots=True)
class AuditEvent:
    time_ms: int
    principal: str  # Principal.subject, or "anonymous"
    role: str
    method: str
    target: str
    reason: str
    outcome: str  # the call's status code name, e.g. "OK", "PERMISSION_DENIED"
    trace_id: str
    peer: str
    dropped_before: int = 0  # events lost to a full queue just before this one

    def canonical(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_canonical(cls, raw: str | bytes) -> AuditEvent:
        return cls(**json.loads(raw))


def chain_mac(key: HashKey, previous: str, event_json: str) -> str:
    return key.mac(_DOMAIN, previous.encode(), event_json.encode()).hex()


class AuditLog:
    """Appends events from a writer thread on its own blocking client."""

    def __init__(self, key: HashKey, redis: Any, *, queue_limit: int = 10_000) -> None:
        self._key = key
        self._redis = redis
        self._script = redis.register_script(APPEND_SCRIPT)
        self._queue: queue.Queue[AuditEvent | None] = queue.Queue(maxsize=queue_limit)
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        self._head: str | None = None
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._pending = 0

    def record(self, event: AuditEvent) -> None:
        """Enqueues an event (never blocks the call)."""
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._dropped_lock:
                self._dropped += 1
            self._done()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Waits until every recorded event is written (or given up); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                with self._dropped_lock:
                    dropped, self._dropped = self._dropped, 0
                if dropped:
                    event = AuditEvent(**{**asdict(event), "dropped_before": event.dropped_before + dropped})
                self._append(event)
            except Exception as exc:
                log.error("audit event not written", extra={"method": event.method, "error": repr(exc)})
            finally:
                self._done()

    def _append(self, event: AuditEvent) -> None:
        body = event.canonical()
        for _ in range(100):
            previous = self._head if self._head is not None else self._read_head()
            mac = chain_mac(self._key, previous, body)
            written, value = self._script(keys=[HEAD_KEY, LOG_KEY], args=[previous, body, mac])
            if int(written) == 1:
                self._head = mac
                return
            self._head = as_text(value)  # another writer appended first: chain from its event
        raise RuntimeError("audit chain contended 100 times in a row")

    def _read_head(self) -> str:
        raw = self._redis.get(HEAD_KEY)
        return as_text(raw) if raw is not None else _GENESIS


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int  # events checked (up to and including the first bad one)
    first_bad_id: str  # stream id of the first event that does not verify ("" when ok)
    head: str  # the MAC of the last event: keep it elsewhere to detect a cut-off tail
    problem: str


def verify(key: HashKey, entries: Iterator[tuple[str, dict[str, str]]], head: str | None) -> ChainReport:
    """Walks the chain in order. `entries` yields (stream id, {"e": json, "m": mac}); `head` is the stored head."""
    previous = _GENESIS
    count = 0
    for entry_id, fields in entries:
        count += 1
        body, mac = fields.get("e", ""), fields.get("m", "")
        if chain_mac(key, previous, body) != mac:
            return ChainReport(False, count, entry_id, previous, "event edited, removed or inserted before it")
        previous = mac
    if head is not None and head != previous:
        return ChainReport(False, count, "", previous, "the stored head is not the last event's MAC")
    return ChainReport(True, count, "", previous, "")


def stream_entries(redis: Any, *, batch: int = 1000) -> Iterator[tuple[str, dict[str, str]]]:
    """Every entry of the log, oldest first, from a blocking client."""
    start = "-"
    while True:
        rows = redis.xrange(LOG_KEY, min=start, count=batch)
        for entry_id, fields in rows:
            yield as_text(entry_id), {as_text(k): as_text(v) for k, v in fields.items()}
        if len(rows) < batch:
            return
        start = "(" + as_text(rows[-1][0])


def verify_redis(key: HashKey, redis: Any) -> ChainReport:
    head = redis.get(HEAD_KEY)
    return verify(key, stream_entries(redis), as_text(head) if head is not None else None)
