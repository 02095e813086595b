"""Binding settings are validated before the server starts: a bad value ends start-up with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from numprotect.core.settings import Env, SettingsError
from numprotect.services.binding.settings import BindingSettings
from support.processes import ROOT


def test_defaults() -> None:
    settings = BindingSettings.from_env(Env({}))
    assert settings.min_ttl_seconds == 60
    assert settings.max_ttl_seconds == 90 * 86400
    assert settings.default_ttl_seconds == 7200
    assert settings.history_retention_seconds == 180 * 86400


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"NUMPROTECT_BINDING_MIN_TTL": "soon"}, "NUMPROTECT_BINDING_MIN_TTL"),
        ({"NUMPROTECT_BINDING_MIN_TTL": "2h", "NUMPROTECT_BINDING_MAX_TTL": "1h"}, "NUMPROTECT_BINDING_MIN_TTL"),
        ({"NUMPROTECT_BINDING_DEFAULT_TTL": "30s"}, "NUMPROTECT_BINDING_DEFAULT_TTL"),
        ({"NUMPROTECT_BINDING_HISTORY_RETENTION": "0"}, "NUMPROTECT_BINDING_HISTORY_RETENTION"),
        ({"NUMPROTECT_BINDING_CREATE_LEASE": "1h"}, "NUMPROTECT_BINDING_CREATE_LEASE"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        BindingSettings.from_env(Env(environ))


def test_the_process_exits_2_on_a_bad_setting(redis_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "numprotect.services.binding"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "NUMPROTECT_REDIS_URL": redis_url,
            "NUMPROTECT_BINDING_PORT": "0",
            "NUMPROTECT_BINDING_DEFAULT_TTL": "100d",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "NUMPROTECT_BINDING_DEFAULT_TTL" in result.stderr
