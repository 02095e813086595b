#!/usr/bin/env bash
# buf breaking: the protos of the working tree against the last commit of main (on main itself: against its parent,
# so the newest commit is checked too). A fresh clone without history has nothing to compare with, and says so.
set -euo pipefail
buf=${1:-.venv/bin/buf}
cd "$(dirname "$0")/.."
if [ "$(git rev-parse --abbrev-ref HEAD 2>/dev/null)" = "main" ] && git diff --quiet HEAD -- protos buf.yaml; then
  against=HEAD~1
else
  against=main
fi
if ! git rev-parse --verify -q "$against^{commit}" >/dev/null; then
  echo "buf breaking: no commit '$against' to compare with (shallow clone?): skipped"
  exit 0
fi
if [ -z "$(git ls-tree -r --name-only "$against" -- protos)" ]; then
  echo "buf breaking: '$against' has no protos/: nothing to compare"
  exit 0
fi
# Our module only: the workspace's other module (third_party/protos, googleapis' google.rpc.Status) is not ours to
# check, and buf compares whole workspaces image by image (a module added since `against` would not compare).
"$buf" breaking protos --against ".git#ref=$(git rev-parse "$against"),subdir=protos"
echo "buf breaking: no breaking change against $against"
