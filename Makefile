# numprotect: every target installs what it needs (venv, Python deps, Debian packages) on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(shell find protos -name '*.proto' | sort)
GEN_STAMP := gen/.stamp

.PHONY: run test lint bench protos venv system-deps clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@command -v $(PYTHON) >/dev/null || { echo "numprotect: $(PYTHON) not found: install Python 3.11"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	@# libs/, services/ and gen/ on the venv's import path (the code is not a distribution).
	@printf '%s\n' "$(CURDIR)/libs" "$(CURDIR)/services" "$(CURDIR)/gen" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/numprotect-dev.pth
	@touch $@

protos: $(GEN_STAMP)

$(GEN_STAMP): $(STAMP) $(PROTO_FILES) tools/gen_protos.sh
	tools/gen_protos.sh $(PY)
	@touch $@

system-deps:
	@tools/system_deps.sh

run: protos system-deps
	$(PY) deploy/local/run_local.py

# The services' integration tests run a second time against a real 3-master Redis Cluster with replicas.
CLUSTER_TESTS := tests/allocation tests/binding tests/translation tests/cdr tests/core/test_routes.py \
	tests/core/test_binding_records.py

test: protos system-deps
	$(PY) -m pytest $(PYTEST_ARGS)
	NUMPROTECT_TEST_REDIS_MODE=cluster $(PY) -m pytest -m "not slow" $(CLUSTER_TESTS) $(PYTEST_ARGS)

lint: protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy libs services tests benchmarks deploy
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format --diff --exit-code
	tools/validate_manifests.sh $(VENV)/bin

bench: protos system-deps
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf gen .run .mypy_cache .ruff_cache .pytest_cache
