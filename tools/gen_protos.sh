#!/usr/bin/env bash
# Regenerates gen/ (Python messages, gRPC stubs and their type stubs) from protos/. Never edit gen/ by hand.
set -euo pipefail
py=${1:-.venv/bin/python}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=$(dirname "$py")
rm -rf gen && mkdir -p gen
mapfile -t files < <(cd protos && find . -name '*.proto' | sed 's|^\./||' | sort)
# third_party/protos only resolves imports (google/rpc/status.proto): its Python module comes with
# googleapis-common-protos, so only our own files are generated.
"$py" -m grpc_tools.protoc -I protos -I third_party/protos \
  --python_out=gen --grpc_python_out=gen \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" --mypy_out=gen \
  --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" --mypy_grpc_out=gen \
  "${files[@]}"
# Each generated folder below numprotect/ becomes a regular package so mypy and importlib agree on module names;
# numprotect/ itself stays a namespace package shared with libs/ (numprotect.core) and services/.
find gen/numprotect -mindepth 1 -type d -exec touch {}/__init__.py \;
touch gen/numprotect/py.typed
