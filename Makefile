# taskfleet: the single entry point for people and CI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/taskfleet/v1/*.proto)

.PHONY: install system-deps run-master run-worker test lint proto bench bench-depth clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run-master: install
	$(BIN)/taskfleet master

run-worker: install
	$(BIN)/taskfleet worker --master 127.0.0.1:50051 --tasks taskfleet.worker.examples

# iproute2's `ip`, for the test that puts master and workers in network
# namespaces. Installed only when missing and possible; otherwise that test skips.
system-deps:
	@if command -v ip >/dev/null 2>&1; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2) \
			|| echo "system-deps: could not install iproute2; the network-namespace test will skip"; \
	else \
		echo "system-deps: no ip and no apt-get as root; the network-namespace test will skip"; \
	fi

test: install system-deps
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Regenerates the committed stubs in common/taskfleet/v1 from protos/.
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		--python_out=common --grpc_python_out=common \
		--mypy_out=common --mypy_grpc_out=common \
		$(PROTO_SRC)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

bench: install
	$(BIN)/python bench/run.py

bench-depth: install
	$(BIN)/python bench/run.py --rounds 1 --depth 1000000
