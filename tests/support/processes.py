"""Real service processes (python -m <service>) on loopback ports chosen by the OS, serving TLS with the test PKI
(support/tls.py) unless their env sets NUMPROTECT_TLS=off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.core.settings import server_port_variable
from support.identity import service_token_env, with_auth
from support.tls import sync_channel_for, with_tls

ROOT = Path(__file__).resolve().parents[2]
# What the SIP adapter needs to start among the other services (its own tests set theirs): SIP on a port the OS
# chooses, and an egress host for its 302s.
SIP_DEFAULTS = {
    "NUMPROTECT_SIP_HOST": "127.0.0.1",
    "NUMPROTECT_SIP_PORT": "0",
    "NUMPROTECT_SIP_EGRESS": "127.0.0.1:5070",
}


def listen_env(service: str, port: int = 0) -> dict[str, str]:
    """The service's gRPC port variable (NUMPROTECT_<SERVICE>_PORT; sip's NUMPROTECT_SIP_GRPC_PORT) set to `port`."""
    return {server_port_variable(service): str(port)}


class ServiceProcess:
    """Runs one service as its own process; port 0 lets the OS choose, read back from the 'serving' log line."""

    # 60 s, as the chaos stack waits: on a loaded 2-core host three processes started at once took up to ~100 s to
    # log "serving" (test_concurrency), and a start that is merely slow is no failure of the code under test.
    def __init__(self, service: str, env: Mapping[str, str], *, port: int = 0, timeout: float = 60.0) -> None:
        self.service = service
        defaults = SIP_DEFAULTS if service == "sip" else {}
        full_env = {
            **self._with_service_token(service, with_auth(with_tls({**defaults, **os.environ, **env}))),
            **listen_env(service, port),
        }
        self.env = full_env
        full_env.setdefault("NUMPROTECT_GRACE_PERIOD", "2s")
        full_env.setdefault("NUMPROTECT_METRICS_PORT", "0")  # read back from the 'serving' line (metrics_url)
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"numprotect.services.{service}"],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._serving = threading.Event()
        self.port = 0
        self.metrics_url: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._serving.wait(timeout):
            self.stop()
            raise RuntimeError(f"{service} did not start:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if not self._serving.is_set() and '"msg": "serving"' in line:
                serving = json.loads(line)
                self.port = int(serving["port"])
                self.metrics_url = serving.get("metrics_url")
                self._serving.set()

    @staticmethod
    def _with_service_token(service: str, environ: dict[str, str]) -> dict[str, str]:
        return {**environ, **service_token_env(environ, service)}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, token: str | None = None) -> grpc.Channel:
        """A blocking channel to the process: TLS trusting the test CA, unless it runs with NUMPROTECT_TLS=off."""
        return sync_channel_for(self.address, self.env, token)

    def wait_serving(self, timeout: float = 10.0, service_name: str = "") -> None:
        """Waits until the health check answers SERVING."""
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"{self.service} not SERVING after {timeout}s")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=2)
        return self.process.returncode
