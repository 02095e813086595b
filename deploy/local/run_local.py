"""`make run`: a local Redis (AOF on) and the six services on localhost, in the foreground.

Settings (environment):
  NUMPROTECT_REDIS_URL            use this Redis and start none (NUMPROTECT_REDIS_MODE=cluster for a cluster)
  NUMPROTECT_LOCAL_REDIS_PORT     port of the Redis started here (default 6379); data under .run/redis
  NUMPROTECT_LOCAL_REDIS_FSYNC    appendfsync of that Redis: everysec (default) or always (docs/cdr.md)
  NUMPROTECT_<SERVICE>_PORT       gRPC ports (defaults 50051..50056; sip's is NUMPROTECT_SIP_GRPC_PORT, 50056)
  NUMPROTECT_<SERVICE>_PROCESSES  processes per service sharing its port via SO_REUSEPORT (default 1; sip: 1 only,
                                  its SIP transactions live in one process)
  NUMPROTECT_LOCAL_METRICS_PORT   the first /metrics port (default 9151): every process gets its own, in order
                                  allocation, binding, translation, cdr, events, sip (a service's processes get
                                  successive ports); the ready message lists them. NUMPROTECT_METRICS=off: none
  NUMPROTECT_RUN_DIR              where Redis data and logs go (default .run, git-ignored)
  NUMPROTECT_RUN_PROMETHEUS       1 (`make run PROMETHEUS=1`): also Debian's Prometheus, scraping every process's
                                  /metrics with the rules of deploy/prometheus/rules (deploy/local/local_prometheus.py);
                                  data under <run dir>/prometheus. Default 0
  NUMPROTECT_LOCAL_PROMETHEUS_PORT  its web port on 127.0.0.1 (default 9090)
  NUMPROTECT_TLS                  on (default): every service serves TLS with the local CA's server certificate,
                                  made on first run in .run/dev/ (ca.pem is what a client trusts); off: plaintext
  NUMPROTECT_AUTH                 on (default): every call but health needs an API key; the auth key, an operator
                                  token (.run/dev/operator.token) and binding's service token are made here
  NUMPROTECT_EVENTS_ALLOWED_NETWORKS, NUMPROTECT_EVENTS_ALLOW_HTTP
                                  127.0.0.0/8 and on here (the service's defaults: none, off), so webhooks reach a
                                  receiver on this host over http:// (the README's walk-through); set them to
                                  change that
  NUMPROTECT_SIP_HOST, NUMPROTECT_SIP_PORT, NUMPROTECT_SIP_EGRESS
                                  the SIP adapter (docs/sip.md): UDP and TCP on 127.0.0.1:5060, its 302s pointing
                                  calls at 127.0.0.1:5070 (a local switch or SIPp), unless set; it asks translation
                                  as carrier `cm` with the key made here (.run/dev/sip.token)
Ctrl-C or SIGTERM stops the services (they drain), then Redis.

The Redis started here has the ACL users of numprotect.core.redis_acl (the default user off): each service connects
as its own user, with a random password kept in .run/dev/redis-<user>.password (mode 600, made on first run) that
it reads through NUMPROTECT_REDIS_PASSWORD_FILE; `redis-cli --user numprotect-admin --pass "$(cat
.run/dev/redis-numprotect-admin.password)"` for a look inside.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.core.dev_pki import ensure_dev_pki
from numprotect.core.identity.local_keys import LOCAL_SIP_CARRIER, ensure_auth_key, ensure_dev_tokens, write_private
from numprotect.core.redis_acl import ACL_USERS, ADMIN_USER, SERVICE_USERS, parse_redis_version, render_acl_file
from numprotect.core.redis_client import create_sync_redis
from numprotect.core.settings import (
    DEFAULT_PORTS,
    SERVICE_NAMES,
    Env,
    RedisSettings,
    SettingsError,
    server_env_prefix,
    server_port_variable,
)

ROOT = Path(__file__).resolve().parents[2]
# The first process's /metrics port; the others follow (docs/operations.md "Metrics").
DEFAULT_METRICS_PORT = 9151
# Webhooks to a receiver on this machine, over plain http (events refuses loopback and http:// by default);
# the operator's own values win.
LOCAL_EVENTS_SETTINGS = {"NUMPROTECT_EVENTS_ALLOWED_NETWORKS": "127.0.0.0/8", "NUMPROTECT_EVENTS_ALLOW_HTTP": "on"}
# The SIP adapter's listeners and the switch its 302s send calls to (docs/sip.md); the operator's own values win.
LOCAL_SIP_HOST = "127.0.0.1"
LOCAL_SIP_PORT = 5060
LOCAL_SIP_EGRESS = "127.0.0.1:5070"


class LaunchError(Exception):
    """Something the operator must fix; str() is the one line shown."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


