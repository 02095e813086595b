"""Exactly one Redis round trip per Translate: counted on the wire with MONITOR and INFO commandstats."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster

from numprotect.core.identity.api_keys import VERSION_KEY
from numprotect.core.identity.directory import CARRIER_VERSION_KEY
from numprotect.core.routes import MODE_AXE, MODE_AXN, lock_key
from numprotect.translation.v1 import translation_pb2 as pb

X_AXB = "700100000000001"
X_AXN = "700100000000002"
X_AXE = "700100000000003"
X_LOCKED = "700100000000004"
A = "13800000001"
B = "13900000002"


class Monitor:
    """MONITOR on one node over a raw socket: every command the node runs, one line each, on a thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port))
        self.sock.sendall(b"MONITOR\r\n")
        self.lines: list[str] = []
        self._buffer = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                return
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\r\n")
            self.lines.extend(line.decode(errors="replace") for line in complete if line.startswith(b"+"))

    async def started(self, within: float = 10.0) -> None:
        """Until MONITOR answered +OK: every command the node runs from then on shows (a fixed sleep missed some
        on a loaded host)."""
        await _until(lambda: "+OK" in self.lines, within, f"MONITOR on {self.host}:{self.port} not answered")

    async def stop_after_all_so_far(self, within: float = 10.0) -> list[str]:
        """Every command the node ran until now, then stopped: a marker ECHO sent now shows after all of them (a
        node feeds MONITOR in the order it runs commands), so nothing still on its way is cut off."""
        marker = f"monitor-end-{uuid.uuid4().hex}"
        with socket.create_connection((self.host, self.port)) as sock:  # raw: a client library adds HELLO
            sock.sendall(f"ECHO {marker}\r\n".encode())
            sock.recv(1 << 10)
        await _until(lambda: any(marker in line for line in self.lines), within, "the marker ECHO not monitored")
        return [line for line in self.stop() if marker not in line]

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return [line for line in self.lines if line != "+OK"]


async def _until(check: Callable[[], bool], within: float, failure: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.01)


def _primaries(redis_sync: Any) -> list[tuple[str, int]]:
    if isinstance(redis_sync, RedisCluster):
        return [(node.host, node.port) for node in redis_sync.get_primaries()]
    pool = redis_sync.connection_pool.connection_kwargs
    return [(pool["host"], pool["port"])]


async def test_a_thousand_translations_are_a_thousand_evalsha_and_nothing_else(
    translation_factory: Any, redis_env: dict[str, str], redis_sync: Any
) -> None:
    # Background commands far apart: health probe and blocklist poll. The identity directory polls its two
    # version counters every NUMPROTECT_AUTH_REFRESH_SECONDS (2 s at most) whatever the calls: counted apart.
    tr = await translation_factory(
        {
            "NUMPROTECT_HEALTH_INTERVAL": "60s",
            "NUMPROTECT_TRANSLATION_BLOCKLIST_REFRESH": "60s",
            "NUMPROTECT_AUTH_REFRESH_SECONDS": "2",
        }
    )
    await tr.put(tr.route("b1"), X_AXB)
    await tr.put(tr.route("n1", MODE_AXN), X_AXN)
    await tr.put(tr.route("e1", MODE_AXE), X_AXE, extension="1234")
    redis_sync.set(lock_key(X_LOCKED), "locked")
    calls = [
        (A, X_AXB, ""),  # CONNECT
        (B, X_AXB, ""),  # CONNECT
        ("13700000003", X_AXB, ""),  # NO_BINDING
        ("13700000003", X_AXN, ""),  # CONNECT
        (B, X_AXE, "1234"),  # CONNECT
        (B, X_AXE, ""),  # COLLECT_EXTENSION
        (A, X_LOCKED, ""),  # NUMBER_LOCKED
        (A, "700100000000999", ""),  # NO_BINDING
    ]
    tr.route_blocks(X_LOCKED, "700100000000999")  # the carrier's own numbers (one block here)
    await tr.translate(A, X_AXB)  # warm: connections open, script cached, the key verified once
    primaries = _primaries(redis_sync)
    for host, port in primaries:
        with redis.Redis(host=host, port=port) as node:
            node.config_resetstat()
    monitors = [Monitor(host, port) for host, port in primaries]
    for monitor in monitors:
        await monitor.started()

    decisions: dict[int, int] = {}
    for i in range(1000):
        caller, called, extension = calls[i % len(calls)]
        reply = await tr.translate(caller, called, extension, call_id=f"c{i}")
        decisions[reply.decision] = decisions.get(reply.decision, 0) + 1
    lines = [line for monitor in monitors for line in await monitor.stop_after_all_so_far()]

    assert set(decisions) == {pb.DECISION_CONNECT, pb.DECISION_REJECT, pb.DECISION_COLLECT_EXTENSION}
    identity_polls = {f'"GET" "{VERSION_KEY}"', f'"GET" "{CARRIER_VERSION_KEY}"'}
    from_network = [line for line in lines if " lua]" not in line]
    polls = [line for line in from_network if line.split("] ", 1)[1] in identity_polls]
    per_call = [line for line in from_network if line not in polls]
    inside_scripts = [line for line in lines if " lua]" in line]
    commands = {line.split('"')[1].lower() for line in per_call}
    assert len(per_call) == 1000, per_call[:5]
    assert commands == {"evalsha"}
    assert len(polls) <= 2 * 5  # two counters per poll, one poll per 2 s: a background cost, not per call
    assert len(inside_scripts) > 1000  # the lookups and counters ran inside the scripts

    # INFO commandstats agrees: 1000 EVALSHA (it also counts the calls made inside them).
    evalsha_calls = 0
    for host, port in primaries:
        with redis.Redis(host=host, port=port) as node:
            evalsha_calls += node.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert evalsha_calls == 1000
