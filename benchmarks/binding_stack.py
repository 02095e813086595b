"""The write path's processes for a benchmark: a redis-server, one allocation and one binding service process, and
how clients reach them: plaintext with no identity checks (the default: the services' own work), or, with
NUMPROTECT_BENCH_SECURED=1, as deployed: TLS (a local dev PKI) and a bearer token checked on every call, binding
calling allocation with its service token."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis

from benchmarks.harness import free_port, process, redis_server_args, wait_redis, wait_serving
from numprotect.core.dev_pki import ensure_dev_pki
from numprotect.core.identity import api_keys
from numprotect.core.identity.api_keys import HashKey
from numprotect.core.identity.principal import Role

SECURED = os.environ.get("NUMPROTECT_BENCH_SECURED", "0") == "1"
PLAINTEXT = "plaintext, no identity checks"


@dataclass(frozen=True)
class Credentials:
    """The CA clients trust and the bearer token each principal of the bench presents."""

    ca: bytes
    tokens: dict[Role, str]


@dataclass(frozen=True)
class Stack:
    binding_address: str
    allocation_address: str
    redis: redis.Redis
    redis_port: int
    pids: dict[str, int]  # "binding", "allocation"
    credentials: Credentials | None  # None: plaintext, no tokens
    logs: dict[str, Path] = field(default_factory=dict)  # the services' logs (JSON lines), by name
    log_starts: dict[str, int] = field(default_factory=dict)  # their sizes once the services were ready

    def log_summary(self, most: int = 5) -> list[str]:
        """What each service logged at WARNING and above since it was ready: counts by level and message (a
        message's first 160 characters), most frequent first."""
        lines = []
        for name, path in self.logs.items():
            with path.open("rb") as log:
                log.seek(self.log_starts.get(name, 0))
                text = log.read().decode(errors="replace")
            counts: Counter[str] = Counter()
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                    counts[f"{entry.get('level', '?')} {str(entry.get('msg', ''))[:160]}"] += 1
                except (ValueError, AttributeError):  # not JSON (a traceback printed by the runtime)
                    counts[f"(not JSON) {line[:160]}"] += 1
            lines += [f"{name}: {n} x {message}" for message, n in counts.most_common(most)]
        return lines

    @property
    def security(self) -> str:
        if self.credentials is None:
            return PLAINTEXT
        return "TLS, bearer token checked on every call (binding -> allocation too)"

    def channel(self, address: str, role: Role) -> grpc.aio.Channel:
        """A channel whose calls act as `role` (ignored in plaintext, where the services check nobody)."""
        if self.credentials is None:
            return grpc.aio.insecure_channel(address)
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=self.credentials.ca),
            grpc.access_token_call_credentials(self.credentials.tokens[role]),
        )
        return grpc.aio.secure_channel(address, credentials)


def _secure(workdir: Path, client: redis.Redis, tenant: str) -> tuple[dict[str, str], dict[str, str], Credentials]:
    """Settings of both services, binding's own, and the clients' credentials: a dev PKI, an auth key, tokens minted
    in Redis before the services start (they load the keys at start)."""
    pki = ensure_dev_pki(workdir / "pki")
    key_file = workdir / "auth.key"
    key_file.write_text(HashKey.random().encode())
    key_file.chmod(0o600)
    hash_key = HashKey.from_file("NUMPROTECT_AUTH_KEY_FILE", str(key_file))

    def mint(role: Role, principal: str) -> str:
        _, token = api_keys.mint_sync(
            client, hash_key, role, principal, description="bench", now_ms=time.time_ns() // 1_000_000
        )
        return token

    token_file = workdir / "binding.token"
    token_file.write_text(mint(Role.SERVICE, "binding"))
    token_file.chmod(0o600)
    tokens = {Role.OPERATOR: mint(Role.OPERATOR, "bench"), Role.TENANT: mint(Role.TENANT, tenant)}
    common = {**pki.tls_env(), "NUMPROTECT_AUTH_KEY_FILE": str(key_file)}
    return common, {"NUMPROTECT_SERVICE_TOKEN_FILE": str(token_file)}, Credentials(pki.ca_file.read_bytes(), tokens)


def run_stack(bench: Callable[[Stack], Coroutine[Any, Any, None]], *, tenant: str) -> int:
    """Runs `bench(stack)` on uvloop against the processes, all stopped afterwards; `tenant` is the one the bench's
    tenant token acts for when secured."""
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        print("redis-server not found: run `make system-deps`", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="numprotect-bench-binding-"))
    redis_port, allocation_port, binding_port = free_port(), free_port(), free_port()
    common = {
        **os.environ,
        "NUMPROTECT_TLS": "off",
        "NUMPROTECT_AUTH": "off",
        "NUMPROTECT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "NUMPROTECT_LOG_LEVEL": "WARNING",
        "NUMPROTECT_ALLOCATION_PORT": str(allocation_port),
        "NUMPROTECT_BINDING_PORT": str(binding_port),
        "NUMPROTECT_ALLOCATION_ADDR": f"127.0.0.1:{allocation_port}",
    }
    redis_args = redis_server_args(redis_binary, redis_port, workdir, "--appendonly", "no")
    try:
        with process(redis_args, common, workdir / "redis.log"):
            redis_client = wait_redis(redis_port)
            binding_only: dict[str, str] = {}
            credentials = None
            if SECURED:
                secure_env, binding_only, credentials = _secure(workdir, redis_client, tenant)
                del common["NUMPROTECT_AUTH"]
                common.update(secure_env)
            allocation_env, binding_env = dict(common), {**common, **binding_only}
            ready = {"allocation": f"127.0.0.1:{allocation_port}", "binding": f"127.0.0.1:{binding_port}"}
            if SECURED:  # readiness asked on a plaintext health-only port (a second server: only when needed)
                for name, env in (("allocation", allocation_env), ("binding", binding_env)):
                    health_port = free_port()
                    env["NUMPROTECT_HEALTH_PORT"] = str(health_port)
                    ready[name] = f"127.0.0.1:{health_port}"
            allocation_log, binding_log = workdir / "allocation.log", workdir / "binding.log"
            with process(
                [sys.executable, "-m", "numprotect.services.allocation"], allocation_env, allocation_log
            ) as allocation:
                wait_serving(ready["allocation"], allocation, allocation_log)
                with process(
                    [sys.executable, "-m", "numprotect.services.binding"], binding_env, binding_log
                ) as binding:
                    wait_serving(ready["binding"], binding, binding_log)
                    try:
                        import uvloop

                        uvloop.install()
                    except ImportError:  # pragma: no cover
                        pass
                    logs = {"binding": binding_log, "allocation": allocation_log}
                    stack = Stack(
                        f"127.0.0.1:{binding_port}",
                        f"127.0.0.1:{allocation_port}",
                        redis_client,
                        redis_port,
                        {"binding": binding.pid, "allocation": allocation.pid},
                        credentials,
                        logs,
                        {name: path.stat().st_size for name, path in logs.items()},
                    )
                    try:
                        asyncio.run(bench(stack))
                    except BaseException:
                        for log in (allocation_log, binding_log):  # why, before the workdir goes
                            print(f"--- {log.name} (last lines)\n{log.read_text()[-3000:]}", file=sys.stderr)
                        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
