#!/usr/bin/env bash
# Installs the Debian packages the suite runs against, when missing: redis-server (store), h2load (benchmarks),
# prometheus (promtool for `make lint`, the local Prometheus of `make run`), curl (the README walk-through), sip-tester
# (SIPp: the SIP adapter's scenarios, tests and benchmark) and kamailio (the SIP proxy of the end-to-end test).
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v promtool >/dev/null || missing+=(prometheus)
command -v curl >/dev/null || missing+=(curl)
command -v sipp >/dev/null || missing+=(sip-tester)
command -v kamailio >/dev/null || missing+=(kamailio)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "numprotect: need root or sudo to apt-get install ${missing[*]}"; exit 1; }
  sudo=sudo
fi
echo "numprotect: installing ${missing[*]} (apt-get)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
