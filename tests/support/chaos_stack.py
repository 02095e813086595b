"""The five services as real processes (TLS, API keys) on a real redis-server with `appendfsync always`, set up for
fault injection: kill and restart Redis or a service, slow Redis down, put latency proxies in between, fill the
disk under the AOF, and count each process's threads and sockets.

One tenant (TENANT) owns one block of 10,000 numbers routed by carrier CARRIER; the test process calls as that
tenant (binding, cdr reads), that carrier (translation, cdr ingestion) and the operator (allocation).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis

from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.core.identity.principal import Role
from numprotect.core.settings import SERVICE_NAMES
from support.identity import mint_in
from support.processes import ServiceProcess
from support.redis_server import RedisServer
from support.tcp_proxy import LatencyProxy

TENANT = "t-chaos"
CARRIER = "cmcc"
CITY = "010"
BLOCK = "70010000077"
SERVICES = SERVICE_NAMES
# Per-call deadline of the load's clients, and how much later than it an answer may arrive (client-side overhead).
CALL_DEADLINE_SECONDS = 2.0
DEADLINE_MARGIN_SECONDS = 0.5
# How long a service process may take to log "serving" (imports alone took over 20 s at a load average of 15).
START_TIMEOUT_SECONDS = 60.0

# What the services run with here (docs/reliability.md, "Settings an operator must choose"): Redis calls bounded
# well inside the callers' 2 s deadlines, health probed often, translation's per-caller rate limits off (the load
# calls the same parties over and over).
SERVICE_ENV = {
    "NUMPROTECT_REDIS_MODE": "standalone",
    "NUMPROTECT_REDIS_TIMEOUT": "0.5s",
    "NUMPROTECT_HEALTH_INTERVAL": "0.2s",
    "NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "0",
    "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "0",
    "NUMPROTECT_CDR_WATCH_BLOCK": "200ms",
}


@dataclass(frozen=True)
class ProcessCounts:
    threads: int
    sockets: int


def process_counts(pid: int) -> ProcessCounts:
    """Threads (/proc/<pid>/task) and open sockets (/proc/<pid>/fd links to socket:[...]) of a process."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
    return ProcessCounts(threads, sockets)


class TinyDisk:
    """A tmpfs of `size_bytes` for Redis' folder; `fill()` takes every free byte, `free()` gives them back."""

    def __init__(self, size_bytes: int) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="numprotect-chaos-aof-"))
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(self.path)], check=True)
        self.filler = self.path / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            block = b"\0" * 65536
            with contextlib.suppress(OSError):
                while os.write(fd, block):
                    pass
            with contextlib.suppress(OSError):
                while os.write(fd, block[:512]):
                    pass
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def remove(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)
        shutil.rmtree(self.path, ignore_errors=True)


