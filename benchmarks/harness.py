"""What the benchmarks share: free ports, child processes that are always stopped, waiting for readiness."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_args(binary: str, port: int, workdir: Path, *settings: str) -> list[str]:
    """redis-server on loopback `port` with its files in `workdir`, no RDB snapshots; `settings` add or override."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "", *settings]


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Runs `args` from the repository root with output to `log`; terminates it (then kills) on exit."""
    with log.open("wb") as out:
        child = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def wait_serving(address: str, child: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> None:
    """Waits until the overall health at `address` is SERVING; fails early with the log if the child exits."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise RuntimeError(f"{address} exited:\n{log.read_text()[-2000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{address} not SERVING after {timeout}s")


def wait_redis(port: int, timeout: float = 10.0) -> redis.Redis:
    """A client of the redis-server on `port` once it answers PING."""
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return client
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc): cost per call, independent of machine load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
