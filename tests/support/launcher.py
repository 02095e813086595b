"""`make run`'s launcher (deploy/local/run_local.py) as tests start it: its environment on free ports, and the
process with its output read line by line on a thread (`ready` set at its "ready." line)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from numprotect.core.settings import SERVICE_NAMES
from numprotect.core.settings import server_port_variable as port_variable
from support.processes import ROOT
from support.redis_server import bindable, free_port, free_ports

LAUNCHER = ROOT / "deploy" / "local" / "run_local.py"
SERVICES = SERVICE_NAMES
# Consecutive /metrics ports kept free for the launcher's processes (one per process: a service may run several).
METRICS_PORTS = 16


def free_port_run(count: int, *, below: int = 65000) -> int:
    """The first of `count` consecutive loopback ports free right now: the launcher gives its processes successive
    /metrics ports from NUMPROTECT_LOCAL_METRICS_PORT, and a single free port left the next ones to chance."""
    while True:
        first = free_port(below=below - count)
        if all(bindable(port) for port in range(first, first + count)):
            return first


def launcher_env(run_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without any NUMPROTECT_ setting, then the run folder and free ports for Redis, every
    service, the SIP listeners and the first of the processes' consecutive /metrics ports; `extra` last. The ports
    are all different, and none is one `extra` names (a port in `extra` is a test's own, chosen before)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMPROTECT_")}
    metrics = free_port_run(METRICS_PORTS)
    avoid = {*range(metrics, metrics + METRICS_PORTS), *(int(v) for v in extra.values() if v.isdigit())}
    while True:
        redis_port, sip_port, *service_ports = free_ports(2 + len(SERVICES), below=55536, avoid=avoid)
        if bindable(sip_port, socket.SOCK_DGRAM):  # the SIP adapter listens on UDP and TCP
            break
    env.update(
        NUMPROTECT_RUN_DIR=str(run_dir),
        NUMPROTECT_LOCAL_REDIS_PORT=str(redis_port),
        NUMPROTECT_LOCAL_METRICS_PORT=str(metrics),
        **{port_variable(name): str(port) for name, port in zip(SERVICES, service_ports, strict=True)},
        NUMPROTECT_SIP_PORT=str(sip_port),
        **extra,
    )
    return env


@dataclass
class Launched:
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("ready."):
                self.ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)


def launch(env: dict[str, str]) -> Launched:
    """The launcher started in the repository's root with `env`, its output (stderr too) read as it comes."""
    process = subprocess.Popen(
        [sys.executable, str(LAUNCHER)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return Launched(process)
