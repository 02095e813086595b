"""The local Prometheus of `make run` (opt-in: NUMPROTECT_RUN_PROMETHEUS=1, or `make run PROMETHEUS=1`).

Writes a Prometheus configuration that scrapes every service process's metrics port (plain HTTP on loopback) with
the rules of deploy/prometheus/rules loaded, then becomes Debian's /usr/bin/prometheus (exec), so the launcher
stops it like any other child. run_local.py starts it as a process; nothing imports it.

  python deploy/local/local_prometheus.py --data DIR --listen 127.0.0.1:9090 \
      --target allocation=127.0.0.1:9464 --target binding=127.0.0.1:9465 ...
  python deploy/local/local_prometheus.py --write-config FILE --target ...   (only writes it: promtool check config)

Scrape jobs are named numprotect-<service> (the alert NumprotectTargetDown matches job=~"numprotect.*"); each
target carries a `process` label (<service>-<index>) as `make run` names its log files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
# Short, so a newcomer sees a call in the graphs within seconds; the rules' rate windows (5m) need >= 2 samples.
SCRAPE_INTERVAL = "5s"


@dataclass(frozen=True)
class Target:
    service: str
    address: str  # host:port of the process's /metrics

    @classmethod
    def parse(cls, text: str) -> Target:
        """`service=host:port`, as --target takes it."""
        service, sep, address = text.partition("=")
        host, colon, port = address.rpartition(":")
        if not sep or not service or not colon or not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"--target {text!r}: expected service=host:port")
        return cls(service, address)


def render_config(targets: Sequence[Target], rule_files: Sequence[Path]) -> str:
    """The configuration as YAML (JSON is YAML): one job per service, one labelled target per process."""
    jobs: dict[str, list[dict[str, object]]] = {}
    counts: dict[str, int] = {}
    for target in targets:
        index = counts.get(target.service, 0)
        counts[target.service] = index + 1
        jobs.setdefault(target.service, []).append(
            {"targets": [target.address], "labels": {"process": f"{target.service}-{index}"}}
        )
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": f"numprotect-{service}", "static_configs": static} for service, static in jobs.items()
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Target.parse, action="append", default=[], help="service=host:port")
    parser.add_argument("--data", type=Path, help="directory of the config and the TSDB (e.g. .run/prometheus)")
    parser.add_argument("--listen", default="127.0.0.1:9090", help="web address (default 127.0.0.1:9090)")
    parser.add_argument("--write-config", type=Path, help="only write the configuration to this file")
    args = parser.parse_args(argv)
    config = render_config(args.target, rule_files())
    if args.write_config is not None:
        args.write_config.write_text(config)
        return 0
    if args.data is None:
        parser.error("--data is required unless --write-config")
    binary = shutil.which("prometheus")
    if binary is None:
        print("prometheus not found: run `make system-deps` (Debian package prometheus)", file=sys.stderr)
        return 1
    args.data.mkdir(parents=True, exist_ok=True)
    config_file = args.data / "prometheus.yml"
    config_file.write_text(config)
    command = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={args.data / 'data'}",
        f"--web.listen-address={args.listen}",
        "--storage.tsdb.retention.time=2d",
        "--log.level=warn",
    ]
    os.execv(binary, command)


if __name__ == "__main__":
    raise SystemExit(main())
