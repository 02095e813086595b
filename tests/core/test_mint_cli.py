"""numprotect-mint-key against a real redis-server (standalone, or the cluster under NUMPROTECT_TEST_REDIS_MODE):
a minted token authenticates through the services' own Directory as the principal asked for, its file is mode 600,
the token shows on no output but stdout with `--out -`, and a bad option or setting is one line, exit status 2,
with nothing stored and no file made.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest

from numprotect.core.identity import api_keys
from numprotect.core.identity.api_keys import HashKey
from numprotect.core.identity.audit import AuditEvent, stream_entries, verify_redis
from numprotect.core.identity.directory import Directory
from numprotect.core.identity.mint_cli import AUDIT_METHOD, run
from numprotect.core.identity.principal import Principal, Role

ROOT = Path(__file__).resolve().parents[2]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth.key"
    path.write_text(HashKey.random().encode() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def environ(redis_env: dict[str, str], key_file: Path) -> dict[str, str]:
    return {**redis_env, "NUMPROTECT_AUTH_KEY_FILE": str(key_file)}


@pytest.fixture
def directory(key_file: Path, redis_sync: Any) -> Iterator[Directory]:
    """The services' in-memory key directory over the Redis the tool writes to."""
    yield Directory(HashKey.from_file("test", str(key_file)), redis_sync, refresh_seconds=1.0, now_ms=now_ms)


def authenticate(directory: Directory, token: str) -> Principal | None:
    directory.reload()
    return directory.authenticate(token)


