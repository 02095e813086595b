#!/usr/bin/env bash
# The Prometheus rules and the local Prometheus configuration, checked by Debian's promtool (package prometheus,
# installed by `make system-deps`): rule syntax and naming (`check rules`), the alerts' unit tests
# (deploy/prometheus/tests, `test rules`), and the configuration `make run` writes for its Prometheus (`check
# config`, which checks the rule files it loads too). Works offline.
# Usage: tools/check_prometheus.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${1:-.venv/bin/python}
command -v promtool >/dev/null || { echo "numprotect: promtool missing: run \`make system-deps\` (Debian package prometheus)" >&2; exit 1; }
promtool check rules deploy/prometheus/rules/*.yml
(cd deploy/prometheus/tests && promtool test rules ./*.test.yml)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$python" deploy/local/local_prometheus.py --write-config "$out/prometheus.yml" \
  --target allocation=127.0.0.1:9464 --target binding=127.0.0.1:9465 \
  --target translation=127.0.0.1:9466 --target translation=127.0.0.1:9467 --target cdr=127.0.0.1:9468 \
  --target events=127.0.0.1:9469 --target sip=127.0.0.1:9470
promtool check config "$out/prometheus.yml"
