# linft: `make demo` sets up and runs the built-in demo, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.linft-installed

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,clip]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/linft demo --out demo_out

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/extract_throughput.py

clean:
	rm -rf demo_out .pytest_cache build *.egg-info
