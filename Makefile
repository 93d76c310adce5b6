# taskfleet: the single entry point for people and CI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/taskfleet/v1/*.proto)

.PHONY: install run-master run-worker test lint proto bench bench-depth clean

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

test: install
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