def port_is_busy(port: int, host: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class LocalSuite:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = dict(environ)
        env = Env(environ)
        self.external_redis = env.raw("NUMPROTECT_REDIS_URL")
        self.redis_port = env.integer("NUMPROTECT_LOCAL_REDIS_PORT", 6379, minimum=1, maximum=65535)
        self.redis_fsync = env.choice("NUMPROTECT_LOCAL_REDIS_FSYNC", "everysec", ("everysec", "always"))
        self.ports = {
            name: env.integer(server_port_variable(name), DEFAULT_PORTS[name], minimum=1, maximum=65535)
            for name in SERVICE_NAMES
        }
        self.processes = {
            name: env.integer(f"NUMPROTECT_{name.upper()}_PROCESSES", 1, minimum=1, maximum=1 if name == "sip" else 64)
            for name in SERVICE_NAMES
        }
        self.sip_host = env.text("NUMPROTECT_SIP_HOST", LOCAL_SIP_HOST)
        self.sip_port = env.integer("NUMPROTECT_SIP_PORT", LOCAL_SIP_PORT, minimum=1, maximum=65535)
        self.sip_egress = env.text("NUMPROTECT_SIP_EGRESS", LOCAL_SIP_EGRESS)
        self.metrics = env.choice("NUMPROTECT_METRICS", "on", ("on", "off")) == "on"
        first_metrics_port = env.integer(
            "NUMPROTECT_LOCAL_METRICS_PORT", DEFAULT_METRICS_PORT, minimum=1, maximum=65000
        )
        # One /metrics port per process ("allocation-0" -> 9151, ...): processes sharing a gRPC port still each
        # serve their own registry, and Prometheus scrapes each (deploy/local/local_prometheus.py reads these).
        names = [f"{name}-{index}" for name in SERVICE_NAMES for index in range(self.processes[name])]
        self.metrics_ports = (
            {child: first_metrics_port + offset for offset, child in enumerate(names)} if self.metrics else {}
        )
        self.run_dir = Path(env.text("NUMPROTECT_RUN_DIR", str(ROOT / ".run"))).resolve()
        self.prometheus = env.choice("NUMPROTECT_RUN_PROMETHEUS", "0", ("0", "1")) == "1"
        self.prometheus_port = env.integer("NUMPROTECT_LOCAL_PROMETHEUS_PORT", 9090, minimum=1, maximum=65535)
        self.children: list[Child] = []
        self.redis: Child | None = None
        self.redis_passwords: dict[str, Path] = {}  # ACL user -> its password file (the Redis started here)
        self.stopping = False
        # NUMPROTECT_TLS=off opts out; certificate files of the operator's own (NUMPROTECT_TLS_CERT_FILE...) win.
        self.tls = env.choice("NUMPROTECT_TLS", "on", ("on", "off")) == "on"
        self.ca_file = Path(env.text("NUMPROTECT_TLS_CA_FILE", str(self.run_dir / "dev" / "ca.pem")))
        # NUMPROTECT_AUTH=off only for benchmark-like experiments; an operator's own key file wins.
        self.auth = env.choice("NUMPROTECT_AUTH", "on", ("on", "off")) == "on"
        self.dev_dir = self.run_dir / "dev"
        self.tokens: dict[str, Path] = {}

    def auth_env(self) -> dict[str, str]:
        """Every service's NUMPROTECT_AUTH_KEY_FILE: the operator's, else .run/dev/auth.key (made once)."""
        if not self.auth or "NUMPROTECT_AUTH_KEY_FILE" in self.environ:
            return {}
        return {"NUMPROTECT_AUTH_KEY_FILE": str(ensure_auth_key(self.dev_dir))}

    def mint_tokens(self) -> None:
        """The operator's token and binding's service token, minted in Redis as the admin user (reused across
        runs while Redis still holds them as active)."""
        if not self.auth or "NUMPROTECT_AUTH_KEY_FILE" in self.environ:
            return
        admin = {"NUMPROTECT_REDIS_URL": self.redis_url()}
        if self.redis_passwords:
            admin |= {
                "NUMPROTECT_REDIS_USERNAME": ADMIN_USER,
                "NUMPROTECT_REDIS_PASSWORD_FILE": str(self.redis_passwords[ADMIN_USER]),
            }
        client = create_sync_redis(RedisSettings.from_env(Env({**self.environ, **admin})), max_connections=1)
        try:
            self.tokens = ensure_dev_tokens(client, self.dev_dir)
        finally:
            client.close()

    def service_token_env(self, service: str) -> dict[str, str]:
        """The credential of a service that calls another: binding's at allocation, sip's (carrier) at translation."""
        token = self.tokens.get(service)
        return {"NUMPROTECT_SERVICE_TOKEN_FILE": str(token)} if token is not None else {}

    def tls_env(self) -> dict[str, str]:
        """The services' TLS settings: the local PKI of .run/dev/ (made on first run; a server certificate near its
        end is issued again), unless TLS is off or the operator named certificate files."""
        if not self.tls or "NUMPROTECT_TLS_CERT_FILE" in self.environ:
            return {}
        return ensure_dev_pki(self.ca_file.parent).tls_env()

    def health_channel(self, address: str) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(self.ca_file.read_bytes()))

    def redis_url(self) -> str:
        return self.external_redis or f"redis://127.0.0.1:{self.redis_port}/0"

    def check_ports(self) -> None:
        wanted = dict(self.ports)
        if not self.external_redis:
            wanted["redis"] = self.redis_port
        if self.prometheus:
            # Before anything starts: what the local Prometheus needs.
            if not self.metrics_ports:
                raise LaunchError(
                    "NUMPROTECT_RUN_PROMETHEUS=1 needs the metrics ports, which NUMPROTECT_METRICS=off turns off"
                )
            if shutil.which("prometheus") is None:
                raise LaunchError("prometheus not found: run `make system-deps` (Debian package prometheus)")
            wanted["prometheus"] = self.prometheus_port
        for name, port in wanted.items():
            if port_is_busy(port):
                var = {"redis": "NUMPROTECT_LOCAL_REDIS_PORT", "prometheus": "NUMPROTECT_LOCAL_PROMETHEUS_PORT"}.get(
                    name, server_port_variable(name)
                )
                raise LaunchError(f"port {port} for {name} is busy (another `make run`?): stop it or set {var}")
        # The SIP listeners: both transports on the one port (a carrier's trunk may use either).
        for kind, transport in ((socket.SOCK_DGRAM, "udp"), (socket.SOCK_STREAM, "tcp")):
            if port_is_busy(self.sip_port, self.sip_host, kind):
                raise LaunchError(
                    f"port {self.sip_port}/{transport} on {self.sip_host} for sip is busy (another `make run`, a SIP "
                    "server?): stop it or set NUMPROTECT_SIP_PORT"
                )
        for child, port in self.metrics_ports.items():
            if port_is_busy(port):
                raise LaunchError(
                    f"metrics port {port} for {child} is busy (another `make run`?): stop it or set "
                    "NUMPROTECT_LOCAL_METRICS_PORT (the first of consecutive ports) or NUMPROTECT_METRICS=off"
                )

    def start_redis(self) -> None:
        if self.external_redis:
            print(f"using Redis at {self.external_redis} (NUMPROTECT_REDIS_URL)")
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise LaunchError("redis-server not found: run `make system-deps` (Debian package redis-server)")
        data = self.run_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / "logs" / "redis.log"
        acl = self.write_redis_acl(binary, data)
        args = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(data)]
        args += ["--aclfile", str(acl)]  # the users of numprotect.core.redis_acl, the default user off
        # AOF; everysec puts about a second of acknowledged writes at risk on a crash, always none (docs/cdr.md).
        args += ["--appendonly", "yes", "--appendfsync", self.redis_fsync, "--save", "", "--loglevel", "notice"]
        with log.open("ab") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.redis = Child("redis", process, log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise LaunchError(f"redis-server exited with {process.returncode}: see {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2) as conn:
                    conn.sendall(f"AUTH {ADMIN_USER} {self.redis_password(ADMIN_USER)}\r\nPING\r\n".encode())
                    if _read_replies(conn, 2) == b"+OK\r\n+PONG\r\n":
                        aof = f"AOF on, appendfsync {self.redis_fsync}"
                        print(f"redis       127.0.0.1:{self.redis_port}  ({aof}, data in {data})")
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise LaunchError(f"redis-server did not answer on port {self.redis_port}: see {log}")

    def redis_password(self, user: str) -> str:
        return self.redis_passwords[user].read_text().strip()

    def write_redis_acl(self, binary: str, data: Path) -> Path:
        """The ACL file of the local Redis (rewritten each start from the table), each user's password kept in
        .run/dev/redis-<user>.password (mode 600; made once, so a restart keeps them)."""
        dev = self.run_dir / "dev"
        dev.mkdir(parents=True, exist_ok=True)
        for user in ACL_USERS:
            path = dev / f"redis-{user.name}.password"
            if not path.exists():
                write_private(path, secrets.token_hex(24))
            self.redis_passwords[user.name] = path
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
        acl = data / "users.acl"
        passwords = {user: self.redis_password(user) for user in self.redis_passwords}
        write_private(acl, render_acl_file(passwords, redis_version=parse_redis_version(version)))
        return acl

    def redis_user_env(self, service: str) -> dict[str, str]:
        """The service's own Redis user and password file (none for an external Redis: its settings are the
        operator's, NUMPROTECT_REDIS_USERNAME/PASSWORD_FILE passed through)."""
        if not self.redis_passwords:
            return {}
        user = SERVICE_USERS[service]
        return {"NUMPROTECT_REDIS_USERNAME": user, "NUMPROTECT_REDIS_PASSWORD_FILE": str(self.redis_passwords[user])}

    def page_token_key(self) -> dict[str, str]:
        """One page-token key for every process (NUMPROTECT_PAGE_TOKEN_KEY), kept in the run directory, so a
        listing's next page works on whichever process of the service answers it and across restarts."""
        if "NUMPROTECT_PAGE_TOKEN_KEY" in self.environ:
            return {}
        path = self.run_dir / "page-token.key"
        if not path.exists():
            write_private(path, base64.b64encode(secrets.token_bytes(32)).decode())
        return {"NUMPROTECT_PAGE_TOKEN_KEY": path.read_text().strip()}

    def start_services(self) -> None:
        peers = {f"NUMPROTECT_{n.upper()}_ADDR": f"127.0.0.1:{p}" for n, p in self.ports.items()}
        key = self.page_token_key()
        tls = self.tls_env()
        auth = self.auth_env()
        self.mint_tokens()
        for name in SERVICE_NAMES:
            count = self.processes[name]
            env = {
                **(LOCAL_EVENTS_SETTINGS if name == "events" else {}),
                **(self.sip_env() if name == "sip" else {}),
                **self.environ,
                **peers,
                **key,
                **tls,
                **auth,
                **self.service_token_env(name),
                "NUMPROTECT_REDIS_URL": self.redis_url(),
                **self.redis_user_env(name),
                server_port_variable(name): str(self.ports[name]),
            }
            if count > 1:
                env[f"{server_env_prefix(name)}_REUSE_PORT"] = "1"
            for index in range(count):
                log = self.run_dir / "logs" / f"{name}-{index}.log"
                metrics = self.metrics_ports.get(f"{name}-{index}")
                process_env = {**env, "NUMPROTECT_METRICS_PORT": str(metrics)} if metrics is not None else env
                with log.open("ab") as out:
                    process = subprocess.Popen(
                        [sys.executable, "-m", f"numprotect.services.{name}"],
                        cwd=ROOT,
                        env=process_env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                self.children.append(Child(f"{name}-{index}", process, log))

    def sip_env(self) -> dict[str, str]:
        """The SIP adapter's listeners and egress as checked at start (the operator's values, else the local ones)."""
        return {
            "NUMPROTECT_SIP_HOST": self.sip_host,
            "NUMPROTECT_SIP_PORT": str(self.sip_port),
            "NUMPROTECT_SIP_EGRESS": self.sip_egress,
        }

    def sip_line(self) -> str:
        """The ready message's SIP line: where a carrier's trunk points, and as which carrier the adapter asks."""
        carrier = f", carrier {LOCAL_SIP_CARRIER}" if "sip" in self.tokens else ""
        return (
            f"  sip: udp+tcp {self.sip_host}:{self.sip_port} (a carrier trunk points here: docs/sip.md; "
            f"302s send calls to {self.sip_egress}{carrier})\n"
        )

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name in SERVICE_NAMES:
            address = f"127.0.0.1:{self.ports[name]}"
            with self.health_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    self.check_children()
                    try:
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise LaunchError(
                            f"{name} not SERVING on {address} after {timeout:.0f}s: see {self.run_dir / 'logs'}"
                        )
                    time.sleep(0.1)
            print(f"{name:<12}{address}  SERVING  ({self.processes[name]} process(es))")
            for index in range(self.processes[name]):
                port = self.metrics_ports.get(f"{name}-{index}")
                if port is not None:
                    print(f"{'':<12}{name}-{index} metrics: http://127.0.0.1:{port}/metrics")

    def start_prometheus(self, timeout: float = 30.0) -> None:
        """NUMPROTECT_RUN_PROMETHEUS=1: Debian's Prometheus scraping each process's metrics port, the rules loaded
        (deploy/local/local_prometheus.py writes its configuration and becomes it: stopped like any child)."""
        if not self.prometheus:
            return
        address = f"127.0.0.1:{self.prometheus_port}"
        data = self.run_dir / "prometheus"
        targets = [f"--target={child.rsplit('-', 1)[0]}=127.0.0.1:{port}" for child, port in self.metrics_ports.items()]
        command = [sys.executable, str(ROOT / "deploy" / "local" / "local_prometheus.py"), f"--data={data}"]
        log = self.run_dir / "logs" / "prometheus.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [*command, f"--listen={address}", *targets],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children.append(Child("prometheus", process, log))
        deadline = time.monotonic() + timeout
        while True:
            self.check_children()
            try:
                with urllib.request.urlopen(f"http://{address}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LaunchError(f"prometheus not ready on {address} after {timeout:.0f}s: see {log}")
            time.sleep(0.2)
        scraped = f"scraping {len(targets)} processes every 5s, rules of deploy/prometheus/rules, data in {data}"
        print(f"{'prometheus':<12}http://{address}/classic/graph  ({scraped})")

    def check_children(self) -> None:
        for child in [*self.children, *([self.redis] if self.redis else [])]:
            code = child.process.poll()
            if code is not None:
                tail = child.log.read_text(errors="replace").strip().splitlines()[-5:]
                raise LaunchError(f"{child.name} exited with {code}; last lines of {child.log}:\n" + "\n".join(tail))

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.process.kill()
        if self.redis is not None and self.redis.process.poll() is None:
            # SIGTERM makes redis-server fsync the AOF and exit cleanly.
            self.redis.process.send_signal(signal.SIGTERM)
            try:
                self.redis.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.redis.process.kill()

    def print_examples(self) -> None:
        a, b = self.ports["allocation"], self.ports["binding"]
        g = Path(sys.executable).with_name("grpcurl")
        g = g.relative_to(ROOT) if g.is_relative_to(ROOT) else g
        ca = self.ca_file.relative_to(ROOT) if self.ca_file.is_relative_to(ROOT) else self.ca_file
        # How grpcurl reaches the services: TLS trusting the local CA, or plaintext when NUMPROTECT_TLS=off.
        how = f"-cacert {ca}" if self.tls else "-plaintext"
        trust = f"TLS on every port: clients trust {ca}" if self.tls else "TLS OFF (NUMPROTECT_TLS=off): plaintext"
        operator = self.tokens.get("operator")
        if operator is not None:
            shown = operator.relative_to(ROOT) if operator.is_relative_to(ROOT) else operator
            key = f'-H "authorization: Bearer $(cat {shown})" '
            who = f"API keys required: the operator's token is in {shown} (mint others with AdminService/CreateApiKey)"
        else:
            key, who = "", "API keys: not minted here (NUMPROTECT_AUTH=off or your own NUMPROTECT_AUTH_KEY_FILE)"
        print(
            f"""
ready. {trust}. {who}. Try (the README's walk-through goes on from here):
  {g} {how} {key}127.0.0.1:{b} list
  {g} {how} {key}-d '{{"block":"70010000001","tenant_id":"demo","city_code":"010","carrier_id":"cm"}}' \\
    127.0.0.1:{a} numprotect.allocation.v1.AllocationService/ImportBlock
{self.sip_line()}{self._cli_hint()}logs: {self.run_dir / "logs"}   stop: Ctrl-C
""",
            flush=True,
        )

    def _cli_hint(self) -> str:
        """The admin CLI's first steps (docs/cli.md), when its `--from-run-dir` context fits this run: TLS, the operator
        key made here and the default ports."""
        defaults = all(self.ports[name] == DEFAULT_PORTS[name] for name in SERVICE_NAMES)
        if not (self.tls and "operator" in self.tokens and defaults):
            return ""
        cli = Path(sys.executable).with_name("numprotect")
        cli = cli.relative_to(ROOT) if cli.is_relative_to(ROOT) else cli
        run_dir = self.run_dir.relative_to(ROOT) if self.run_dir.is_relative_to(ROOT) else self.run_dir
        return (
            f"  {cli} config set-context local --from-run-dir {run_dir} --use   # the admin CLI (docs/cli.md)\n"
            f'  {cli} keys create --role tenant --tenant demo --description "demo orders"\n'
            f"  {cli} pool stats --tenant demo\n"
            f"  {cli} endpoints list --tenant demo   # webhooks: events pushed to the tenant (docs/events.md)\n"
            f"  {cli} audit verify\n"
        )


def _read_replies(conn: socket.socket, count: int) -> bytes:
    """The first `count` simple replies (lines) Redis sends on `conn`."""
    received = b""
    while received.count(b"\r\n") < count:
        chunk = conn.recv(256)
        if not chunk:
            break
        received += chunk
    return received


def main() -> int:
    suite: LocalSuite | None = None
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only the first signal stops: a second one must not cut the shutdown short and leave Redis or services
        # running (make forwards SIGTERM to its children, so `kill -TERM -<pgid>` delivers two; Ctrl-C twice).
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        suite = LocalSuite(os.environ)
        (suite.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        suite.check_ports()
        suite.start_redis()
        suite.start_services()
        suite.wait_serving()
        suite.start_prometheus()
        suite.print_examples()
        while True:
            suite.check_children()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping...", flush=True)
        return 0
    except (LaunchError, SettingsError) as exc:
        print(f"make run: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if suite is not None:
            suite.stop()
            print("stopped.", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
