"""The console script as a process: `cdrs watch` prints records as they arrive and, on Ctrl-C, exits 0 with the
cursor to resume from; and a context with a client certificate reaches a service that requires mTLS."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.dev_pki import ensure_dev_pki
from numprotect.core.identity.principal import Role
from numprotect.services.allocation.app import build as build_allocation
from support.inprocess import running_service
from support.tls import test_pki

from .conftest import TENANT, StackFactory, cdr_record, run_cli, write_secret

CONSOLE_SCRIPT = Path(sys.executable).parent / "numprotect"


async def _line(stream: asyncio.StreamReader) -> str:
    return (await asyncio.wait_for(stream.readline(), 20)).decode()


@contextmanager
def _interruptible_children() -> Iterator[None]:
    """Children started inside get SIGINT as a terminal's foreground command has it. A suite started in the
    background (`make test &` from a script) ignores SIGINT; a child inherits an ignored signal (exec resets only
    handled ones) and Python then installs no KeyboardInterrupt. Set here, in the parent, not in the child by a
    preexec_fn: Python code between fork and exec in this process full of gRPC threads ran gRPC's fork handlers,
    whose poller thread in the child then found its epoll fd closed by close_fds and aborted the child (exit -6,
    'epoll_wait error: Bad file descriptor'); without a preexec_fn the child is spawned (vfork) with no handlers."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


async def test_watch_prints_records_as_they_arrive_and_stops_on_ctrl_c(stack: StackFactory) -> None:
    async with stack() as s:
        binding = await s.create_binding("order-watch")
        with _interruptible_children():
            process = await asyncio.create_subprocess_exec(
                str(CONSOLE_SCRIPT),
                "--config",
                str(s.config),
                "cdrs",
                "watch",
                f"--tenant={TENANT}",
                "-o",
                "json",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        assert process.stdout is not None and process.stderr is not None
        try:

            async def ingest(call_id: str) -> None:
                record = cdr_record(call_id, binding.virtual_number, binding.binding_id)
                await s.cdr_stub.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[record]))

            # The watch starts from "now", once the process is up: send records until the first shows up ...
            first_line = asyncio.ensure_future(process.stdout.readline())
            for attempt in range(30):
                await ingest(f"early-{attempt}")
                if (await asyncio.wait({first_line}, timeout=1))[0]:
                    break
            first = first_line.result() if first_line.done() else b""
            if not first:  # the watch ended (or printed nothing in 30 s): why is on its stderr
                if process.returncode is None:
                    process.kill()
                stderr = (await process.stderr.read()).decode()
                raise AssertionError(f"no record printed (exit status {await process.wait()}); stderr: {stderr!r}")
            arrived = [json.loads(first)]
            # ... then one more, printed as it arrives.
            await ingest("live")
            while arrived[-1]["record"]["call_id"] != "live":
                arrived.append(json.loads(await _line(process.stdout)))
            process.send_signal(signal.SIGINT)
            status = await asyncio.wait_for(process.wait(), 20)
            stderr = (await process.stderr.read()).decode()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert arrived[0]["record"]["call_id"].startswith("early-")
    assert arrived[0]["record"]["binding_id"] == binding.binding_id
    assert status == 0, stderr
    assert stderr == f"{len(arrived)} record(s); resume with --cursor {arrived[-1]['cursor']}\n"


async def test_a_client_certificate_reaches_a_service_that_requires_mtls(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    client = test_pki().issue("operator-cli", "spiffe://numprotect/operator/cli", tmp_path / "client")
    environ = {**redis_env, "NUMPROTECT_TLS_CLIENT_AUTH": "require"}
    async with running_service("allocation", build_allocation, environ) as allocation:
        token = write_secret(tmp_path / "operator.token", allocation.token(Role.OPERATOR))
        config = tmp_path / "config.yaml"
        common = [f"--allocation={allocation.address}", f"--ca-file={test_pki().ca_file}", f"--token-file={token}"]
        certificate = [f"--cert-file={client.cert_file}", f"--key-file={client.key_file}"]
        for name, extra in (("mtls", certificate), ("no-cert", [])):
            made = await run_cli(config, "config", "set-context", name, *common, *extra)
            assert made.exit_code == 0, made.stderr
        with_cert: Any = await run_cli(config, "--context=mtls", "keys", "list", "-o", "json")
        without = await run_cli(config, "--context=no-cert", "--timeout=3", "keys", "list")
    assert with_cert.exit_code == 0, with_cert.stderr
    assert with_cert.json()["keys"]  # at least the operator's own key
    assert without.exit_code == 14 and without.stderr.startswith("numprotect: UNAVAILABLE: ")


async def test_a_ca_that_does_not_verify_the_server_is_one_line_and_a_ca_file_without_a_certificate_is_78(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    other_ca = ensure_dev_pki(tmp_path / "other-pki").ca_file
    not_pem = write_secret(tmp_path / "not-a-ca.pem", "garbage")
    async with running_service("allocation", build_allocation, redis_env) as allocation:
        token = write_secret(tmp_path / "operator.token", allocation.token(Role.OPERATOR))
        config = tmp_path / "config.yaml"
        for name, ca_file in (("other-ca", other_ca), ("not-pem", not_pem)):
            made = await run_cli(
                config, "config", "set-context", name, f"--allocation={allocation.address}",
                f"--ca-file={ca_file}", f"--token-file={token}",
            )  # fmt: skip
            assert made.exit_code == 0, made.stderr
        # The console script as a process: gRPC's C core writes its own log lines to the process's stderr.
        results: dict[str, tuple[int | None, str]] = {}
        for name in ("other-ca", "not-pem"):
            process = await asyncio.create_subprocess_exec(
                str(CONSOLE_SCRIPT), "--config", str(config), "--context", name, "--timeout=3", "keys", "list",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, errors = await asyncio.wait_for(process.communicate(), 30)
            results[name] = (process.returncode, errors.decode())
    status, stderr = results["other-ca"]
    assert status == 14
    (line,) = stderr.splitlines()
    assert line.startswith("numprotect: UNAVAILABLE: ") and "CERTIFICATE_VERIFY_FAILED" in line
    status, stderr = results["not-pem"]
    assert status == 78
    assert stderr == f"numprotect: context 'not-pem': ca-file {not_pem}: no PEM certificate in it\n"
