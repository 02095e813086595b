"""Settings are validated at start-up; a bad value stops the process with one line naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from numprotect.core.settings import (
    Env,
    RedisSettings,
    ServerSettings,
    SettingsError,
    server_port_variable,
    service_address,
)
from support.processes import ROOT


def test_defaults() -> None:
    env = Env({})
    server = ServerSettings.from_env(env, "translation")
    assert server.port == 50053
    assert server.reuse_port is False
    assert server.cpu_scheduling == "batch"
    assert server.gc_gen0_threshold == 10_000
    redis = RedisSettings.from_env(env)
    assert redis.url == "redis://127.0.0.1:6379/0"
    assert redis.mode == "standalone"
    assert service_address(env, "allocation") == "127.0.0.1:50051"


def test_the_sip_adapters_grpc_server_leaves_its_sip_variables_to_the_sip_listener() -> None:
    """NUMPROTECT_SIP_HOST/_PORT are the SIP listener's (docs/sip.md); sip's gRPC (health) server reads
    NUMPROTECT_SIP_GRPC_*, every other service NUMPROTECT_<SERVICE>_*."""
    sip_listener = {"NUMPROTECT_SIP_HOST": "0.0.0.0", "NUMPROTECT_SIP_PORT": "5060", "NUMPROTECT_SIP_REUSE_PORT": "on"}
    server = ServerSettings.from_env(Env(sip_listener), "sip")
    assert (server.host, server.port, server.reuse_port) == ("127.0.0.1", 50056, False)
    grpc = {
        "NUMPROTECT_SIP_GRPC_HOST": "0.0.0.0",
        "NUMPROTECT_SIP_GRPC_PORT": "0",
        "NUMPROTECT_SIP_GRPC_REUSE_PORT": "on",
    }
    server = ServerSettings.from_env(Env({**sip_listener, **grpc}), "sip")
    assert (server.host, server.port, server.reuse_port) == ("0.0.0.0", 0, True)
    assert ServerSettings.from_env(Env({"NUMPROTECT_CDR_PORT": "5060"}), "cdr").port == 5060
    with pytest.raises(SettingsError, match="NUMPROTECT_SIP_GRPC_PORT"):
        ServerSettings.from_env(Env({"NUMPROTECT_SIP_GRPC_PORT": "70000"}), "sip")
    assert server_port_variable("sip") == "NUMPROTECT_SIP_GRPC_PORT"
    assert server_port_variable("cdr") == "NUMPROTECT_CDR_PORT"


def test_durations() -> None:
    env = Env({"A": "500ms", "B": "5m", "C": "180d", "D": "30"})
    assert env.seconds("A", 0) == 0.5
    assert env.seconds("B", 0) == 300
    assert env.seconds("C", 0) == 180 * 86400
    assert env.seconds("D", 0) == 30


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"NUMPROTECT_BINDING_PORT": "http"}, "NUMPROTECT_BINDING_PORT='http': must be an integer"),
        (
            {"NUMPROTECT_BINDING_PORT": "70000"},
            "NUMPROTECT_BINDING_PORT='70000': must be between 0 and 65535",
        ),
        (
            {"NUMPROTECT_REDIS_MODE": "sentinel"},
            "NUMPROTECT_REDIS_MODE='sentinel': must be one of standalone, cluster",
        ),
        (
            {"NUMPROTECT_REDIS_URL": "localhost:6379"},
            "NUMPROTECT_REDIS_URL='localhost:6379': must be redis://",
        ),
        (
            {"NUMPROTECT_REDIS_MODE": "cluster", "NUMPROTECT_REDIS_URL": "redis://127.0.0.1:7000/3"},
            "Redis Cluster has only database 0",
        ),
        ({"NUMPROTECT_GRACE_PERIOD": "soon"}, "NUMPROTECT_GRACE_PERIOD='soon': must be a duration"),
        ({"NUMPROTECT_CPU_SCHEDULING": "fifo"}, "NUMPROTECT_CPU_SCHEDULING='fifo': must be one of batch, normal"),
        (
            {"NUMPROTECT_GC_GEN0_THRESHOLD": "50"},
            "NUMPROTECT_GC_GEN0_THRESHOLD='50': must be between 100 and 10000000",
        ),
        ({"NUMPROTECT_ALLOCATION_ADDR": "nohost"}, "NUMPROTECT_ALLOCATION_ADDR='nohost': must be host:port"),
    ],
)
def test_bad_values_name_the_variable_and_the_rule(environ: dict[str, str], message: str) -> None:
    env = Env(environ)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace("?", r"\?")):
        ServerSettings.from_env(env, "binding")
        RedisSettings.from_env(env)
        service_address(env, "allocation")


def test_a_service_with_a_bad_setting_exits_2_with_one_line() -> None:
    env = {**os.environ, "NUMPROTECT_REDIS_MODE": "sentinel"}
    result = subprocess.run(
        [sys.executable, "-m", "numprotect.services.binding"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["numprotect-binding: NUMPROTECT_REDIS_MODE='sentinel': must be one of standalone, cluster"]
