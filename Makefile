# Everything sets itself up: `make demo` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.semspai-installed
DEMO_OUT ?= demo-out

.PHONY: install demo test test-all lint format bench clean

install: $(STAMP)

# torch is capped at 2.14.1 in pyproject.toml: that build lies on the project's machines' disk
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/semspai demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check semspai store pipeline stages tests benchmarks
	$(BIN)/ruff format --check semspai store pipeline stages tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format semspai store pipeline stages tests benchmarks

bench: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache build *.egg-info
