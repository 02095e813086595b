"""`make run`'s launcher (deploy/local/run_local.py) as tests start it: its environment on free ports, and the
process with its output read line by line on a thread (`ready` set at its "ready." line)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from numprotect.core.settings import SERVICE_NAMES
from support.processes import ROOT
from support.redis_server import free_port

LAUNCHER = ROOT / "deploy" / "local" / "run_local.py"
SERVICES = SERVICE_NAMES


def launcher_env(run_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without any NUMPROTECT_ setting, then the run folder and free ports for Redis, every
    service and the first of the processes' consecutive /metrics ports; `extra` last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMPROTECT_")}
    env.update(
        NUMPROTECT_RUN_DIR=str(run_dir),
        NUMPROTECT_LOCAL_REDIS_PORT=str(free_port(below=55536)),
        NUMPROTECT_LOCAL_METRICS_PORT=str(free_port(below=65000)),
        **{f"NUMPROTECT_{name.upper()}_PORT": str(free_port()) for name in SERVICES},
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