@pytest.mark.parametrize(
    ("role", "principal_id"),
    [
        (Role.OPERATOR, ""),
        (Role.TENANT, "meituan"),
        (Role.CARRIER, "china-unicom"),
        (Role.REGULATOR, ""),
        (Role.SERVICE, "binding"),
    ],
)
def test_the_minted_token_authenticates_as_the_principal_asked_for(
    role: Role,
    principal_id: str,
    environ: dict[str, str],
    directory: Directory,
    key_file: Path,
    redis_sync: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "keys" / f"{role.value}.token"
    argv = ["--role", role.value, "--out", str(out), *(["--id", principal_id] if principal_id else [])]
    assert run(argv, environ) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    token = out.read_text().strip()
    principal = authenticate(directory, token)
    assert principal is not None
    assert (principal.role, principal.id) == (role, principal_id)
    # The token is in the file only: not on stdout, not on stderr (which names the key id and who it is for).
    captured = capsys.readouterr()
    assert captured.out == ""
    assert token not in captured.err
    assert secret_part(token) not in captured.err
    assert f"key {principal.key_id} for " in captured.err
    assert len(captured.err.splitlines()) == 1
    # One audit event, chained with the services' audit key.
    hash_key = HashKey.from_file("test", str(key_file))
    report = verify_redis(hash_key.derive("audit"), redis_sync)
    assert report.ok and report.events == 1, report
    ((_, fields),) = list(stream_entries(redis_sync))
    event = AuditEvent.from_canonical(fields["e"])
    assert (event.principal, event.method, event.outcome) == ("bootstrap", AUDIT_METHOD, "OK")
    assert f"key_id={principal.key_id}" in event.target and f"role={role.value}" in event.target
    assert secret_part(token) not in fields["e"]


def token_parts(token: str) -> tuple[str, str]:
    """(key id, secret) of a token."""
    parts = api_keys.split_token(token)
    assert parts is not None
    return parts


def secret_part(token: str) -> str:
    return token_parts(token)[1]


def test_a_key_with_expire_in_stops_working_after_it(
    environ: dict[str, str], directory: Directory, key_file: Path, redis_sync: Any, tmp_path: Path
) -> None:
    out = tmp_path / "tenant.token"
    before = now_ms()
    assert run(["--role", "tenant", "--id", "t1", "--expire-in", "1h", "--out", str(out)], environ) == 0
    token = out.read_text().strip()
    assert authenticate(directory, token) is not None
    (record,) = [api_keys.ApiKeyRecord.decode(raw) for raw in redis_sync.hgetall(api_keys.KEYS_KEY).values()]
    assert before + 3_600_000 <= record.expire_ms <= now_ms() + 3_600_000
    assert record.created_by == "bootstrap"
    later = Directory(
        HashKey.from_file("test", str(key_file)), redis_sync, refresh_seconds=1.0, now_ms=lambda: record.expire_ms
    )
    assert authenticate(later, token) is None


def run_cli(argv: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m numprotect.core.identity.mint_cli`: the module the console script numprotect-mint-key runs."""
    env = {"PATH": os.environ.get("PATH", ""), **environ}
    return subprocess.run(
        [sys.executable, "-m", "numprotect.core.identity.mint_cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_out_dash_prints_the_token_alone_on_stdout(environ: dict[str, str], directory: Directory) -> None:
    result = run_cli(["--role", "service", "--id", "binding", "--description", "binding -> allocation"], environ)
    assert result.returncode == 2  # --out is required
    result = run_cli(["--role", "service", "--id", "binding", "--out", "-"], environ)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert token not in result.stderr and secret_part(token) not in result.stderr
    assert authenticate(directory, token) == Principal(Role.SERVICE, "binding", token_parts(token)[0])


BAD_OPTIONS = {
    "unknown role": (["--role", "admin"], "--role"),
    "tenant without id": (["--role", "tenant"], "--id: is required"),
    "tenant id with a brace": (["--role", "tenant", "--id", "a{b}"], "--id: must be 1-64 letters"),
    "carrier id with a colon": (["--role", "carrier", "--id", "cu:1"], "--id: must be 1-64 letters"),
    "operator with an id": (["--role", "operator", "--id", "bob"], "--id: must be empty for role operator"),
    "unknown service": (["--role", "service", "--id", "billing"], "--id: must be one of allocation, binding"),
    "bad duration": (["--role", "regulator", "--expire-in", "soon"], "--expire-in='soon': must be a duration"),
    "long description": (["--role", "regulator", "--description", "x" * 257], "--description: at most 256"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_a_bad_option_is_one_line_and_exit_2_with_nothing_stored(
    case: str, environ: dict[str, str], redis_sync: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, expected = BAD_OPTIONS[case]
    out = tmp_path / "x.token"
    assert run([*argv, "--out", str(out)], environ) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("numprotect-mint-key: ") and expected in line, line
    assert not out.exists()
    assert redis_sync.hlen(api_keys.KEYS_KEY) == 0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"NUMPROTECT_AUTH_KEY_FILE": ""}, "NUMPROTECT_AUTH_KEY_FILE: required"),
        ({"NUMPROTECT_AUTH_KEY_FILE": "/nonexistent/auth.key"}, "NUMPROTECT_AUTH_KEY_FILE: cannot read"),
        ({"NUMPROTECT_REDIS_MODE": "sentinel"}, "NUMPROTECT_REDIS_MODE='sentinel': must be one of"),
        ({"NUMPROTECT_REDIS_PASSWORD": "hunter2"}, "NUMPROTECT_REDIS_PASSWORD is not read"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(
    change: dict[str, str], expected: str, environ: dict[str, str], redis_sync: Any, tmp_path: Path
) -> None:
    """Through the real module: the line a Job's log or a shell shows, and nothing minted."""
    out = tmp_path / "operator.token"
    result = run_cli(["--role", "operator", "--out", str(out)], {**environ, **change})
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert expected in line, line
    assert not out.exists()
    assert redis_sync.hlen(api_keys.KEYS_KEY) == 0


def test_a_short_auth_key_is_refused(
    environ: dict[str, str], key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file.write_text("c2hvcnQ=\n")  # base64 of 5 bytes
    assert run(["--role", "operator", "--out", "-"], environ) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "NUMPROTECT_AUTH_KEY_FILE" in line and "at least 32 bytes" in line


def test_an_existing_token_file_is_never_overwritten(
    environ: dict[str, str], redis_sync: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "operator.token"
    out.write_text("kept\n")
    assert run(["--role", "operator", "--out", str(out)], environ) == 2
    assert "--out" in capsys.readouterr().err
    assert out.read_text() == "kept\n"
    assert redis_sync.hlen(api_keys.KEYS_KEY) == 0


def test_unreachable_redis_leaves_no_token_file(
    environ: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "operator.token"
    unreachable = {
        **environ,
        "NUMPROTECT_REDIS_URL": "redis://127.0.0.1:1/0",
        "NUMPROTECT_REDIS_MODE": "standalone",
        "NUMPROTECT_REDIS_TIMEOUT": "200ms",
    }
    assert run(["--role", "operator", "--out", str(out)], unreachable) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("numprotect-mint-key: no key minted: Redis redis://127.0.0.1:1/0")
    assert not out.exists()


def test_the_console_script_runs_the_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["numprotect-mint-key"].partition(":")
    assert (module, function) == ("numprotect.core.identity.mint_cli", "main")
    assert callable(getattr(import_module(module), function))
