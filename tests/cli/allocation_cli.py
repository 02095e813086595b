"""The allocation service alone (TLS, auth, real Redis) with a context file for `numprotect`, for the tests of
`blocks import` and `pool stats`: the CLI in-thread (typer's CliRunner) or as its own process (a terminal, a kill)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from numprotect.allocation.v1 import allocation_pb2_grpc
from numprotect.core.identity import audit
from numprotect.core.identity.audit import AuditEvent
from numprotect.core.identity.principal import Role
from numprotect.services.allocation.app import build
from support.inprocess import RunningService, running_service
from support.tls import test_pki

from .conftest import Result, run_cli, write_secret

ROOT = Path(__file__).resolve().parents[2]
HEADER = "block,tenant_id,city_code,carrier_id"


def block(i: int) -> str:
    return f"7002{i:07d}"


@dataclass
class AllocationCli:
    service: RunningService[Any, Any]
    config: Path
    token_file: Path
    operator: Any  # AllocationService stub as the operator
    binding: Any  # AllocationService stub as the binding service (reservations)

    async def cli(self, *args: str) -> Result:
        return await run_cli(self.config, *args)

    async def add_context(self, name: str, allocation_address: str, token_file: Path | None = None) -> None:
        """Another context: allocation at `allocation_address` (e.g. through a proxy), the operator's key unless
        `token_file` names another."""
        created = await self.cli(
            "config",
            "set-context",
            name,
            f"--allocation={allocation_address}",
            f"--ca-file={test_pki().ca_file}",
            f"--token-file={token_file or self.token_file}",
        )
        assert created.exit_code == 0, created.stderr

    def command(self, *args: str) -> list[str]:
        """The CLI as a process of its own (python -m numprotect.cli), bound to the context file."""
        return [sys.executable, "-m", "numprotect.cli", "--config", str(self.config), *args]

    def environ(self) -> dict[str, str]:
        return {**os.environ, "NUMPROTECT_CONFIG": str(self.config), "PYTHONPATH": str(ROOT / "tests")}

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command(*args), env=self.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    async def import_calls(self) -> dict[str, list[str]]:
        """Per block, the outcome of every ImportBlock call the service served (its audit trail)."""
        audit_log = self.service.runtime.identity.audit
        assert audit_log is not None
        assert await asyncio.to_thread(audit_log.flush)
        rows: Any = self.service.redis.xrange(audit.LOG_KEY)
        calls: dict[str, list[str]] = {}
        for _, fields in rows:
            event = AuditEvent.from_canonical(fields[b"e"])
            if event.method.endswith("/ImportBlock"):
                found = next(part for part in event.target.split(",") if part.startswith("block="))
                calls.setdefault(found.removeprefix("block="), []).append(event.outcome)
        return calls


@asynccontextmanager
async def allocation_cli(redis_env: dict[str, str], tmp_path: Path, **settings: str) -> AsyncIterator[AllocationCli]:
    """`async with allocation_cli(redis_env, tmp_path) as a:` the service up (with `settings`, e.g.
    NUMPROTECT_MAX_INFLIGHT_CALLS="1") and a context file naming it."""
    async with running_service("allocation", build, {**redis_env, **settings}) as svc:
        token = write_secret(tmp_path / "operator.token", svc.token(Role.OPERATOR))
        config = tmp_path / "numprotect.yaml"
        created = await run_cli(
            config,
            "config",
            "set-context",
            "operator",
            f"--allocation={svc.address}",
            f"--ca-file={test_pki().ca_file}",
            f"--token-file={token}",
            "--use",
        )
        assert created.exit_code == 0, created.stderr
        yield AllocationCli(
            svc,
            config,
            token,
            allocation_pb2_grpc.AllocationServiceStub(svc.channel_with(svc.token(Role.OPERATOR))),
            allocation_pb2_grpc.AllocationServiceStub(svc.channel_as(Role.SERVICE, "binding")),
        )


def write_csv(path: Path, rows: Sequence[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path
