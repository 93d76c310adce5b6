# taskfleet: the single entry point for people and CI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/taskfleet/v1/*.proto)
# buf (the protobuf linter) from npm, installed into a project-local folder.
BUF_VERSION := 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
DIST ?= dist
# The .pyz's shebang names the Python minor version it is built for, and extra pip
# options choose its platform, e.g. to build for another machine:
#   make dist PYZ_PYTHON='/usr/bin/env python3.12' \
#     PYZ_PIP_ARGS='--platform manylinux2014_aarch64 --python-version 3.12 --only-binary=:all:'
PYZ_PYTHON ?= /usr/bin/env python$(shell $(BIN)/python -c 'import sys; print(*sys.version_info[:2], sep=".")')
PYZ_PIP_ARGS ?=
# A separate venv for the peer systems `make bench-peers` compares against (Celery,
# Dramatiq and RQ, each with Redis), so that none of their packages reaches the
# project's own .venv.
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

.PHONY: install system-deps run-master run-worker test lint buf proto bench bench-depth bench-retention bench-scaling bench-peers peers-deps clean dist

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Where run-master listens and run-worker connects: `make run-worker MASTER=host:6000`,
# or TASKFLEET_MASTER (and TASKFLEET_LISTEN for the master) in the environment.
MASTER ?= $(or $(TASKFLEET_MASTER),127.0.0.1:50051)
LISTEN ?= $(or $(TASKFLEET_LISTEN),$(MASTER))

run-master: install
	$(BIN)/taskfleet master --listen $(LISTEN)

run-worker: install
	$(BIN)/taskfleet worker --master $(MASTER) --tasks taskfleet.worker.examples

# Debian packages the tests use: iproute2's `ip` (master and workers in network
# namespaces), node/npm (the Node.js example), PostgreSQL (the tests start a
# throwaway server for the PostgreSQL store; postgresql-common's pg_config finds
# it) and Chromium (playwright drives it for the dashboard's browser tests; its
# own browser download is not used). Each is installed only when missing and possible; otherwise its tests
# skip, except in CI, where TASKFLEET_REQUIRE_SYSTEM=1 (set by .ci/run) makes
# them fail instead.
SYSTEM_DEPS := ip:iproute2 node:nodejs npm:npm pg_config:postgresql chromium:chromium

system-deps:
	@missing=""; for pair in $(SYSTEM_DEPS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -z "$$missing" ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) \
			|| echo "system-deps: could not install$$missing; their tests will skip"; \
	else \
		echo "system-deps: missing$$missing and no apt-get as root; their tests will skip"; \
	fi

# The suite's tests mostly wait on the processes they start: two pytest workers
# (pytest-xdist) roughly halve its wall time on two cores. A test file runs whole
# in one worker, so a module's shared fixtures are set up once.
TEST_WORKERS ?= 2

test: install system-deps
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

lint: install buf
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint

# Reinstalls when BUF_VERSION changes (the stamp names the version).
buf: $(TOOLS)/.buf-$(BUF_VERSION)

$(TOOLS)/.buf-$(BUF_VERSION):
	npm install --prefix $(TOOLS) --no-audit --no-fund --save-exact @bufbuild/buf@$(BUF_VERSION)
	rm -f $(TOOLS)/.buf-*
	touch $@

# Regenerates the committed stubs in common/taskfleet/v1 from protos/.
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		--python_out=common --grpc_python_out=common \
		--mypy_out=common --mypy_grpc_out=common \
		$(PROTO_SRC)

# The wheel, and $(DIST)/taskfleet-worker.pyz: a worker in one file (a shiv zipapp
# of the wheel and its dependencies) for machines that have only python3. grpcio
# is compiled, so the .pyz runs only on the platform and Python minor version it
# was built for (this machine's unless PYZ_PIP_ARGS says otherwise).
# build/ goes first: setuptools would otherwise pack files deleted since last time.
dist: install
	rm -rf build $(DIST)/taskfleet-*.whl $(DIST)/taskfleet-worker.pyz
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir $(DIST) .
	$(BIN)/shiv --reproducible --compressed --python '$(PYZ_PYTHON)' \
		--entry-point taskfleet.worker.__main__:main \
		--output-file $(DIST)/taskfleet-worker.pyz --quiet $(PYZ_PIP_ARGS) $(DIST)/taskfleet-*.whl

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(TOOLS) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# BENCH_ARGS passes options through, e.g. BENCH_ARGS='--result-ttl-s 1' to run
# every workload while the master prunes what finished a second before.
bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-retention: install
	$(BIN)/python bench/retention.py

bench-scaling: install
	$(BIN)/python bench/scaling.py

bench-depth: install
	$(BIN)/python bench/run.py --rounds 1 --depth 1000000

# Celery, Dramatiq and RQ, each with Redis as broker and result store, run in the
# same alternating rounds as `make bench` (BENCH_ARGS passes options through, e.g.
# BENCH_ARGS='--rounds 1 --peers rq'). Debian's redis-server is installed only when
# missing (as root); the peers and the redis client go into $(PEERS_VENV), pinned
# in bench/peers-requirements.txt, and are reinstalled when that file changes.
peers-deps: $(PEERS_STAMP)
	@command -v redis-server >/dev/null 2>&1 || { \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; }

$(PEERS_STAMP): bench/peers-requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -r bench/peers-requirements.txt
	touch $(PEERS_STAMP)

bench-peers: install peers-deps
	$(BIN)/python bench/run.py --peers --peers-python $(PEERS_VENV)/bin/python $(BENCH_ARGS)
