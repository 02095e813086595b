# numprotect: every target installs what it needs (venv, Python deps, Debian packages) on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(shell find protos third_party/protos -name '*.proto' | sort)
GEN_STAMP := gen/.stamp

.PHONY: run test lint bench chaos protos venv system-deps clean lock

venv: $(STAMP)

# Every dependency, direct or not, at the version and hashes of requirements.lock; then this project itself as an
# editable install (the build backend comes from the lock too, so nothing unpinned is fetched).
$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "numprotect: $(PYTHON) not found: install Python 3.11"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

# Regenerates the locks from the requirements files (needs PyPI): requirements.lock (everything, for the venv) and
# requirements-runtime.lock (the services' dependencies only, for the container image).
UV_COMPILE := $(VENV)/bin/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-unknown-linux-gnu
lock: $(STAMP)
	$(UV_COMPILE) requirements-dev.txt -o requirements.lock
	$(UV_COMPILE) requirements.txt -o requirements-runtime.lock

protos: $(GEN_STAMP)

$(GEN_STAMP): $(STAMP) $(PROTO_FILES) tools/gen_protos.sh
	tools/gen_protos.sh $(PY)
	@touch $@

system-deps:
	@tools/system_deps.sh

# make run PROMETHEUS=1: also a local Prometheus (NUMPROTECT_RUN_PROMETHEUS=1; README, "Local Prometheus").
run: protos system-deps
	$(if $(PROMETHEUS),NUMPROTECT_RUN_PROMETHEUS=$(PROMETHEUS) )$(PY) deploy/local/run_local.py

# The services' integration tests run a second time against a real 3-master Redis Cluster with replicas.
CLUSTER_TESTS := tests/allocation tests/binding tests/translation tests/cdr tests/events tests/doctor \
	tests/core/test_routes.py tests/core/test_binding_records.py tests/core/test_record_scripts_repeated.py

# Two pytest workers (pytest-xdist), one file per worker at a time: most tests wait on real processes and Redis.
XDIST := -n 2 --dist loadfile

test: protos system-deps
	$(PY) -m pytest $(XDIST) -m "not chaos" $(PYTEST_ARGS)
	NUMPROTECT_TEST_REDIS_MODE=cluster $(PY) -m pytest $(XDIST) -m "not slow and not chaos" $(CLUSTER_TESTS) $(PYTEST_ARGS)

# The long fault-injection, fuzzing and volume runs (tests marked `chaos`); make test runs their short versions.
# tests/chaos prints each fault's row of docs/reliability.md and writes it to .run/chaos-report.md (this run's rows).
chaos: protos system-deps
	@mkdir -p .run && rm -f .run/chaos-report.md
	NUMPROTECT_CHAOS_PROFILE=long NUMPROTECT_FUZZ_PROFILE=long NUMPROTECT_CHAOS_REPORT=$(CURDIR)/.run/chaos-report.md \
		$(PY) -m pytest -m chaos $(PYTEST_ARGS)
	NUMPROTECT_FUZZ_PROFILE=long $(PY) -m pytest tests/fuzz $(PYTEST_ARGS)

lint: protos system-deps
	$(PY) tools/check_lock.py
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy libs services tests benchmarks deploy tools
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format --diff --exit-code
	tools/buf_breaking.sh $(VENV)/bin/buf
	tools/validate_manifests.sh $(VENV)/bin
	tools/check_prometheus.sh $(PY)

bench: protos system-deps
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf gen .run .mypy_cache .ruff_cache .pytest_cache
