"""A real redis-server (Debian's package) on a free loopback port, in a temporary folder."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port(*, below: int = 65536) -> int:
    """A loopback port free right now (below `below`: cluster nodes need port + 10000 free too)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port < below:
            return port


class RedisServer:
    """Starts redis-server with the given extra arguments; stop() shuts it down and removes its folder."""

    def __init__(self, *extra_args: str, port: int | None = None, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run `make system-deps` (Debian package redis-server)")
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="numprotect-redis-"))
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--loglevel",
            "warning",
            *extra_args,
        ]
        self._args = args
        self.log = self.dir / "redis.log"
        self.process = self._spawn()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._wait_ready()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            return subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{tail}")
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING in time")

    def kill(self) -> None:
        """Kills the server abruptly (SIGKILL), as a crash would."""
        self.process.kill()
        self.process.wait()

    def restart(self) -> None:
        """Starts it again on the same port and folder (data kept when AOF is on)."""
        self.process = self._spawn()
        self._wait_ready()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
