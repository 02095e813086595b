"""Binding settings are validated before the server starts: a bad value ends start-up with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from numprotect.core.identity.service_token import ServiceToken
from numprotect.core.settings import Env, SettingsError
from numprotect.services.binding.settings import BindingSettings
from support.identity import with_auth
from support.processes import ROOT
from support.tls import with_tls


def test_defaults() -> None:
    settings = BindingSettings.from_env(Env({}))
    assert settings.min_ttl_seconds == 60
    assert settings.max_ttl_seconds == 90 * 86400
    assert settings.default_ttl_seconds == 7200
    assert settings.history_retention_seconds == 180 * 86400
    assert (settings.create_rate, settings.create_burst) == (2000.0, 2000)
    assert (settings.trace_rate, settings.trace_burst) == (50.0, 100)


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"NUMPROTECT_BINDING_MIN_TTL": "soon"}, "NUMPROTECT_BINDING_MIN_TTL"),
        ({"NUMPROTECT_BINDING_MIN_TTL": "2h", "NUMPROTECT_BINDING_MAX_TTL": "1h"}, "NUMPROTECT_BINDING_MIN_TTL"),
        ({"NUMPROTECT_BINDING_DEFAULT_TTL": "30s"}, "NUMPROTECT_BINDING_DEFAULT_TTL"),
        ({"NUMPROTECT_BINDING_HISTORY_RETENTION": "0"}, "NUMPROTECT_BINDING_HISTORY_RETENTION"),
        ({"NUMPROTECT_BINDING_CREATE_LEASE": "1h"}, "NUMPROTECT_BINDING_CREATE_LEASE"),
        ({"NUMPROTECT_CREATE_BINDING_RATE": "0"}, "NUMPROTECT_CREATE_BINDING_RATE"),
        ({"NUMPROTECT_CREATE_BINDING_BURST": "0"}, "NUMPROTECT_CREATE_BINDING_BURST"),
        ({"NUMPROTECT_TRACE_NUMBER_RATE": "fast"}, "NUMPROTECT_TRACE_NUMBER_RATE"),
        ({"NUMPROTECT_TRACE_NUMBER_BURST": "1.5"}, "NUMPROTECT_TRACE_NUMBER_BURST"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        BindingSettings.from_env(Env(environ))


def _start(redis_url: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """Runs the binding process (TLS and auth on, as the tests' services) until it exits."""
    env: Mapping[str, str] = with_auth(
        with_tls(
            {"PATH": "/usr/bin:/bin", "NUMPROTECT_REDIS_URL": redis_url, "NUMPROTECT_BINDING_PORT": "0", **settings}
        )
    )
    return subprocess.run(
        [sys.executable, "-m", "numprotect.services.binding"],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_process_exits_2_on_a_bad_setting(redis_url: str, service_token_file: Path) -> None:
    result = _start(
        redis_url, NUMPROTECT_BINDING_DEFAULT_TTL="100d", NUMPROTECT_SERVICE_TOKEN_FILE=str(service_token_file)
    )
    assert result.returncode == 2, result.stderr
    assert "NUMPROTECT_BINDING_DEFAULT_TTL" in result.stderr


def test_without_a_service_credential_binding_refuses_to_start_in_one_line(redis_url: str) -> None:
    """Auth on, no NUMPROTECT_SERVICE_TOKEN_FILE and no mTLS: allocation would refuse every reservation."""
    result = _start(redis_url)
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "NUMPROTECT_SERVICE_TOKEN_FILE" in line]
    assert "required while NUMPROTECT_AUTH=on" in line and "NUMPROTECT_TLS_CLIENT_AUTH=require" in line


def test_a_token_file_without_a_token_is_refused_without_showing_its_content(redis_url: str, tmp_path: Path) -> None:
    secret = "npk_not-a-token-but-maybe-a-password"
    bad = tmp_path / "bad.token"
    bad.write_text(secret)
    result = _start(redis_url, NUMPROTECT_SERVICE_TOKEN_FILE=str(bad))
    assert result.returncode == 2, result.stderr
    assert f"NUMPROTECT_SERVICE_TOKEN_FILE: {bad} must hold one API token" in result.stderr
    assert secret not in result.stderr
    missing = _start(redis_url, NUMPROTECT_SERVICE_TOKEN_FILE=str(tmp_path / "absent"))
    assert missing.returncode == 2 and "NUMPROTECT_SERVICE_TOKEN_FILE: cannot read" in missing.stderr


def test_the_service_token_never_shows_in_its_repr(service_token_file: Path) -> None:
    token = ServiceToken.from_env(Env({"NUMPROTECT_SERVICE_TOKEN_FILE": str(service_token_file)}))
    assert token is not None
    secret = service_token_file.read_text().strip()
    assert secret not in repr(token) and secret not in repr(token.interceptor())
    assert ServiceToken.from_env(Env({})) is None
