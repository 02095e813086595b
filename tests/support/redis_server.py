"""A real redis-server (Debian's package) on a free loopback port, in a temporary folder."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis


def free_port(*, below: int = 65536) -> int:
    """A loopback port free right now (below `below`)."""
    return free_ports(1, below=below)[0]


def free_ports(count: int, *, below: int = 65536, avoid: Collection[int] = ()) -> list[int]:
    """`count` different loopback ports free right now, none in `avoid`. They are held bound together while chosen:
    one at a time, the kernel may hand out a port it just gave (a launcher once got one port for Redis and SIP)."""
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            sock = socket.socket()
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port >= below or port in avoid:
                held.pop().close()
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def bindable(port: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> bool:
    """Whether a loopback port is free right now (TCP, or UDP with `kind` SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """`count` different free ports P for cluster nodes whose bus port P + 10000 is free too (a bus port taken by
    another process's connection failed a node's start: "Failed listening on port ... (cluster)")."""
    chosen: list[int] = []
    while len(chosen) < count:
        taken = [*chosen, *(port + 10000 for port in chosen)]
        for port in free_ports(count - len(chosen), below=55536, avoid=taken):
            if port + 10000 not in taken and bindable(port + 10000):
                chosen.append(port)
                taken += [port, port + 10000]
    return chosen


@dataclass(frozen=True)
class ServerTls:
    """TLS of a test redis-server: its certificate and key, and the CA it checks client certificates against."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    # redis-server's tls-auth-clients: "no", "optional" or "yes" (a client certificate required)
    auth_clients: str = "no"
    # What the test's own client presents when Redis asks (cert, key)
    client: tuple[Path, Path] | None = None


class RedisServer:
    """Starts redis-server with the given extra arguments; stop() shuts it down and removes its folder.

    `auth` is the (user, password) of the server's own client (a server started with an ACL file whose default
    user is off); `tls` serves TLS only (the port is the TLS port, `url` is rediss://).
    """

    def __init__(
        self,
        *extra_args: str,
        port: int | None = None,
        appendonly: bool = False,
        auth: tuple[str, str] | None = None,
        tls: ServerTls | None = None,
    ) -> None:
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
        self.auth = auth
        self.tls = tls
        if tls is not None:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(tls.cert_file), "--tls-key-file", str(tls.key_file)]
            args += ["--tls-ca-cert-file", str(tls.ca_file), "--tls-auth-clients", tls.auth_clients]
        self._args = args
        self.log = self.dir / "redis.log"
        self.process = self._spawn()
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
        self._wait_ready()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            return subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT)

    def client(self) -> redis.Redis:
        options: dict[str, Any] = {}
        if self.auth is not None:
            options.update(username=self.auth[0], password=self.auth[1])
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca_file))
            if self.tls.client is not None:
                options.update(ssl_certfile=str(self.tls.client[0]), ssl_keyfile=str(self.tls.client[1]))
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

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


def durable_loading_redis() -> RedisServer:
    """A Redis with AOF fsync'd on every write (a kill -9 loses nothing acknowledged) that loads its data slowly
    (100 us per key, events served while loading): restarted over some thousand keys it answers LOADING for a
    while, as a large data set would."""
    return RedisServer(
        "--appendfsync",
        "always",
        "--enable-debug-command",
        "yes",
        "--key-load-delay",
        "100",
        "--loading-process-events-interval-bytes",
        "1024",
        appendonly=True,
    )


def saving_redis(data_dir: Path) -> RedisServer:
    """A Redis working in `data_dir` with a save point: a background save that fails then stops writes (MISCONF)."""
    return RedisServer("--dir", str(data_dir), "--save", "3600 1")


def fail_a_save(admin: redis.Redis, data_dir: Path) -> None:
    """MISCONF for real: the folder of a `saving_redis` is removed and a background save fails (waited for, 10 s)."""
    shutil.rmtree(data_dir)
    admin.bgsave()
    deadline = time.monotonic() + 10
    while admin.info("persistence")["rdb_last_bgsave_status"] != "err":
        assert time.monotonic() < deadline, "the background save did not fail"
        time.sleep(0.05)


def take_writes_again(admin: redis.Redis) -> None:
    """The operator's way out of MISCONF when the folder cannot come back (Redis works in the removed one, its
    cwd): stop refusing writes after a failed save, and no save point left (a clean shutdown)."""
    admin.config_set("stop-writes-on-bgsave-error", "no", "save", "")
