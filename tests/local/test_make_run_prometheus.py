"""`make run PROMETHEUS=1`: Debian's Prometheus scraping every service process, with the rules loaded.

The configuration deploy/local/local_prometheus.py writes (one job per service, one target per process, the rule
files) passes `promtool check config`; under the launcher the real Prometheus reaches every process's /metrics
(each target up, numprotect_build_info of every process queried back) and has loaded every rule group.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from support.launcher import LAUNCHER, SERVICES, launch, launcher_env
from support.processes import ROOT
from support.redis_server import free_port

SCRIPT = ROOT / "deploy" / "local" / "local_prometheus.py"
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))


def test_the_config_has_a_job_per_service_a_target_per_process_and_the_rules(tmp_path: Path) -> None:
    config_file = tmp_path / "prometheus.yml"
    targets = ["allocation=127.0.0.1:9151", "translation=127.0.0.1:9152", "translation=127.0.0.1:9153"]
    subprocess.run(
        [sys.executable, str(SCRIPT), "--write-config", str(config_file), *(f"--target={t}" for t in targets)],
        check=True,
        timeout=30,
    )
    config = yaml.safe_load(config_file.read_text())
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    assert jobs == {
        "numprotect-allocation": [{"targets": ["127.0.0.1:9151"], "labels": {"process": "allocation-0"}}],
        "numprotect-translation": [
            {"targets": ["127.0.0.1:9152"], "labels": {"process": "translation-0"}},
            {"targets": ["127.0.0.1:9153"], "labels": {"process": "translation-1"}},
        ],
    }
    assert config["rule_files"] == [str(path) for path in RULES] and len(RULES) == 2
    checked = subprocess.run(["promtool", "check", "config", str(config_file)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 2 rule files found" in checked.stdout


def test_a_malformed_target_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--write-config", str(tmp_path / "p.yml"), "--target", "allocation:9151"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "expected service=host:port" in result.stderr
    assert not (tmp_path / "p.yml").exists()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())["data"]


def test_make_run_starts_prometheus_scraping_every_process(tmp_path: Path) -> None:
    prometheus_port = free_port()
    env = _launcher_env(
        tmp_path, NUMPROTECT_LOCAL_PROMETHEUS_PORT=str(prometheus_port), NUMPROTECT_TRANSLATION_PROCESSES="2"
    )
    launched = launch(env)
    process, lines, ready, reader = launched.process, launched.lines, launched.ready, launched.reader
    base = f"http://127.0.0.1:{prometheus_port}"
    try:
        assert ready.wait(120), "".join(lines)
        assert f"prometheus  {base}/classic/graph" in "".join(lines)
        # Scraped every 5 s: every process's target up within a few scrapes.
        deadline = time.monotonic() + 60
        while True:
            targets = _get(f"{base}/api/v1/targets")["activeTargets"]
            health = {t["labels"]["process"]: t["health"] for t in targets}
            if (len(health) == 7 and set(health.values()) == {"up"}) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert health == {
            "allocation-0": "up",
            "binding-0": "up",
            "translation-0": "up",
            "translation-1": "up",
            "cdr-0": "up",
            "events-0": "up",
            "sip-0": "up",
        }, targets
        assert {t["labels"]["job"] for t in targets} == {f"numprotect-{s}" for s in SERVICES}
        built = _get(f"{base}/api/v1/query?query=numprotect_build_info")["result"]
        assert sorted(r["metric"]["process"] for r in built) == sorted(health)
        # The recording rules join each process's series to numprotect_build_info{service} on (job, instance):
        # evaluated on real scrapes, Translate's handled rate comes back labelled with its service.
        query = 'service_method:grpc_server_handled:rate5m{grpc_method="Translate"}'
        while True:
            recorded = _get(f"{base}/api/v1/query?query={urllib.parse.quote(query)}")["result"]
            if recorded or time.monotonic() > deadline + 30:
                break
            time.sleep(0.5)
        assert [r["metric"]["service"] for r in recorded] == ["translation"], recorded
        groups = {g["name"]: g for g in _get(f"{base}/api/v1/rules")["groups"]}
        assert set(groups) == {
            "numprotect-alerts",
            "numprotect-grpc",
            "numprotect-domain",
            "numprotect-webhooks",
            "numprotect-sip",
        }
        assert all(r["health"] != "err" for g in groups.values() for r in g["rules"])
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=90)
        reader.join(timeout=5)
    assert code == 0, "".join(lines)
    assert (tmp_path / "prometheus" / "prometheus.yml").is_file()
    assert (tmp_path / "prometheus" / "data").is_dir()
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", f"127.0.0.1:{prometheus_port}"], capture_output=True)
    assert left.stdout == b"", "prometheus still running"


def _launcher_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return launcher_env(tmp_path, NUMPROTECT_RUN_PROMETHEUS="1", **extra)


def test_a_busy_prometheus_port_or_metrics_off_is_refused_before_anything_starts(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        busy = subprocess.run(
            [sys.executable, str(LAUNCHER)],
            cwd=ROOT,
            env=_launcher_env(tmp_path, NUMPROTECT_LOCAL_PROMETHEUS_PORT=str(port)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert busy.returncode == 1 and busy.stderr.strip().count("\n") == 0, busy.stderr
    assert f"port {port} for prometheus is busy" in busy.stderr and "NUMPROTECT_LOCAL_PROMETHEUS_PORT" in busy.stderr
    metrics_off = subprocess.run(
        [sys.executable, str(LAUNCHER)],
        cwd=ROOT,
        env=_launcher_env(tmp_path, NUMPROTECT_METRICS="off"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert metrics_off.returncode == 1, metrics_off.stderr
    assert "NUMPROTECT_RUN_PROMETHEUS=1 needs the metrics ports" in metrics_off.stderr
    assert not (tmp_path / "redis").exists()  # refused before Redis started
