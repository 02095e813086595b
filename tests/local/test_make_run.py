"""`make run`'s launcher: Redis with AOF + the six services SERVING (sip answering SIP), then a clean stop on
SIGTERM."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from numprotect.cli.contexts import SERVICES as CLI_SERVICES
from numprotect.core.settings import server_port_variable
from support.grpcurl import run_grpcurl, run_grpcurl_plaintext
from support.launcher import LAUNCHER, SERVICES, launch, launcher_env
from support.processes import ROOT
from support.redis_server import free_port
from support.sip_client import SipClient


def test_run_brings_everything_up_and_stops_cleanly(tmp_path: Path) -> None:
    env = launcher_env(tmp_path, NUMPROTECT_TRANSLATION_PROCESSES="2", NUMPROTECT_LOCAL_REDIS_FSYNC="always")
    launched = launch(env)
    process, lines, ready, reader = launched.process, launched.lines, launched.ready, launched.reader
    try:
        assert ready.wait(90), "".join(lines)
        output = "".join(lines)
        assert "translation 127.0.0.1:" in output and "(2 process(es))" in output
        assert "appendfsync always" in output
        # Each process its own /metrics port, listed in the ready output: the second translation process the 4th.
        first = int(env["NUMPROTECT_LOCAL_METRICS_PORT"])
        second_translation = f"http://127.0.0.1:{first + 3}/metrics"
        assert f"translation-1 metrics: {second_translation}" in output
        assert output.count(" metrics: http://127.0.0.1:") == len(SERVICES) + 1
        with urllib.request.urlopen(second_translation, timeout=5) as scraped:
            assert 'numprotect_build_info{service="translation",version=' in scraped.read().decode()
        # TLS on every port with the local CA made on first run: clients trust .run/dev/ca.pem, plaintext fails.
        ca = tmp_path / "dev" / "ca.pem"
        assert f"clients trust {ca}" in output
        assert (tmp_path / "dev" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
        # An operator key made on first run, private; grpcurl needs one for reflection (health itself is open).
        operator = tmp_path / "dev" / "operator.token"
        assert operator.stat().st_mode & 0o777 == 0o600 and operator.read_text().startswith("npk_")
        assert (tmp_path / "dev" / "auth.key").stat().st_mode & 0o777 == 0o600
        bearer = ("-H", f"authorization: Bearer {operator.read_text().strip()}")
        for name in SERVICES:
            address = f"127.0.0.1:{env[server_port_variable(name)]}"
            check = run_grpcurl(*bearer, "-d", '{"service":""}', address, "grpc.health.v1.Health/Check", ca_file=ca)
            assert '"status": "SERVING"' in check.stdout, check.stderr
            anonymous = run_grpcurl(address, "list", ca_file=ca)
            assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr
            plaintext = run_grpcurl_plaintext("-connect-timeout", "2", address, "list")
            assert plaintext.returncode != 0
        assert f"-cacert {ca}" in output and "-plaintext" not in output and "CreateApiKey" in output
        _sip_answers_as_carrier_cm(tmp_path, env, output)
        _walk_through_works_as_written(tmp_path, env)
        # Redis with the ACL users (numprotect.core.redis_acl): the default user is off.
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=int(env["NUMPROTECT_LOCAL_REDIS_PORT"])).ping()
    finally:
        process.send_signal(signal.SIGTERM)
        # A second SIGTERM while it stops (what `kill -TERM -<pgid>` of `make run` delivers: make forwards its
        # own) must not cut the shutdown short.
        deadline = time.monotonic() + 10
        while not any(line.startswith("stopping") for line in lines) and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        reader.join(timeout=5)
    assert code == 0, "".join(lines)
    assert "stopped." in "".join(lines)
    assert "Traceback" not in "".join(lines)
    assert (tmp_path / "redis" / "appendonlydir").is_dir()  # AOF on
    # One page-token key for every process, kept private in the run directory; no process drew its own.
    key = tmp_path / "page-token.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text().strip()) >= 44
    for log in (tmp_path / "logs").glob("*-*.log"):
        assert "NUMPROTECT_PAGE_TOKEN_KEY is not set" not in log.read_text(), log.name
        assert "NoPermissionError" not in log.read_text(), log.name  # each service's Redis user suffices
    # Each Redis user's password private in .run/dev; each service connected as its own user.
    for user in (*SERVICES, "admin"):
        assert (tmp_path / "dev" / f"redis-numprotect-{user}.password").stat().st_mode & 0o777 == 0o600
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", f"--port {env['NUMPROTECT_LOCAL_REDIS_PORT']}"], capture_output=True)
    assert left.stdout == b""


def _sip_answers_as_carrier_cm(run_dir: Path, env: dict[str, str], output: str) -> None:
    """The ready message's SIP line, the adapter's carrier key made private in .run/dev, and the adapter itself:
    OPTIONS (a trunk's keep-alive) over UDP answered 200 once its TranslateStreams are up."""
    port = env["NUMPROTECT_SIP_PORT"]
    assert f"  sip: udp+tcp 127.0.0.1:{port} (a carrier trunk points here: docs/sip.md;" in output, output
    assert "302s send calls to 127.0.0.1:5070, carrier cm)" in output, output
    token = run_dir / "dev" / "sip.token"
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text().startswith("npk_")
    with SipClient(int(port)) as sip:
        deadline = time.monotonic() + 20
        while True:
            branch = f"z9hG4bK-make-run-{time.monotonic_ns()}"
            answer = sip.request("OPTIONS", "", caller="probe", call_id=f"{branch}@127.0.0.1", branch=branch)
            if answer.status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # 503 until a TranslateStream is up
    assert answer.status == 200, answer.text
    assert answer.header("Allow") == "INVITE, ACK, CANCEL, OPTIONS", answer.text


@pytest.mark.parametrize("busy", ["NUMPROTECT_BINDING_PORT", "NUMPROTECT_LOCAL_REDIS_PORT", "NUMPROTECT_SIP_PORT"])
def test_a_busy_port_gets_a_one_line_explanation(tmp_path: Path, busy: str) -> None:
    env = launcher_env(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env[busy])))
        holder.listen()
        result = subprocess.run(
            [sys.executable, str(LAUNCHER)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "is busy (another `make run`" in result.stderr and f"): stop it or set {busy}" in result.stderr


def _walk_through_works_as_written(run_dir: Path, env: dict[str, str]) -> None:
    """The README's walk-through block, run by bash against this launcher: only the run folder and the ports
    differ from what the README says (its defaults: .run/ and 50051..50055)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- walkthrough:begin -->")[1].split("<!-- walkthrough:end -->")[0]
    script = block.split("```sh\n")[1].split("```")[0]
    script = script.replace(".run/", f"{run_dir}/")
    addresses = {name: f"127.0.0.1:{env[server_port_variable(name)]}" for name in SERVICES}
    for index, name in enumerate(SERVICES):
        script = script.replace(f"127.0.0.1:{50051 + index}", addresses[name])
    # The SIP adapter's port (the README's 5060).
    script = script.replace("127.0.0.1:5060", f"127.0.0.1:{env['NUMPROTECT_SIP_PORT']}")
    # /metrics: the processes' ports count up from NUMPROTECT_LOCAL_METRICS_PORT (the README's 9151), binding second.
    first_metrics_port = int(env["NUMPROTECT_LOCAL_METRICS_PORT"])
    script = script.replace("127.0.0.1:9152/metrics", f"127.0.0.1:{first_metrics_port + 1}/metrics")
    # The CLI's contexts: this launcher's ports (not the defaults --from-run-dir assumes), a config file of the test.
    ports = " ".join(f"--{name}={address}" for name, address in addresses.items() if name in CLI_SERVICES)
    script = script.replace(f"--from-run-dir {run_dir}/", f"--from-run-dir {run_dir}/ {ports}")
    # The webhook receiver the walk-through starts, and the endpoint's URL: a free port instead of the README's 8765.
    receiver_port = free_port()
    script = script.replace('("127.0.0.1", 8765)', f'("127.0.0.1", {receiver_port})')
    script = script.replace("127.0.0.1:8765", f"127.0.0.1:{receiver_port}")
    first = _run_walk_through(script, run_dir)
    _check_first_walk_through(first)
    # Pasted again into the same stack (make run keeps its Redis): it must still answer as documented, the webhook
    # too, which needs a new order (a repeated out_order_id answers the first binding and makes no event) and an
    # endpoint of its own (the first paste's would sign the receiver's first line with the first secret).
    again = _run_walk_through(script, run_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    verified = re.findall(r"^verified: binding\.created (evt_\w+) (700\d{12})$", first.stdout + again.stdout, re.M)
    assert len(verified) == 2 and verified[0][0] != verified[1][0], again.stdout + again.stderr


def _run_walk_through(script: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    # Its own session, so that whatever it leaves running (the receiver, should the script fail before its kill)
    # is stopped with it.
    walk = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "NUMPROTECT_CONFIG": str(run_dir / "cli-config.yaml")},
    )
    try:
        out, err = walk.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(walk.pid, signal.SIGKILL)
        walk.wait()
    return subprocess.CompletedProcess(walk.args, walk.returncode, out, err)


def _check_first_walk_through(result: subprocess.CompletedProcess[str]) -> None:
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"decision": "DECISION_CONNECT"' in out and '"target_number": "13900000002"' in out, out
    # The same call over SIP (SIPp as the switch): a 302 to the real number, the 700 number as the identity to show,
    # the call_ref for the CDR.
    assert "SIP/2.0 302 " in out, out
    assert re.search(r"Contact: <sip:\+?(86)?1\d{10}@127\.0\.0\.1:5070;user=phone>", out), out
    assert re.search(r"P-Asserted-Identity: <sip:\+?(86)?700\d{12}@", out), out
    assert re.search(r"X-Numprotect-Call-Ref: \S+", out), out
    assert '"numbers_added": 10000' in out and "virtual number: 700100000" in out, out
    # The two refusals: no key, and the tenant's key on an operator RPC; then the audit trail verifies.
    assert "Unauthenticated" in result.stderr, result.stderr
    assert "numprotect: PERMISSION_DENIED: the tenant role may not call LockNumber" in result.stderr, result.stderr
    assert re.search(r"│ ok\s+│ true\s+│", out) and "LockNumber" in out, out
    # The CLI's tables: the tenant's binding, its number, and the keys minted (never a token).
    assert re.search(r"order-\d{10}", out) and "IN_USE" in out and "demo orders" in out, out
    assert "npk_" not in out, out
    # Pool stats for the tenant's city, and binding's /metrics counting the one create.
    assert "DAYS_LEFT" in out and "9999" in out, out
    assert 'numprotect_bindings_created_total{mode="axb"} 1.0' in out, out
    # The tenant's webhook: binding.created of the new binding, signed with the secret the CLI printed once (the
    # standardwebhooks library verified it), delivered and recorded as such; the secret not in any listing.
    verified = re.search(r"^verified: binding\.created (evt_\w+) (700\d{12})$", out, re.M)
    assert verified is not None, out
    assert f"virtual number: {verified[2]}" in out, out
    assert f'"webhook-id": "{verified[1]}"' in out and '"http_status": 204' in out, out
    assert "order system" in out and "whsec_" not in out, out


def _launcher() -> Any:
    spec = importlib.util.spec_from_file_location("run_local", ROOT / "deploy" / "local" / "run_local.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_ready_message_shows_the_admin_cli_only_where_its_make_run_context_fits(tmp_path: Path) -> None:
    """`numprotect config set-context --from-run-dir` assumes TLS, the operator key and the default ports."""
    launcher = _launcher()
    suite = launcher.LocalSuite({"NUMPROTECT_RUN_DIR": str(tmp_path)})
    suite.tokens = {"operator": tmp_path / "dev" / "operator.token"}
    hint = suite._cli_hint()
    assert f"numprotect config set-context local --from-run-dir {tmp_path} --use" in hint
    assert "numprotect pool stats --tenant demo" in hint and "numprotect endpoints list --tenant demo" in hint
    moved = launcher.LocalSuite({"NUMPROTECT_RUN_DIR": str(tmp_path), "NUMPROTECT_BINDING_PORT": "51052"})
    moved.tokens = suite.tokens
    assert moved._cli_hint() == ""
    plaintext = launcher.LocalSuite({"NUMPROTECT_RUN_DIR": str(tmp_path), "NUMPROTECT_TLS": "off"})
    plaintext.tokens = suite.tokens
    assert plaintext._cli_hint() == ""


def test_the_cli_starts_without_the_doctors_imports() -> None:
    """The walk-through runs the CLI 14 times a paste: a command other than `doctor` must not load the checker
    (redis.asyncio and every key schema, ~0.4 s of CPU a call), which made a paste outlast its 120 s on a loaded
    host. `doctor` itself still runs it (tests/cli/test_commands.py)."""
    heavy = ("numprotect.core.doctor", "redis.asyncio")
    probe = f"import sys, numprotect.cli.main; print(sorted(m for m in sys.modules if m.startswith({heavy!r})))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout
