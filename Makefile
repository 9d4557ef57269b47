# Nestbox: `make help` lists every target. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PYTEST := $(BIN)/pytest

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

install: $(STAMP) dashboard ## create .venv, install every program and dev tool, build the dashboard (idempotent)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[envd,hostagent,controlplane,cli,dev]'
	@rm -f $(VENV)/.installed-* && touch $@

dashboard: ## build the dashboard into dashboard/build (npm ci + vite; skipped when nothing changed)
	bash scripts/build-dashboard.sh

system-deps: ## install the Debian packages the VM tier and envd need (root)
	bash scripts/install-system-deps.sh

image: install system-deps ## build (or reuse) the guest image
	$(BIN)/nestbox-agent image build

proto: install ## regenerate the Connect/protobuf stubs under src/nestbox/protocol/gen
	bash scripts/gen-proto.sh

fmt: install ## format the code
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

lint: install ## ruff (format check + lint) and the import contracts (pyproject.toml)
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports --no-cache

typecheck: install ## mypy --strict on src/
	$(BIN)/mypy

test-unit: install ## unit tier: pure Python, seconds
	$(PYTEST) tests/unit

test-integration: install system-deps ## integration tier: real envd on localhost, real SDKs
	$(PYTEST) tests/integration --ignore=tests/integration/vm

test-vm: install system-deps image ## VM tier: real QEMU microVMs (root; TCG where KVM is not usable)
	$(PYTEST) tests/integration/vm -m "not cold_boots"

test-templates: install system-deps image ## base templates (cold boots at the asked size) and the `base` template (builds its image stage once per machine) (root)
	$(PYTEST) tests/integration/vm -m cold_boots --durations=10

test-e2e: install system-deps image ## end-to-end tier: control plane + agents + QEMU guests, SQLite and PostgreSQL (root)
	$(PYTEST) tests/e2e --durations=30

test: install system-deps lint typecheck image ## everything this machine can run: lint, types, every tier
	bash scripts/test-all.sh

check: test ## what CI runs, in CI's order

dev-cp: install ## run the control plane on 127.0.0.1:9725 with its data in .cache/dev-cp
	NESTBOX_DIR=$(CURDIR)/.cache/dev-cp $(BIN)/nestbox-cp

dev-envd: install ## run envd locally on :49983 (outside a VM: touches nothing on the host)
	$(BIN)/python -m nestbox.envd --port 49983 --outside-vm

test-sdk: install system-deps image ## SDK and CLI suites on the real stack with a 200 MiB file each way (root)
	NESTBOX_SDK_FULL=1 $(PYTEST) tests/unit/test_sdk.py tests/unit/test_sdk_cli.py tests/e2e/test_sdk.py tests/e2e/test_cli.py --durations=20

bench-vm: install system-deps ## VM benchmark: raw QEMU vs Nestbox restore/boot/snapshot/RSS (root)
	$(BIN)/python bench/bench_vm.py

bench-files: install system-deps image ## 100 MiB up and down through the public API vs raw TCP into the same guest, per hop (root)
	$(BIN)/python bench/bench_files.py

DENSITY_N ?= 10,40
bench-density: install system-deps image ## N idle capsules (DENSITY_N=10,40; =100 for 100): memory, idle CPU vs raw idle QEMU, exec p50/p99 vs N=0 (root)
	$(BIN)/python bench/bench_density.py --counts $(DENSITY_N)

bench-api: install system-deps image ## the public API vs what it wraps: create (single, 20 at once), exec RTT vs direct envd, PTY echo, pause/resume (root)
	$(BIN)/python -m bench.bench_api $(BENCH_ARGS)

load: install system-deps image ## load checks, long form: 50 exec streams of 10 MiB each, PTY echo under a proxied download (root)
	NESTBOX_LOAD_STREAM_BYTES=$${NESTBOX_LOAD_STREAM_BYTES:-10485760} NESTBOX_LOAD_KEYSTROKES=$${NESTBOX_LOAD_KEYSTROKES:-200} $(PYTEST) tests/e2e/test_load.py -s -q

soak: install system-deps image ## 100 pause/resume cycles with a process, a keep-alive proxied connection and a PTY (NESTBOX_SOAK_CYCLES)
	NESTBOX_SOAK_CYCLES=$${NESTBOX_SOAK_CYCLES:-100} $(PYTEST) tests/e2e/test_soak.py -s -q

chaos: install system-deps image ## kill -9 the agent, a QEMU, the control plane at random points; all settles, nothing leaks (CHAOS_SEED, CHAOS_ROUNDS)
	CHAOS_ROUNDS=$${CHAOS_ROUNDS:-21} $(PYTEST) tests/e2e/test_chaos.py -s -q

fuzz: install ## schemathesis over the whole API, every phase, user and admin (FUZZ_ARGS="--seed N --examples N")
	$(BIN)/python -m tests.reliability.fuzz $(FUZZ_ARGS)

run: install system-deps image ## start the control plane (127.0.0.1:9725) and a host agent; Ctrl-C stops both (root)
	$(BIN)/python scripts/run.py

.PHONY: help install dashboard system-deps image proto fmt lint typecheck test-unit test-integration test-vm test-e2e test-sdk test check dev-cp dev-envd run bench-vm bench-files bench-density bench-api load fuzz soak chaos