class ChaosStack:
    """Redis (AOF, `appendfsync` as given, DEBUG allowed from loopback) and the four services.

    `proxy_redis`: the services reach Redis through a LatencyProxy (`redis_proxy`); `proxy_allocation`: binding
    reaches allocation through one (`allocation_proxy`). `disk_bytes`: Redis' folder is a TinyDisk that size.
    `replica`: a replica of Redis runs too.
    """

    def __init__(
        self,
        *,
        appendfsync: str = "always",
        proxy_redis: bool = False,
        proxy_allocation: bool = False,
        disk_bytes: int | None = None,
        replica: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.disk = TinyDisk(disk_bytes) if disk_bytes else None
        folder = ["--dir", str(self.disk.path)] if self.disk else []
        self.redis = RedisServer(
            "--appendfsync", appendfsync, "--enable-debug-command", "local", *folder, appendonly=True
        )
        # A replica of it (no AOF of its own), for NUMPROTECT_REDIS_WAIT_REPLICAS.
        self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.redis.port)) if replica else None
        self.redis_proxy = LatencyProxy("127.0.0.1", self.redis.port) if proxy_redis else None
        self.allocation_proxy: LatencyProxy | None = None
        redis_port = self.redis_proxy.port if self.redis_proxy else self.redis.port
        self.env = {**SERVICE_ENV, "NUMPROTECT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", **(env or {})}
        self.processes: dict[str, ServiceProcess] = {}
        self.kills: dict[str, list[float]] = {}  # service -> time.monotonic() of each kill -9, for the load client
        self.tokens: dict[str, str] = {}
        try:
            direct = {**self.env, "NUMPROTECT_REDIS_URL": self.redis.url}
            self.tokens = {
                "operator": mint_in(direct, Role.OPERATOR),
                "tenant": mint_in(direct, Role.TENANT, TENANT),
                "carrier": mint_in(direct, Role.CARRIER, CARRIER),
            }
            self.processes["allocation"] = ServiceProcess("allocation", self.env, timeout=START_TIMEOUT_SECONDS)
            if proxy_allocation:
                self.allocation_proxy = LatencyProxy("127.0.0.1", self.processes["allocation"].port)
            for service in SERVICES[1:]:  # after allocation: binding needs its address
                self.processes[service] = ServiceProcess(service, self._env_of(service), timeout=START_TIMEOUT_SECONDS)
            for process in self.processes.values():
                process.wait_serving(timeout=20)
            self._import_block()
        except BaseException:
            self.stop()
            raise

    def _env_of(self, service: str) -> dict[str, str]:
        allocation = self.processes["allocation"].address
        if self.allocation_proxy is not None:
            allocation = self.allocation_proxy.address
        peers = {"NUMPROTECT_ALLOCATION_ADDR": allocation}
        # binding's address for the others; translation's for sip (its TranslateStreams).
        for peer in ("binding", "translation"):
            if peer in self.processes and service != peer:
                peers[f"NUMPROTECT_{peer.upper()}_ADDR"] = self.processes[peer].address
        return {**self.env, **peers}

    def _import_block(self) -> None:
        """ImportBlock, repeated while UNAVAILABLE: its one script adds 10,000 numbers and may outlast the
        services' 0.5 s Redis timeout on a busy machine (it completes in Redis; a repeat finds it imported)."""
        request = allocation_pb2.ImportBlockRequest(
            block=BLOCK, tenant_id=TENANT, city_code=CITY, actor="chaos", carrier_id=CARRIER
        )
        with self.processes["allocation"].channel() as channel:
            stub = allocation_pb2_grpc.AllocationServiceStub(channel)
            for attempt in range(10):
                try:
                    stub.ImportBlock(
                        request, metadata=(("authorization", f"Bearer {self.tokens['operator']}"),), timeout=30
                    )
                    break
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 9:  # type: ignore[attr-defined]
                        raise
                    time.sleep(0.5)
        # translation and cdr learn the block's carrier on their next key/block reload (0.1 s in tests)
        time.sleep(0.5)

    def address(self, service: str) -> str:
        return self.processes[service].address

    def pid(self, service: str) -> int:
        return self.processes[service].process.pid

    def pids(self) -> dict[str, int]:
        return {service: self.pid(service) for service in self.processes}

    def counts(self) -> dict[str, ProcessCounts]:
        return {service: process_counts(self.pid(service)) for service in self.processes}

    def redis_client(self) -> redis.Redis:
        """A blocking client straight to Redis (not through any proxy)."""
        return self.redis.client()

    def kill_service(self, service: str) -> None:
        process = self.processes[service]
        self.kills.setdefault(service, []).append(time.monotonic())
        process.process.kill()
        process.process.wait()

    def killed_between(self, service: str, start: float, end: float) -> bool:
        """Whether `service` was killed (kill -9) between the time.monotonic() instants `start` and `end`."""
        return any(start <= killed <= end for killed in self.kills.get(service, []))

    def start_service(self, service: str) -> ServiceProcess:
        """Starts `service` again on its old port (its peers and the clients keep their addresses)."""
        old = self.processes[service]
        env = self.env if service == "allocation" else self._env_of(service)
        self.processes[service] = ServiceProcess(service, env, port=old.port, timeout=START_TIMEOUT_SECONDS)
        self.processes[service].wait_serving(timeout=20)
        return self.processes[service]

    def heal(self) -> None:
        """Undoes whatever a failed test may have left broken: disk space, Redis down or not fsyncing always, a
        service process dead."""
        if self.disk is not None:
            self.disk.free()
        if self.redis.process.poll() is not None:
            self.redis.restart()
        client = self.redis_client()
        try:
            client.config_set("appendfsync", "always")
        finally:
            client.close()
        for service, process in list(self.processes.items()):
            if process.process.poll() is not None:
                self.start_service(service)
            self.processes[service].wait_serving(timeout=20)

    def unexpected_errors(self) -> list[str]:
        """Log lines of the services that report an error the call layer did not expect (answered INTERNAL)."""
        return [
            f"{service}: {line}"
            for service, process in self.processes.items()
            for line in process.lines
            if '"unexpected error"' in line or "Traceback" in line
        ]

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            with contextlib.suppress(Exception):
                process.stop()
        for proxy in (self.redis_proxy, self.allocation_proxy):
            if proxy is not None:
                proxy.close()
        self.redis.stop()
        if self.replica is not None:
            self.replica.stop()
        if self.disk is not None:
            self.disk.remove()
